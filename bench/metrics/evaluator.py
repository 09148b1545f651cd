"""The evaluator: Detectron2-style ``reset / process / evaluate`` over (ground truth, prediction) pairs.

Kaggle mAP is computed image by image in ``process`` (sparse, cheap), so nothing but
the instances themselves is kept until ``evaluate`` runs COCO AP and the bootstrap.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from bench.data.errors import DataError
from bench.data.sample import Instances
from bench.metrics import kaggle
from bench.metrics.bootstrap import N_RESAMPLES, bootstrap_ci, bootstrap_ci_stat
from bench.metrics.coco import check_max_dets, coco_eval, match_table, weighted_ap


class InstanceSegEvaluator:
    """Scores predictions against ground truth with the Kaggle metric, COCO AP and breakdowns.

    ``classes`` is the dataset's class list; an image's class is its ground-truth cell
    type, so class-agnostic and class-aware models are broken down the same way.
    """

    def __init__(self, classes: Sequence[str], max_dets: int = 1000, resolve_overlaps: bool = False,
                 class_aware_coco: bool = False, n_resamples: int = N_RESAMPLES, seed: int = 0,
                 with_coco: bool = True):
        check_max_dets(max_dets)
        if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
            raise ValueError(f"n_resamples must be an integer >= 1, got {n_resamples!r}")
        self.classes = list(classes)
        self.max_dets = max_dets
        self.resolve = resolve_overlaps
        self.class_aware = class_aware_coco
        self.n_resamples, self.seed = n_resamples, seed
        self.with_coco = with_coco
        self.reset()

    def reset(self) -> None:
        self._scores: dict[str, kaggle.ImageScore] = {}
        self._class_of: dict[str, str] = {}
        self._pairs: list[tuple[str, Instances, Instances]] = []
        self._mt = None  # COCO's match table (class-agnostic), kept by evaluate() for breakdown()

    def process(self, image_id: str, gt: Instances, pred: Instances, cell_type: str | None = None) -> None:
        if image_id in self._scores:
            raise DataError(f"image {image_id}", "scored twice")
        if pred.scores is None:
            pred = Instances(pred.height, pred.width, pred.counts, pred.classes, np.ones(len(pred)), _runs=pred._runs)
        if not np.isfinite(pred.scores).all():
            raise DataError(f"image {image_id}", "a prediction score is NaN or infinite")
        if (gt.height, gt.width) != (pred.height, pred.width):
            raise DataError(f"image {image_id}", f"prediction size {pred.width}x{pred.height} differs from "
                                                 f"ground truth {gt.width}x{gt.height}")
        pred = kaggle.check_or_resolve_overlaps(pred, image_id, self.resolve)
        self._scores[image_id] = kaggle.score_checked(gt, pred)
        self._class_of[image_id] = cell_type or _majority_class(gt, self.classes)
        if self.with_coco:
            self._pairs.append((image_id, gt, pred))

    def evaluate(self) -> dict:
        ids = list(self._scores)
        if not ids:
            raise ValueError("nothing to evaluate: no images were processed")
        per_image = {i: self._scores[i].score for i in ids}
        vals = np.array([per_image[i] for i in ids])
        prec = np.stack([self._scores[i].precision for i in ids])  # (n, T)
        tp = sum(self._scores[i].tp for i in ids)
        fp = sum(self._scores[i].fp for i in ids)
        fn = sum(self._scores[i].fn for i in ids)
        out: dict = {
            "n_images": len(ids),
            "kaggle_map": float(vals.mean()),
            "kaggle_map_ci95": list(bootstrap_ci(vals, self.n_resamples, self.seed)),
            "per_threshold": {f"{t:.2f}": float(prec[:, k].mean()) for k, t in enumerate(kaggle.THRESHOLDS)},
            "counts_per_threshold": {f"{t:.2f}": {"tp": int(tp[k]), "fp": int(fp[k]), "fn": int(fn[k])}
                                     for k, t in enumerate(kaggle.THRESHOLDS)},
            "per_image": per_image,
            "image_class": dict(self._class_of),
        }
        by_cls: dict[str, list[float]] = defaultdict(list)
        for i in ids:
            by_cls[self._class_of[i]].append(per_image[i])
        out["per_class"] = {c: float(np.mean(v)) for c, v in sorted(by_cls.items())}
        out["per_class_ci95"] = {c: list(bootstrap_ci(np.array(v), self.n_resamples, self.seed))
                                 for c, v in sorted(by_cls.items())}
        out["per_class_n_images"] = {c: len(v) for c, v in sorted(by_cls.items())}
        if self.with_coco:
            out["coco"] = self._coco()
        return out

    def _coco(self) -> dict:
        summary, E = coco_eval(self._pairs, len(self.classes), self.max_dets, self.class_aware)
        summary["class_aware"] = self.class_aware
        groups: dict[str, list[int]] = defaultdict(list)
        for pos, p in enumerate(self._pairs):
            groups[self._class_of[p[0]]].append(pos)
        if self.class_aware:  # AP of each predicted category
            prec = E.eval["precision"][:, :, :, 0, -1]
            summary["per_class_AP"] = {self.classes[k]: _mean_valid(prec[:, :, k]) for k in range(prec.shape[2])}
        else:
            # per-class AP = AP over that class's images; pycocotools' accumulate(p) with a subset of
            # imgIds indexes the wrong images, so re-accumulate from the match table with 0/1 weights
            mt = self._mt = match_table(E)
            n = len(self._pairs)
            summary["per_class_AP"] = {}
            for c, pos in sorted(groups.items()):
                w = np.zeros(n)
                w[pos] = 1
                summary["per_class_AP"][c] = float(np.nanmean(weighted_ap(mt, w)))
            ap_ci, ap50_ci = bootstrap_ci_stat(
                n, lambda w: _ap_and_ap50(weighted_ap(mt, w)), self.n_resamples, self.seed)
            summary["AP_ci95"], summary["AP50_ci95"] = list(ap_ci), list(ap50_ci)
        return summary


    def breakdown(self, attribute: str, groups: dict[str, str]) -> dict:
        """Scores per value of a per-image attribute (after :meth:`evaluate`): Kaggle mAP with
        its CI, images, ground-truth and predicted cells, TP/FP/FN at IoU 0.5, COCO AP and AP50."""
        from bench.metrics.breakdown import breakdown

        pos = {p[0]: k for k, p in enumerate(self._pairs)}
        n_gt = {p[0]: len(p[1]) for p in self._pairs}
        n_pred = {p[0]: len(p[2]) for p in self._pairs}

        def extra(ids: list[str]) -> dict:
            sc = [self._scores[i] for i in ids]
            out = {"tp50": int(sum(s.tp[0] for s in sc)), "fp50": int(sum(s.fp[0] for s in sc)),
                   "fn50": int(sum(s.fn[0] for s in sc))}
            if self._mt is not None:
                w = np.zeros(len(self._pairs))
                w[[pos[i] for i in ids]] = 1
                ap = weighted_ap(self._mt, w)
                out["coco_AP"], out["coco_AP50"] = float(np.nanmean(ap)), float(ap[0])
            return out

        per_image = {i: self._scores[i].score for i in self._scores}
        return breakdown(per_image, groups, attribute, n_gt if self.with_coco else None,
                         n_pred if self.with_coco else None, extra, self.n_resamples, self.seed)


def _ap_and_ap50(per_threshold: np.ndarray) -> np.ndarray:
    return np.array([np.nanmean(per_threshold), per_threshold[0]])


def _mean_valid(p: np.ndarray) -> float:
    p = p[p > -1]
    return float(p.mean()) if p.size else float("nan")


def _majority_class(gt: Instances, classes: Sequence[str]) -> str:
    cl = gt.classes[gt.classes >= 0]
    return classes[int(np.bincount(cl).argmax())] if cl.size else "all"


def evaluate_predictions(gt: dict[str, tuple[Instances, str]], pred: dict[str, Instances], classes: Sequence[str],
                         breakdown: tuple[str, dict[str, str]] | None = None, **kw) -> dict:
    """Score a whole prediction set. Images missing from ``pred`` score 0 and are counted;
    ids in ``pred`` unknown to the ground truth are an error. ``breakdown``: (attribute,
    image id -> value) adds ``res["breakdown"]`` (scores per value)."""
    unknown = sorted(set(pred) - set(gt))
    if unknown:
        raise DataError("predictions", f"{len(unknown)} image id(s) not in the ground truth, e.g. {unknown[:3]}")
    ev = InstanceSegEvaluator(classes, **kw)
    missing = []
    for iid, (g, ct) in gt.items():
        p = pred.get(iid)
        if p is None:
            missing.append(iid)
            p = Instances.empty(g.height, g.width)
        ev.process(iid, g, p, ct)
    res = ev.evaluate()
    res["missing_predictions"] = missing
    if breakdown is not None:
        res["breakdown"] = ev.breakdown(*breakdown)
    return res
