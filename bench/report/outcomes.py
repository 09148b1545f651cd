"""What happened to every instance of one image: the per-instance outcomes the HTML report draws.

Each ground-truth cell and each prediction gets one outcome at an IoU threshold (default 0.5,
match when IoU > t as in the Kaggle metric):

- ``matched``: the pair's IoU exceeds the threshold (both sides);
- ``split`` (ground truth): unmatched, and two or more predictions each lie mostly (>= half of
  their area) inside it; those predictions are ``split`` too;
- ``merge`` (prediction): unmatched, and two or more ground-truth cells each lie mostly inside
  it; those cells are ``merge`` too;
- ``missed`` (ground truth) / ``spurious`` (prediction): unmatched and neither of the above.

Why here and so small: the report needs these outcomes per instance, with the best partner's
IoU for hovering. :func:`image_outcomes` is the one place the report asks for them, so that a
fuller match table (bench.metrics, issue 16) can replace it without touching the page code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.data.sample import Instances
from bench.metrics.matching import mask_overlaps, overlaps_disjoint_pred

GT_OUTCOMES = ("matched", "missed", "split", "merge")
PRED_OUTCOMES = ("matched", "spurious", "split", "merge")
MOSTLY_INSIDE = 0.5  # a part counts towards a split/merge when this share of its area is inside the other


@dataclass
class ImageOutcomes:
    """Outcome, best partner (-1: none) and best IoU of every gt and predicted instance of one image."""

    gt_outcome: list[str]
    gt_partner: np.ndarray
    gt_iou: np.ndarray
    pred_outcome: list[str]
    pred_partner: np.ndarray
    pred_iou: np.ndarray

    def counts(self) -> dict[str, int]:
        """Cells per outcome: gt matched/missed/split/merge plus predictions spurious."""
        out = {k: self.gt_outcome.count(k) for k in GT_OUTCOMES}
        out["spurious"] = self.pred_outcome.count("spurious")
        return out


def _best(idx: np.ndarray, other: np.ndarray, iou: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per instance of one side: the partner with the highest IoU (-1 when nothing touches) and that IoU."""
    partner, best = np.full(n, -1, dtype=np.int64), np.zeros(n)
    order = np.lexsort((-iou, idx))  # by instance, best IoU first
    first = np.r_[True, idx[order][1:] != idx[order][:-1]] if order.size else np.zeros(0, bool)
    pick = order[first]
    partner[idx[pick]], best[idx[pick]] = other[pick], iou[pick]
    return partner, best


def _runs_disjoint(inst: Instances) -> bool:
    """Whether no two runs of the masks share a pixel (then no two masks overlap); cheap, no pixels."""
    starts, lengths, _ = inst.runs()
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], (starts + lengths)[order]
    return not (s[1:] < np.maximum.accumulate(e)[:-1]).any()


def image_outcomes(gt: Instances, pred: Instances, iou_threshold: float = 0.5) -> ImageOutcomes:
    """Outcomes of one image's instances (see the module docstring for the definitions)."""
    if _runs_disjoint(pred):  # the usual case: one label-image lookup
        ov = overlaps_disjoint_pred(gt.counts, pred.counts, gt.height, gt.width, gt.runs(), pred.runs())
    else:  # overlapping masks need the general sparse product
        ov = mask_overlaps(gt.counts, pred.counts, gt.height, gt.width)
    iou = ov.iou
    g_partner, g_iou = _best(ov.gt_idx, ov.pred_idx, iou, len(gt))
    p_partner, p_iou = _best(ov.pred_idx, ov.gt_idx, iou, len(pred))
    g_out = np.where(g_iou > iou_threshold, "matched", "missed").astype(object)
    p_out = np.where(p_iou > iou_threshold, "matched", "spurious").astype(object)
    # split: an unmatched cell holding >= 2 predictions that lie mostly inside it
    inside_gt = ov.inter >= MOSTLY_INSIDE * ov.pred_area[ov.pred_idx]
    # merge: an unmatched prediction holding >= 2 cells that lie mostly inside it
    inside_pred = ov.inter >= MOSTLY_INSIDE * ov.gt_area[ov.gt_idx]
    for k in np.flatnonzero(np.bincount(ov.gt_idx[inside_gt], minlength=len(gt)) >= 2):
        if g_out[k] == "missed":
            g_out[k] = "split"
            for p in ov.pred_idx[inside_gt & (ov.gt_idx == k)]:
                if p_out[p] == "spurious":
                    p_out[p] = "split"
    for k in np.flatnonzero(np.bincount(ov.pred_idx[inside_pred], minlength=len(pred)) >= 2):
        if p_out[k] == "spurious":
            p_out[k] = "merge"
            for g in ov.gt_idx[inside_pred & (ov.pred_idx == k)]:
                if g_out[g] == "missed":
                    g_out[g] = "merge"
    return ImageOutcomes(list(g_out), g_partner, g_iou, list(p_out), p_partner, p_iou)
