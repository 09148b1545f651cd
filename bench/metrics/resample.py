"""Bootstrap resamples as one weight matrix, clustered when images come in groups, and every
statistic computed for all resamples at once.

Why clusters: images of one well or sample (Sartorius ``sample_id``, a LIVECell well) share a
culture, a day and a focus; they are not independent, and resampling them one by one makes the
intervals too narrow. With groups, whole groups are drawn with replacement and every image
of a drawn group counts as often as its group was drawn (the clustered bootstrap).

Why one matrix: the COCO-AP bootstrap used to run pycocotools' accumulate logic once per
resample in Python (2.4 of the 3.4 s of ``bench eval`` on 63 images); :func:`weighted_ap_many`
does the cumulative sums, precision envelopes and recall look-ups for blocks of resamples as
array operations and equals :func:`bench.metrics.coco.weighted_ap` resample by resample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from bench.data.errors import DataError
from bench.metrics.bootstrap import N_RESAMPLES, resample_weights


@dataclass
class Resamples:
    """(B x n_images) multiplicities and what was resampled."""

    weights: np.ndarray
    unit: str            # "images" or "<attribute> (k groups)"
    n_groups: int

    def describe(self) -> str:
        return f"{len(self.weights)} resamples of {self.unit}"


def cluster_weights(groups: Sequence[str], n_resamples: int = N_RESAMPLES, seed: int = 0) -> np.ndarray:
    """Resample whole groups; an image's weight is the number of times its group was drawn."""
    _, inv = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    wg = resample_weights(int(inv.max()) + 1 if len(inv) else 0, n_resamples, seed)
    return wg[:, inv]


def make_resamples(image_ids: Sequence[str], groups: dict[str, str] | None, attr: str | None,
                   n_resamples: int = N_RESAMPLES, seed: int = 0) -> Resamples:
    """Images resampled one by one (no groups, or every group a single image), else by group."""
    n = len(image_ids)
    if groups is not None:
        g = [groups[i] for i in image_ids]
        k = len(set(g))
        if k < n:
            return Resamples(cluster_weights(g, n_resamples, seed), f"{attr or 'group'} ({k} groups)", k)
    return Resamples(resample_weights(n, n_resamples, seed), "images", n)


def groups_from_meta(samples, attr: str) -> dict[str, str]:
    """image id -> value of ``attr`` in each sample's metadata; an error naming the images without it."""
    out, lacking = {}, []
    for s in samples:
        v = s.meta.get(attr)
        if v is None or (isinstance(v, str) and not v.strip()):
            lacking.append(s.image_id)
        else:
            out[s.image_id] = str(v)
    if lacking:
        have = sorted({k for s in samples for k, v in s.meta.items() if v not in (None, "")} - {"source"})
        raise DataError("--cluster", f"{len(lacking)} of {len(out) + len(lacking)} image(s) have no {attr!r} "
                                     f"(e.g. {', '.join(lacking[:3])}); attributes every image has: "
                                     f"{', '.join(k for k in have if all(s.meta.get(k) not in (None, '') for s in samples)) or 'none'}")
    return out


def cluster_option(samples, cluster: str) -> tuple[dict[str, str] | None, str | None]:
    """``--cluster``: "auto" (sample/well groups, used when some group has several images),
    "none" (images), or an attribute every image must have."""
    if cluster == "none":
        return None, None
    if cluster == "auto":
        return {s.image_id: s.group for s in samples}, "sample_id/well"
    return groups_from_meta(samples, cluster), cluster


def paired_clustered(a: dict[str, float], b: dict[str, float], groups: dict[str, str],
                     n_resamples: int = N_RESAMPLES, seed: int = 0):
    """:func:`bench.metrics.bootstrap.paired_bootstrap` with whole groups of images resampled
    (the images both models were scored on; an image without a group is its own group)."""
    from bench.metrics.bootstrap import PairedTest, _p_greater

    ids = sorted(set(a) & set(b))
    if not ids:
        raise ValueError("no images in common between the two prediction sets")
    d = np.array([a[i] - b[i] for i in ids])
    W = cluster_weights([groups.get(i, f"image:{i}") for i in ids], n_resamples, seed)
    means = (W @ d) / W.sum(1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return PairedTest(float(d.mean()), (float(lo), float(hi)), _p_greater(means), len(ids))


def quantile_ci(vals: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    v = np.asarray(vals, float)
    v = v[np.isfinite(v)]
    if not v.size:
        return (float("nan"), float("nan"))
    a = (1 - level) / 2
    lo, hi = np.quantile(v, [a, 1 - a])
    return float(lo), float(hi)


def mean_ci(values: np.ndarray, W: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """CI of the (weighted) mean of per-image values; NaN values (undefined images) left out."""
    v = np.asarray(values, float)
    ok = np.isfinite(v)
    if not ok.any():
        return (float("nan"), float("nan"))
    Wk = W[:, ok]
    den = Wk.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (Wk @ v[ok]) / den
    return quantile_ci(means, level)


def ratio_ci(num: np.ndarray, den: np.ndarray, W: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """CI of a pooled ratio sum(num)/sum(den) over images (e.g. mean matched IoU)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (W @ np.asarray(num, float)) / (W @ np.asarray(den, float))
    return quantile_ci(r, level)


def _runs(tp: np.ndarray, counted: np.ndarray, det_image: np.ndarray, n_images: int):
    """Runs of consecutive true positives at one threshold, as two sparse (runs x images) count
    matrices: TPs in each run, and detections counted (TP or FP) since the previous run's end."""
    import scipy.sparse as sp

    nxt = np.r_[tp[1:], False]
    ends = np.flatnonzero(tp & ~nxt)
    E = len(ends)
    starts = tp & ~np.r_[False, tp[:-1]]
    run_of = np.cumsum(starts) - 1
    k = np.flatnonzero(tp)
    S = sp.csr_matrix((np.ones(len(k)), (run_of[k], det_image[k])), shape=(E, n_images))
    c = np.flatnonzero(counted)
    seg = np.searchsorted(ends, c, side="left")        # the run end each counted detection precedes
    ok = seg < E
    G = sp.csr_matrix((np.ones(int(ok.sum())), (seg[ok], det_image[c[ok]])), shape=(E, n_images))
    return S, G


def count_at_most(thr: np.ndarray, x: np.ndarray) -> np.ndarray:
    """How many of the sorted thresholds are <= x, elementwise, as floats: the same numbers as
    ``np.searchsorted(thr, x, "right")``.

    For evenly spaced thresholds from 0 to 1 (pycocotools' recall thresholds) and x >= 0 the
    count is floor(x * m) + 1, capped at m + 1; only where x * m lies within 1e-6 of an integer
    (x on or next to a threshold, where rounding decides) is it looked up by binary search.
    Several times faster than a binary search per element."""
    m = len(thr) - 1
    if m < 1 or not np.allclose(thr, np.linspace(0, 1, m + 1), rtol=0, atol=1e-12) or np.nanmin(x, initial=0) < 0:
        return np.searchsorted(thr, x, side="right").astype(np.float64)
    y = x * m
    J = np.minimum(np.floor(y) + 1, m + 1)
    near = np.abs(y - np.rint(y)) < 1e-6
    if near.any():
        J[near] = np.searchsorted(thr, x[near], side="right")
    return J


def _running(a: np.ndarray, op) -> np.ndarray:
    """Running ``op`` down the rows, in place (row-wise vector operations: for a C-ordered
    (rows x resamples) array this is several times faster than ``np.cumsum(axis=0)``)."""
    for i in range(1, len(a)):
        op(a[i - 1], a[i], out=a[i])
    return a


def weighted_ap_many(mt, W: np.ndarray, max_cells: int = 1_000_000) -> np.ndarray:
    """(B x T) per-threshold COCO AP for every row of image weights W (B x n_images).

    Equal to :func:`bench.metrics.coco.weighted_ap` row by row (pycocotools' accumulate; the
    same float operations, only the final mean is summed in another order), with far less work:

    * recall and precision only rise along a run of consecutive true positives, so the
      precision envelope anywhere in a run equals the one at the run's end, and the first point
      reaching a recall lies in the first run whose end reaches it: only run ends are computed;
    * TP and TP+FP counts at run ends are sparse (runs x images) count matrices times the
      weights, summed down the runs, for a block of resamples at a time;
    * the recall look-ups: with J[e] = number of recall thresholds <= recall at run end e, the
      thresholds first reached at e are J[e] - J[e-1], so AP = sum_e envelope[e] (J[e] - J[e-1]) / R.
    """
    B = len(W)
    T, D = mt.tp.shape
    n_img = len(mt.npig)
    R = len(mt.rec_thrs)
    out = np.zeros((B, T))
    npig = (W @ mt.npig).astype(np.float64)             # (B,)
    if D == 0:
        out[npig == 0] = np.nan
        return out
    runs = [_runs(mt.tp[t], mt.tp[t] | mt.fp[t], mt.det_image, n_img) for t in range(T)]
    e_max = max(S.shape[0] for S, _ in runs)
    block = max(1, max_cells // max(e_max, 1))
    for a in range(0, B, block):
        Wt = np.ascontiguousarray(W[a:a + block].T, dtype=np.float64)       # (n_images, b)
        n = npig[a:a + block]
        for t, (S, G) in enumerate(runs):
            if S.shape[0] == 0:
                continue
            tps = _running(np.ascontiguousarray(S @ Wt), np.add)              # (E, b) at run ends
            den = _running(np.ascontiguousarray(G @ Wt), np.add)
            den += np.spacing(1)
            env = _running(np.divide(tps, den, out=den)[::-1], np.maximum)[::-1]
            with np.errstate(invalid="ignore", divide="ignore"):
                J = count_at_most(mt.rec_thrs, tps / n[None, :])
            J[1:] -= J[:-1].copy()
            out[a:a + len(n), t] = (env * J).sum(axis=0) / R
    out[npig == 0] = np.nan
    return out
