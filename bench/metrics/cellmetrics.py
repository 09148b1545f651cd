"""The metrics of the neighbouring cell benchmarks, from the sparse gt/pred pairs of one image.

Each is defined as its home benchmark computes it (tests check each against an independent
implementation on real annotations):

* **F1, precision, recall at IoU 0.5, NeurIPS-CellSeg 2022** (``compute_metric.py``): TP from
  the assignment that maximises the number of pairs with IoU >= 0.5, ties broken by total IoU
  (cellpose's ``_true_positive``, which that script uses); precision = TP/n_pred, recall =
  TP/n_gt, F1 their harmonic mean, all 0 when TP = 0. Per image, then the mean over images.
  The boundary-cell option removes every gt and predicted cell with a pixel in the image's
  outer 2-pixel frame first (its ``remove_boundary_cells``).
* **Panoptic quality** (Kirillov et al. 2019; per image as HoVer-Net's ``get_fast_pq``): pairs
  with IoU > 0.5 match one to one; SQ = mean IoU of the matches, DQ = TP/(TP + FP/2 + FN/2),
  PQ = SQ x DQ. Per image, mean over images (an image with no gt and no prediction is left out).
* **Aggregated Jaccard index** as ``cellpose.metrics.aggregated_jaccard_index`` computes it:
  the intersections of the pairs assigned as above (every gt assigned, whatever its IoU), summed,
  over the union of gt and predicted foreground. Per image, mean over images.
* **Mean matched IoU** (StarDist's ``mean_matched_score``): the mean IoU of the pairs matched at
  IoU >= 0.5 (same assignment as F1), pooled over all images.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components, min_weight_full_bipartite_matching

from bench.data import rle
from bench.metrics.matches import one_to_one

F1_IOU = 0.5
BORDER = 2   # NeurIPS-CellSeg's remove_boundary_cells frame width


@dataclass
class CellScores:
    """Per-image numbers of the neighbouring benchmarks."""

    tp50: int            # matched at IoU >= 0.5 (cellpose assignment)
    n_gt: int
    n_pred: int
    iou_sum50: float     # sum of IoU of those matches
    precision: float
    recall: float
    f1: float
    pq: float            # NaN when the image has no gt and no prediction
    sq: float
    dq: float
    aji: float           # NaN when neither side has foreground
    f1_boundary_removed: float | None = None   # with NeurIPS' boundary-cell removal (when asked)


def cellpose_assignment(gi: np.ndarray, pj: np.ndarray, iou: np.ndarray, n_gt: int, n_pred: int,
                        th: float = F1_IOU) -> np.ndarray:
    """Pair indices of cellpose's assignment: most pairs with IoU >= th, then the largest total IoU.

    Solved per connected component of the overlap graph (pairs that share no pixel add nothing,
    so the components are independent); one-to-one components are taken as they are.
    """
    if len(gi) == 0:
        return np.zeros(0, np.int64)
    n = n_gt + n_pred
    A = sp.coo_matrix((np.ones(len(gi)), (gi, n_gt + pj)), shape=(n, n))
    _, comp = connected_components(A, directed=False)
    pc = comp[gi]
    size = np.bincount(pc)                        # pairs per component
    simple = size[pc] == 1
    out = [np.flatnonzero(simple)]
    rest = np.flatnonzero(~simple)
    if len(rest):
        order = rest[np.argsort(pc[rest], kind="stable")]
        bounds = np.flatnonzero(np.r_[True, pc[order][1:] != pc[order][:-1], True])
        for a, b in zip(bounds[:-1], bounds[1:]):
            k = order[a:b]
            ug, g_loc = np.unique(gi[k], return_inverse=True)
            up, p_loc = np.unique(pj[k], return_inverse=True)
            M = np.zeros((len(ug), len(up)))
            M[g_loc, p_loc] = iou[k]
            pos = np.full((len(ug), len(up)), -1, np.int64)
            pos[g_loc, p_loc] = k
            r, c = _assign(M, th)
            sel = pos[r, c]
            out.append(sel[sel >= 0])
    return np.sort(np.concatenate(out))


def _assign(M: np.ndarray, th: float) -> tuple[np.ndarray, np.ndarray]:
    """cellpose's linear_sum_assignment on cost -(M >= th) - M / (2 n_min), as a maximum-weight
    full matching of the complete bipartite graph (weights shifted by 1 so that every pair is an
    edge and the matching has min(rows, cols) pairs, as linear_sum_assignment's): the same
    optimum, and scipy.optimize (0.5 s to import) is not needed."""
    g, p = M.shape
    w = 1.0 + (M >= th).astype(float) + M / (2 * max(min(g, p), 1))
    if min(g, p) == 1:        # a star (one cell, several predictions or the reverse): the best pair
        k = int(np.argmax(w))
        return np.array([k // p]), np.array([k % p])
    if g <= 3 and p <= 3:     # small: every matching (at most 6)
        best, pick = -1.0, None
        for perm in itertools.permutations(range(max(g, p)), min(g, p)):
            r, c = (np.arange(g), np.array(perm)) if g <= p else (np.array(perm), np.arange(p))
            v = w[r, c].sum()
            if v > best + 1e-15:
                best, pick = v, (r, c)
        return pick
    r, c = min_weight_full_bipartite_matching(sp.csr_matrix(w), maximize=True)
    return r, c


def border_instances(runs: tuple[np.ndarray, np.ndarray, np.ndarray], n: int, height: int, width: int,
                     border: int = BORDER) -> np.ndarray:
    """Which instances have a pixel in the outer ``border``-pixel frame (column-major runs)."""
    starts, lengths, owner = runs
    out = np.zeros(n, bool)
    if not len(starts):
        return out
    pix = rle.expand_runs(starts, lengths)
    y, x = pix % height, pix // height
    hit = (y < border) | (y >= height - border) | (x < border) | (x >= width - border)
    out[np.repeat(owner, lengths)[hit]] = True
    return out


def _f1(tp: int, n_gt: int, n_pred: int) -> tuple[float, float, float]:
    if tp == 0:
        return 0.0, 0.0, 0.0
    p, r = tp / n_pred, tp / n_gt
    return p, r, 2 * p * r / (p + r)


def cell_scores(gi: np.ndarray, pj: np.ndarray, inter: np.ndarray, gt_area: np.ndarray, pred_area: np.ndarray,
                fg_union: int, gt_border: np.ndarray | None = None, pred_border: np.ndarray | None = None
                ) -> CellScores:
    """All of them for one image. ``fg_union``: pixels in the gt or the predicted foreground."""
    ng, npd = len(gt_area), len(pred_area)
    iou = inter / (gt_area[gi] + pred_area[pj] - inter) if len(gi) else np.zeros(0)
    a = cellpose_assignment(gi, pj, iou, ng, npd)
    ok = a[iou[a] >= F1_IOU]
    tp = len(ok)
    p, r, f1 = _f1(tp, ng, npd)
    m = one_to_one(gi, pj, iou, iou > 0.5)
    tpq, fpq, fnq = len(m), npd - len(m), ng - len(m)
    if tpq + fpq + fnq == 0:
        pq = sq = dq = float("nan")
    else:
        sq = float(iou[m].sum() / tpq) if tpq else 0.0
        dq = tpq / (tpq + 0.5 * fpq + 0.5 * fnq)
        pq = sq * dq
    aji = float(inter[a].sum() / fg_union) if fg_union > 0 else float("nan")
    out = CellScores(tp, ng, npd, float(iou[ok].sum()), p, r, f1, pq, sq, dq, aji)
    if gt_border is not None and pred_border is not None:
        kg, kp = ~gt_border, ~pred_border
        k = kg[gi] & kp[pj]
        gmap, pmap = np.cumsum(kg) - 1, np.cumsum(kp) - 1
        b = cellpose_assignment(gmap[gi[k]], pmap[pj[k]], iou[k], int(kg.sum()), int(kp.sum()))
        out.f1_boundary_removed = _f1(int((iou[k][b] >= F1_IOU).sum()), int(kg.sum()), int(kp.sum()))[2]
    return out


def foreground_union(gt_runs, pred_runs, gt_area_sum: int, pred_area_sum: int, inter_sum: int, gt_disjoint: bool,
                     n_pixels: int) -> int:
    """|gt foreground U predicted foreground|. Predictions are disjoint; when the gt masks are too,
    it is sum(gt) + sum(pred) - sum(pair intersections); else the pixels are counted."""
    if gt_disjoint:
        return int(gt_area_sum + pred_area_sum - inter_sum)
    fg = np.zeros(n_pixels, bool)
    fg[rle.expand_runs(gt_runs[0], gt_runs[1])] = True
    fg[rle.expand_runs(pred_runs[0], pred_runs[1])] = True
    return int(fg.sum())
