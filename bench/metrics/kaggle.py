"""The Sartorius competition metric, exactly.

For t in 0.50..0.95 (step 0.05) a gt/pred pair matches when IoU > t (strict). A gt
with exactly one match is a TP, a gt with none a FN, a pred with none a FP; the
image scores mean_t TP/(TP+FP+FN); the dataset scores the mean over images. IoU is
computed on the raw masks (gt may overlap); predictions may not overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.data import rle
from bench.data.errors import DataError
from bench.data.sample import Instances
from bench.metrics.matching import overlapping_pixels, overlaps_disjoint_pred

THRESHOLDS = np.round(np.arange(0.5, 1.0, 0.05), 2)


@dataclass
class ImageScore:
    """Kaggle result of one image: per-threshold counts and the image score."""

    tp: np.ndarray  # (T,)
    fp: np.ndarray
    fn: np.ndarray
    precision: np.ndarray  # (T,) TP/(TP+FP+FN)

    @property
    def score(self) -> float:
        return float(self.precision.mean())


def match_counts(gt_idx: np.ndarray, pred_idx: np.ndarray, iou: np.ndarray, n_gt: int, n_pred: int,
                 thresholds: np.ndarray = THRESHOLDS) -> ImageScore:
    """TP/FP/FN per threshold from the non-zero IoU pairs of one image."""
    T = len(thresholds)
    tp, fp, fn = np.zeros(T, np.int64), np.zeros(T, np.int64), np.zeros(T, np.int64)
    for k, t in enumerate(thresholds):
        m = iou > t
        g = np.bincount(gt_idx[m], minlength=n_gt)
        p = np.bincount(pred_idx[m], minlength=n_pred)
        tp[k], fn[k], fp[k] = int((g == 1).sum()), int((g == 0).sum()), int((p == 0).sum())
    denom = tp + fp + fn
    prec = np.divide(tp, denom, out=np.zeros(T), where=denom > 0)
    if n_pred == 0:
        prec[:] = 0.0  # an image with no predictions scores 0
    return ImageScore(tp, fp, fn, prec)


def score_image(gt: Instances, pred: Instances, image_id: str = "?", resolve_overlaps: bool = False,
                thresholds: np.ndarray = THRESHOLDS) -> ImageScore:
    if (gt.height, gt.width) != (pred.height, pred.width):
        raise DataError(f"image {image_id}", f"prediction size {pred.width}x{pred.height} differs from "
                                             f"ground truth {gt.width}x{gt.height}")
    pred = check_or_resolve_overlaps(pred, image_id, resolve_overlaps)
    return score_checked(gt, pred, thresholds)


def score_checked(gt: Instances, pred: Instances, thresholds: np.ndarray = THRESHOLDS) -> ImageScore:
    """Score predictions already known not to overlap."""
    ov = overlaps_disjoint_pred(gt.counts, pred.counts, gt.height, gt.width, gt.runs(), pred.runs())
    return match_counts(ov.gt_idx, ov.pred_idx, ov.iou, len(gt), len(pred), thresholds)


def check_or_resolve_overlaps(pred: Instances, image_id: str, resolve: bool) -> Instances:
    """The competition rejects overlapping predictions: error, or give each pixel to the best score."""
    n = overlapping_pixels(pred.counts, pred.runs())
    if n == 0:
        return pred
    if not resolve:
        raise DataError(f"image {image_id}", f"predicted masks overlap ({n} pixels claimed twice); "
                                             "the Kaggle metric rejects overlaps: use --resolve-overlaps")
    return resolve_overlaps(pred)


def resolve_overlaps(pred: Instances) -> Instances:
    """Each pixel goes to the highest-scoring instance that claims it; emptied instances are dropped."""
    return resolve_overlaps_index(pred)[0]


def resolve_overlaps_index(pred: Instances) -> tuple[Instances, np.ndarray]:
    """:func:`resolve_overlaps` and the positions in ``pred`` of the instances it kept (the match
    table names predictions by their position in the predictions file)."""
    if len(pred) == 0:
        return pred, np.zeros(0, dtype=np.int64)
    scores = pred.scores if pred.scores is not None else -np.arange(len(pred), dtype=float)
    order = np.argsort(-scores, kind="stable")
    lab = np.zeros(pred.height * pred.width, dtype=np.int32)
    for i in order[::-1]:  # best last, so it wins
        lab[rle.pixel_indices(pred.counts[i])] = i + 1
    ids, counts = rle.encode_label_image(lab.reshape((pred.width, pred.height)).T)
    keep = ids - 1
    out = Instances(pred.height, pred.width, counts, pred.classes[keep],
                    None if pred.scores is None else pred.scores[keep])
    order = np.argsort(keep, kind="stable")
    return out.subset(order), keep[order].astype(np.int64)  # original order


def quick_map(gts: list[Instances], preds: list[Instances]) -> float:
    """Kaggle mAP of a prediction list against its ground truth list (same order), overlaps
    resolved: what validation curves record during training (no COCO, no bootstrap)."""
    if len(gts) != len(preds):
        raise ValueError(f"{len(preds)} predictions for {len(gts)} ground-truth images")
    if not gts:
        return float("nan")
    return float(np.mean([score_image(g, p, resolve_overlaps=True).score for g, p in zip(gts, preds)]))
