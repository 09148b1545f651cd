"""What happened to every instance of one image, as the HTML report draws it, from the match table.

The outcomes and their definitions are the match table's (:mod:`bench.metrics.matches`: matched,
missed, split, merge, poor boundary, duplicate, spurious at IoU 0.5). This module only reshapes
one model's table into per-image arrays indexed like the ground truth and the predictions file,
so that the page code can colour mask ``k`` of the file by ``pred_outcome[k]``.

A run that already has ``matches.csv.gz`` is read; an older run's table is computed here from
the stored predictions, in memory: the report never writes into run folders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.data.sample import Instances


@dataclass
class ImageOutcomes:
    """Outcome, best partner (-1: none) and its IoU of every gt and predicted instance of one image.

    A prediction the metrics never saw (it lost all its pixels to higher-scoring overlapping
    masks when overlaps were resolved) has the outcome "" and is not drawn.
    """

    gt_outcome: list[str]
    gt_partner: np.ndarray
    gt_iou: np.ndarray
    pred_outcome: list[str]
    pred_partner: np.ndarray
    pred_iou: np.ndarray

    @classmethod
    def empty(cls, n_gt: int, n_pred: int) -> "ImageOutcomes":
        return cls([""] * n_gt, np.full(n_gt, -1), np.zeros(n_gt), [""] * n_pred, np.full(n_pred, -1),
                   np.zeros(n_pred))

    def counts(self) -> dict[str, dict[str, int]]:
        """Instances per outcome, ground truth and predictions apart."""
        return {"gt": _count(self.gt_outcome), "pred": _count(self.pred_outcome)}


def _count(labels: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in labels:
        if x:
            out[x] = out.get(x, 0) + 1
    return out


def model_table(run_dir: Path, label: str, samples: list, preds: dict[str, Instances], classes: list[str]):
    """The model's match table: its saved file, else computed from ``preds`` (nothing written)."""
    from bench.metrics.matches import MatchTable, images_for_predictions
    from bench.store import RunDir

    md = RunDir(run_dir).resolve(label)
    if md.matches.is_file() and md.match_pairs.is_file():
        return MatchTable.read(md.matches, md.match_pairs)
    resolve = bool(md.read_job().resolve_overlaps) if md.job.is_file() else True
    gt = {s.image_id: (s.instances, s.cell_type(classes)) for s in samples}
    return MatchTable.from_images(md.label, images_for_predictions(gt, preds, resolve), classes)


def per_image(table, samples: list, preds: dict[str, Instances]) -> dict[str, ImageOutcomes]:
    """One model's table as :class:`ImageOutcomes` per image, indexed like the gt and the predictions file."""
    inst = table.instances
    order = np.argsort(inst["image_id"], kind="stable")
    ids = inst["image_id"][order]
    out = {}
    for s in samples:
        lo, hi = np.searchsorted(ids, s.image_id, "left"), np.searchsorted(ids, s.image_id, "right")
        rows = order[lo:hi]
        n_pred = len(preds.get(s.image_id, ())) if s.image_id in preds else 0
        oc = ImageOutcomes.empty(len(s.instances), n_pred)
        for side, outcome, partner, iou in (("gt", oc.gt_outcome, oc.gt_partner, oc.gt_iou),
                                            ("pred", oc.pred_outcome, oc.pred_partner, oc.pred_iou)):
            r = rows[inst["side"][rows] == side]
            idx = inst["idx"][r]
            ok = idx < len(outcome)
            for k, o in zip(idx[ok].tolist(), inst["outcome"][r][ok].tolist()):
                outcome[k] = o
            partner[idx[ok]] = inst["partner"][r][ok]
            iou[idx[ok]] = inst["iou"][r][ok]
        out[s.image_id] = oc
    return out
