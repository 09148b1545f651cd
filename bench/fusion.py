"""Fusing instance sets of one image by mask IoU: the one merge behind TTA and ensembles.

Box-based fusion (NMS, WBF on boxes; MMDetection's result merging, Detectron2's TTA) decides
on boxes, which for touching, elongated or overlapping cells say little about the masks.
Here every decision is made on masks, sparsely (no dense H x W stacks):

1. **Clustering.** All instances of all sets, best weighted score first, join the cluster
   whose leader (its first, best instance) they overlap with mask IoU >= ``iou_thr``, at
   most one instance per set and cluster (a set never votes twice for one cell); an
   instance overlapping no free leader starts a cluster.
2. **Fusing a cluster** (``method``; weights ``w`` normalised to sum 1 over the sets):

   * ``score-average``: mask = pixels whose w-weighted vote among the present instances
     is >= ``pixel_thr`` of the present weight; score = sum of w * score over *all* sets (an
     absent set scores 0, so an instance one model alone sees is down-weighted).
   * ``mask-vote``: mask = pixels voted by >= ``pixel_thr`` of the *total* weight (absent
     sets vote no: a majority of models must draw the pixel, so a cell seen by a minority
     disappears); score = mean w-weighted score of the present instances.
   * ``wbf-masks``: weighted-boxes-fusion with masks: pixel vote weighted by w * score
     (confident instances shape the mask), kept at >= ``pixel_thr`` of the present w * score;
     score = the present instances' w-weighted mean score x (present sets / all sets).

   The class is the w * score-weighted majority of the present instances' classes (-1 when
   none has a class). Clusters whose fused mask is empty are dropped.

Fusing one set returns it unchanged (``score-average``, ``mask-vote``), and fusing a set
with copies of itself returns it too: tests pin both.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.sparse as sp

from bench.data import rle
from bench.data.sample import Instances
from bench.metrics.matching import mask_overlaps

METHODS = ("score-average", "mask-vote", "wbf-masks")
EPS = 1e-9


def normalise_weights(weights: Sequence[float] | None, n: int) -> np.ndarray:
    """Weights for ``n`` sets, summing to 1; ValueError for a wrong count or a bad value."""
    if weights is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(list(weights), dtype=float)
    if w.shape != (n,):
        raise ValueError(f"{len(w)} weight(s) for {n} instance set(s): give one weight per model")
    if not np.all(np.isfinite(w)) or (w < 0).any():
        raise ValueError(f"weights must be finite and >= 0, got {list(w)}")
    if w.sum() <= 0:
        raise ValueError(f"weights sum to 0 ({list(w)}): at least one model must count")
    return w / w.sum()


def _check_sizes(sets: Sequence[Instances]) -> tuple[int, int]:
    if not sets:
        raise ValueError("nothing to fuse (no instance sets)")
    h, w = sets[0].height, sets[0].width
    bad = [(s.height, s.width) for s in sets if (s.height, s.width) != (h, w)]
    if bad:
        raise ValueError(f"instance sets of different image sizes: {h}x{w} and {bad[0][0]}x{bad[0][1]} (HxW)")
    return h, w


def _scores(s: Instances) -> np.ndarray:
    return np.ones(len(s)) if s.scores is None else np.asarray(s.scores, dtype=float)


def cluster(sets: Sequence[Instances], weights: np.ndarray, iou_thr: float = 0.5) -> list[list[tuple[int, int]]]:
    """Clusters of (set, instance) pairs, leader first; see the module doc."""
    h, w = _check_sizes(sets)
    owner = np.concatenate([np.full(len(s), k) for k, s in enumerate(sets)]).astype(np.int64) if sets else []
    index = np.concatenate([np.arange(len(s)) for s in sets]).astype(np.int64)
    if len(index) == 0:
        return []
    wscore = np.concatenate([weights[k] * _scores(s) for k, s in enumerate(sets)])
    counts = [c for s in sets for c in s.counts]
    ov = mask_overlaps(counts, counts, h, w)
    iou = sp.csr_matrix((ov.iou, (ov.gt_idx, ov.pred_idx)), shape=(len(counts), len(counts)))
    order = np.lexsort((index, owner, -wscore))  # best first; ties: set order, then instance order
    cluster_of = np.full(len(counts), -1)        # leader -> its cluster
    clusters: list[list[int]] = []
    sets_in: list[set[int]] = []
    for i in order:
        row = iou.getrow(i)
        best, best_iou = -1, -1.0
        for j, v in zip(row.indices, row.data):
            c = cluster_of[j]
            if j == i or c < 0 or v < iou_thr - EPS or owner[i] in sets_in[c]:
                continue
            if v > best_iou + EPS or (abs(v - best_iou) <= EPS and c < best):  # ties: the older cluster
                best, best_iou = int(c), float(v)
        if best < 0:
            cluster_of[i] = len(clusters)
            clusters.append([i])
            sets_in.append({int(owner[i])})
        else:
            clusters[best].append(i)
            sets_in[best].add(int(owner[i]))
    return [[(int(owner[i]), int(index[i])) for i in c] for c in clusters]


def _vote(pixels: list[np.ndarray], votes: Sequence[float], need: float, n_pixels: int) -> np.ndarray:
    """Counts of the pixels whose summed vote reaches ``need``."""
    if len(pixels) == 1:
        return rle.counts_from_indices(pixels[0] if votes[0] >= need - EPS else pixels[0][:0], n_pixels)
    idx = np.concatenate(pixels)
    wts = np.concatenate([np.full(len(p), v) for p, v in zip(pixels, votes)])
    uniq, inv = np.unique(idx, return_inverse=True)
    total = np.bincount(inv, weights=wts, minlength=len(uniq))
    return rle.counts_from_indices(uniq[total >= need - EPS], n_pixels)


def fuse_sets(sets: Sequence[Instances], weights: Sequence[float] | None = None, method: str = "score-average",
              iou_thr: float = 0.5, pixel_thr: float = 0.5) -> Instances:
    """One instance set from several predictions of the same image (see the module doc)."""
    if method not in METHODS:
        raise ValueError(f"unknown fusion method {method!r} (one of {', '.join(METHODS)})")
    if not 0 < iou_thr <= 1 or not 0 < pixel_thr <= 1:
        raise ValueError(f"iou_thr and pixel_thr must be in (0, 1], got {iou_thr} and {pixel_thr}")
    h, w = _check_sizes(sets)
    wts = normalise_weights(weights, len(sets))
    n_sets, n_pixels = len(sets), h * w
    out_counts, out_scores, out_classes = [], [], []
    for members in cluster(sets, wts, iou_thr):
        ks = [k for k, _ in members]
        pix = [rle.pixel_indices(sets[k].counts[i]) for k, i in members]
        s = np.array([_scores(sets[k])[i] for k, i in members])
        wm = wts[ks]
        present = float(wm.sum())
        if method == "score-average":
            counts = _vote(pix, wm, pixel_thr * present, n_pixels)
            score = float((wm * s).sum())
        elif method == "mask-vote":
            counts = _vote(pix, wm, pixel_thr * 1.0, n_pixels)
            score = float((wm * s).sum() / present) if present > 0 else 0.0
        else:  # wbf-masks
            ws = wm * s
            counts = _vote(pix, ws if ws.sum() > 0 else wm, pixel_thr * float(ws.sum() if ws.sum() > 0 else present),
                           n_pixels)
            score = float(ws.sum() / present * len(ks) / n_sets) if present > 0 else 0.0
        if rle.area(counts) == 0:
            continue
        cl = np.array([sets[k].classes[i] for k, i in members])
        has = cl >= 0
        out_classes.append(int(np.bincount(cl[has], weights=(wm * s + EPS)[has]).argmax()) if has.any() else -1)
        out_counts.append(counts)
        out_scores.append(score)
    order = np.argsort(-np.asarray(out_scores), kind="stable")
    return Instances(h, w, [out_counts[i] for i in order], np.asarray(out_classes, dtype=np.int64)[order],
                     np.asarray(out_scores, dtype=float)[order])
