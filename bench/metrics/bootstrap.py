"""Uncertainty over images: percentile bootstrap CIs and a paired bootstrap test.

Images are the unit of resampling (cells within an image are not independent).
Seeded, 2000 resamples by default, so the same inputs give the same intervals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

N_RESAMPLES = 2000


def resample_weights(n: int, n_resamples: int = N_RESAMPLES, seed: int = 0) -> np.ndarray:
    """(B x n) multiplicities of each image in each resample."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    w = np.zeros((n_resamples, n), dtype=np.int64)
    np.add.at(w, (np.repeat(np.arange(n_resamples), n), idx.ravel()), 1)
    return w


def bootstrap_ci(values: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """CI of the mean of per-image values."""
    v = np.asarray(values, float)
    if v.size == 0:
        return (float("nan"), float("nan"))
    w = resample_weights(v.size, n_resamples, seed)
    means = (w @ v) / v.size
    a = (1 - level) / 2
    lo, hi = np.quantile(means, [a, 1 - a])
    return float(lo), float(hi)


def bootstrap_ci_stat(n: int, stat: Callable[[np.ndarray], float | np.ndarray], n_resamples: int = N_RESAMPLES,
                      seed: int = 0, level: float = 0.95):
    """CI of any statistic of image weights (e.g. COCO AP via weighted_ap).

    ``stat`` may return several numbers at once (one pass per resample); then one
    (lo, hi) pair per number is returned.
    """
    if n == 0:
        return (float("nan"), float("nan"))
    vals = np.array([stat(w) for w in resample_weights(n, n_resamples, seed)], dtype=float)
    a = (1 - level) / 2
    cols = vals.reshape(len(vals), -1).T
    out = []
    for v in cols:
        v = v[np.isfinite(v)]
        lo, hi = np.quantile(v, [a, 1 - a]) if v.size else (np.nan, np.nan)
        out.append((float(lo), float(hi)))
    return out[0] if vals.ndim == 1 else out


@dataclass
class PairedTest:
    """A vs B on the same images: mean difference, its CI, and P(A beats B) over resamples."""

    diff: float
    diff_ci95: tuple[float, float]
    p_a_better: float
    n_images: int

    @property
    def verdict(self) -> str:
        lo, hi = self.diff_ci95
        if lo > 0:
            return "better"
        if hi < 0:
            return "worse"
        return "not distinguishable"

    def as_dict(self) -> dict:
        return {"diff": self.diff, "diff_ci95": list(self.diff_ci95), "p_a_better": self.p_a_better,
                "n_images": self.n_images, "verdict": self.verdict}


def paired_bootstrap(a: dict[str, float], b: dict[str, float], n_resamples: int = N_RESAMPLES,
                     seed: int = 0) -> PairedTest:
    """Per-image scores of two models; only images both were scored on are compared."""
    ids = sorted(set(a) & set(b))
    if not ids:
        raise ValueError("no images in common between the two prediction sets")
    d = np.array([a[i] - b[i] for i in ids])
    w = resample_weights(len(ids), n_resamples, seed)
    means = (w @ d) / len(ids)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return PairedTest(float(d.mean()), (float(lo), float(hi)), _p_greater(means), len(ids))


def _p_greater(diffs: np.ndarray) -> float:
    """P(A beats B) over resamples; a tie counts half (identical runs give 0.5, not 0)."""
    return float((diffs > 0).mean() + 0.5 * (diffs == 0).mean())


def _seed_means(scores: np.ndarray, w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per resample: mean over resampled seeds (rows) of the image-weighted mean (w: B x n)."""
    n_seeds, n = scores.shape
    per_seed = (w @ scores.T) / n                         # (B, n_seeds): every seed under each resample
    if n_seeds == 1:
        return per_seed[:, 0]
    pick = rng.integers(0, n_seeds, size=(len(w), n_seeds))  # seeds drawn with replacement
    return np.take_along_axis(per_seed, pick, axis=1).mean(axis=1)


def seeds_images_ci(scores: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = 0,
                    level: float = 0.95) -> tuple[float, float]:
    """CI of the mean of a (seeds x images) score matrix, resampling images and seeds.

    Both sources of noise count: which images were held out and which training seed ran.
    With one seed this is :func:`bootstrap_ci` of that seed's per-image scores.
    """
    s = np.atleast_2d(np.asarray(scores, float))
    if s.size == 0:
        return (float("nan"), float("nan"))
    w = resample_weights(s.shape[1], n_resamples, seed)
    means = _seed_means(s, w, np.random.default_rng(seed + 1))
    a = (1 - level) / 2
    lo, hi = np.quantile(means, [a, 1 - a])
    return float(lo), float(hi)


def paired_seeds_images(a: np.ndarray, b: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = 0) -> PairedTest:
    """A vs B, each a (seeds x images) matrix on the same images (same column order).

    Images are resampled together (paired: the same held-out images for both); seeds are
    resampled independently for A and B (a seed of A is not the same training run as that
    seed of B). Returns the difference of means A - B, its 95% CI and P(A > B).
    """
    a, b = np.atleast_2d(np.asarray(a, float)), np.atleast_2d(np.asarray(b, float))
    if a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise ValueError(f"need score matrices over the same images, got {a.shape} and {b.shape}")
    w = resample_weights(a.shape[1], n_resamples, seed)
    rng = np.random.default_rng(seed + 1)
    diffs = _seed_means(a, w, rng) - _seed_means(b, w, rng)
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    return PairedTest(float(a.mean() - b.mean()), (float(lo), float(hi)), _p_greater(diffs), a.shape[1])
