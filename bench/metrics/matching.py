"""Sparse mask overlaps: intersections from runs, never a dense (gt x pred x H x W) array.

Each mask becomes a row of a sparse binary matrix over the image's pixels (its
column-major pixel indices, expanded from the runs); ``G @ P.T`` then counts every
gt/pred intersection exactly, overlapping masks on either side included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from bench.data import rle


@dataclass
class Overlaps:
    """Intersections and areas of two mask sets on one image (sparse; zero pairs omitted)."""

    gt_idx: np.ndarray      # pair -> gt index
    pred_idx: np.ndarray    # pair -> pred index
    inter: np.ndarray       # pair -> intersection in pixels
    gt_area: np.ndarray
    pred_area: np.ndarray

    @property
    def iou(self) -> np.ndarray:
        union = self.gt_area[self.gt_idx] + self.pred_area[self.pred_idx] - self.inter
        return self.inter / union

    def dense_iou(self) -> np.ndarray:
        """(n_gt x n_pred) IoU, zeros where masks do not touch."""
        out = np.zeros((len(self.gt_area), len(self.pred_area)))
        out[self.gt_idx, self.pred_idx] = self.iou
        return out


def _indicator(counts: Sequence[np.ndarray], n_pixels: int) -> tuple[sp.csr_matrix, np.ndarray]:
    if not len(counts):
        return sp.csr_matrix((0, n_pixels), dtype=np.int32), np.zeros(0, dtype=np.int64)
    starts, lengths, owner = rle.runs_of_many(list(counts))
    pix = rle.expand_runs(starts, lengths)
    areas = np.bincount(owner, weights=lengths, minlength=len(counts)).astype(np.int64)
    indptr = np.concatenate(([0], np.cumsum(areas)))
    data = np.ones(pix.size, dtype=np.int32)
    return sp.csr_matrix((data, pix, indptr), shape=(len(counts), n_pixels)), areas


def mask_overlaps(gt: Sequence[np.ndarray], pred: Sequence[np.ndarray], height: int, width: int) -> Overlaps:
    n = height * width
    G, ga = _indicator(gt, n)
    P, pa = _indicator(pred, n)
    if G.shape[0] == 0 or P.shape[0] == 0:
        e = np.zeros(0, dtype=np.int64)
        return Overlaps(e, e, e, ga, pa)
    inter = (G @ P.T).tocoo()
    keep = inter.data > 0
    return Overlaps(inter.row[keep].astype(np.int64), inter.col[keep].astype(np.int64),
                    inter.data[keep].astype(np.int64), ga, pa)


def overlaps_disjoint_pred(gt: Sequence[np.ndarray], pred: Sequence[np.ndarray], height: int,
                           width: int, gt_runs=None, pred_runs=None) -> Overlaps:
    """Same result as :func:`mask_overlaps` when predictions do not overlap (the Kaggle case).

    Paints a predicted label image and looks every ground-truth pixel up in it: one
    bincount over the gt pixels instead of a sparse product.
    """
    n = height * width
    gs, gl, go = gt_runs if gt_runs is not None else rle.runs_of_many(list(gt))
    ps, pl, po = pred_runs if pred_runs is not None else rle.runs_of_many(list(pred))
    ga = np.bincount(go, weights=gl, minlength=len(gt)).astype(np.int64)
    pa = np.bincount(po, weights=pl, minlength=len(pred)).astype(np.int64)
    e = np.zeros(0, dtype=np.int64)
    if not len(gt) or not len(pred):
        return Overlaps(e, e, e, ga, pa)
    lab = np.zeros(n, dtype=np.int32)
    lab[rle.expand_runs(ps, pl)] = np.repeat(po + 1, pl)
    hit = lab[rle.expand_runs(gs, gl)]
    owner = np.repeat(go, gl)
    m = hit > 0
    key = owner[m] * len(pred) + (hit[m] - 1)
    if len(gt) * len(pred) <= 4_000_000:  # a dense count beats sorting for image-sized problems
        counts = np.bincount(key, minlength=len(gt) * len(pred))
        uniq = np.flatnonzero(counts)
        inter = counts[uniq]
    else:
        uniq, inter = np.unique(key, return_counts=True)
    return Overlaps(uniq // len(pred), uniq % len(pred), inter.astype(np.int64), ga, pa)


def overlapping_pixels(counts: Sequence[np.ndarray], runs=None) -> int:
    """Pixels claimed by more than one mask (0 for a valid Kaggle prediction set)."""
    if len(counts) < 2:
        return 0
    starts, lengths, _ = runs if runs is not None else rle.runs_of_many(list(counts))
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], (starts + lengths)[order]
    if not (s[1:] < np.maximum.accumulate(e)[:-1]).any():  # runs disjoint: the usual, cheap answer
        return 0
    pix = rle.expand_runs(starts, lengths)
    return int(pix.size - np.unique(pix).size)
