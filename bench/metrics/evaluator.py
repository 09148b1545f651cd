"""The evaluator: Detectron2-style ``reset / process / evaluate`` over (ground truth, prediction) pairs.

Kaggle mAP is computed image by image in ``process`` (sparse, cheap), so nothing but
the instances themselves is kept until ``evaluate`` runs COCO AP and the bootstrap.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Sequence

import numpy as np

from bench.data.errors import DataError
from bench.data.sample import Instances
from bench.metrics import kaggle
from bench.metrics.bootstrap import N_RESAMPLES
from bench.metrics.cellmetrics import CellScores, border_instances, cell_scores, foreground_union
from bench.metrics.coco import check_max_dets, coco_eval, match_table, weighted_ap
from bench.metrics.matches import ImageMatches, MatchTable, image_matches
from bench.metrics.matching import overlapping_pixels, overlaps_disjoint_pred
from bench.metrics.resample import Resamples, make_resamples, mean_ci, ratio_ci, weighted_ap_many


class InstanceSegEvaluator:
    """Scores predictions against ground truth with the Kaggle metric, COCO AP and breakdowns.

    ``classes`` is the dataset's class list; an image's class is its ground-truth cell
    type, so class-agnostic and class-aware models are broken down the same way.
    """

    def __init__(self, classes: Sequence[str], max_dets: int = 1000, resolve_overlaps: bool = False,
                 class_aware_coco: bool = False, n_resamples: int = N_RESAMPLES, seed: int = 0,
                 with_coco: bool = True, groups: dict[str, str] | None = None, cluster: str | None = None,
                 remove_boundary_cells: bool = False, taxonomy_iou: float = 0.5, with_cell: bool = True):
        """``groups`` (image id -> group) makes the bootstrap resample groups (clustered) when some
        group holds several images; ``cluster`` names the attribute they come from (for the report).
        ``remove_boundary_cells``: also report F1 with NeurIPS-CellSeg's boundary-cell removal.
        ``with_cell=False`` leaves out F1/PQ/AJI, the taxonomy and the match table (Kaggle-only timing)."""
        check_max_dets(max_dets)
        if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
            raise ValueError(f"n_resamples must be an integer >= 1, got {n_resamples!r}")
        self.classes = list(classes)
        self.max_dets = max_dets
        self.resolve = resolve_overlaps
        self.class_aware = class_aware_coco
        self.n_resamples, self.seed = n_resamples, seed
        self.with_coco = with_coco
        self.groups, self.cluster = groups, cluster
        self.remove_boundary_cells = remove_boundary_cells
        self.taxonomy_iou = taxonomy_iou
        self.with_cell = with_cell
        self.reset()

    def reset(self) -> None:
        self._scores: dict[str, kaggle.ImageScore] = {}
        self._class_of: dict[str, str] = {}
        self._pairs: list[tuple[str, Instances, Instances]] = []
        self._matches: dict[str, ImageMatches] = {}
        self._cell: dict[str, CellScores] = {}
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
        kept = np.arange(len(pred))
        if overlapping_pixels(pred.counts, pred.runs()):
            kaggle.check_or_resolve_overlaps(pred, image_id, self.resolve)  # an error unless resolving
            pred, kept = kaggle.resolve_overlaps_index(pred)
        ov = overlaps_disjoint_pred(gt.counts, pred.counts, gt.height, gt.width, gt.runs(), pred.runs())
        self._scores[image_id] = kaggle.match_counts(ov.gt_idx, ov.pred_idx, ov.iou, len(gt), len(pred))
        self._class_of[image_id] = cell_type or _majority_class(gt, self.classes)
        if self.with_cell:
            self._matches[image_id] = image_matches(image_id, gt, pred, kept, self._class_of[image_id], ov)
            self._cell[image_id] = self._cell_scores(gt, pred, ov)
        if self.with_coco:
            self._pairs.append((image_id, gt, pred))

    def _cell_scores(self, gt: Instances, pred: Instances, ov) -> CellScores:
        gt_disjoint = overlapping_pixels(gt.counts, gt.runs()) == 0
        fg = foreground_union(gt.runs(), pred.runs(), int(ov.gt_area.sum()), int(ov.pred_area.sum()),
                              int(ov.inter.sum()), gt_disjoint, gt.height * gt.width)
        gb = pb = None
        if self.remove_boundary_cells:
            gb = border_instances(gt.runs(), len(gt), gt.height, gt.width)
            pb = border_instances(pred.runs(), len(pred), gt.height, gt.width)
        return cell_scores(ov.gt_idx, ov.pred_idx, ov.inter, ov.gt_area, ov.pred_area, fg, gb, pb)

    def match_table(self, model: str = "") -> MatchTable:
        """Every processed image's instances and pairs (:mod:`bench.metrics.matches`)."""
        return MatchTable.from_images(model, self._matches.values(), self.classes, self.taxonomy_iou)

    def resamples(self, ids: list[str]) -> Resamples:
        return make_resamples(ids, self.groups, self.cluster, self.n_resamples, self.seed)

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
        rs = self.resamples(ids)
        W = rs.weights
        out: dict = {
            "n_images": len(ids),
            "kaggle_map": float(vals.mean()),
            "kaggle_map_ci95": list(mean_ci(vals, W)),
            "bootstrap": {"unit": rs.unit, "n_resamples": len(W), "n_groups": rs.n_groups, "level": 0.95,
                          "seed": self.seed},
            # image -> group when groups were resampled (the report's paired tests resample them too)
            "image_group": {i: self.groups[i] for i in ids} if rs.unit != "images" else {},
            "per_threshold": {f"{t:.2f}": float(prec[:, k].mean()) for k, t in enumerate(kaggle.THRESHOLDS)},
            "counts_per_threshold": {f"{t:.2f}": {"tp": int(tp[k]), "fp": int(fp[k]), "fn": int(fn[k])}
                                     for k, t in enumerate(kaggle.THRESHOLDS)},
            "per_image": per_image,
            "image_class": dict(self._class_of),
        }
        by_cls: dict[str, list[int]] = defaultdict(list)
        for k, i in enumerate(ids):
            by_cls[self._class_of[i]].append(k)
        out["per_class"] = {c: float(vals[pos].mean()) for c, pos in sorted(by_cls.items())}
        out["per_class_ci95"] = {c: list(mean_ci(vals[pos], W[:, pos])) for c, pos in sorted(by_cls.items())}
        out["per_class_n_images"] = {c: len(v) for c, v in sorted(by_cls.items())}
        if self.with_cell:
            from bench.metrics.taxonomy import taxonomy

            out.update(self._cell_metrics(ids, W))
            out["taxonomy"] = taxonomy([self._matches[i] for i in ids], self.taxonomy_iou)
        if self.with_coco:
            out["coco"] = self._coco(W)
        return out

    def _cell_metrics(self, ids: list[str], W: np.ndarray) -> dict:
        """F1/precision/recall at IoU 0.5, PQ/SQ/DQ, AJI, mean matched IoU: values, 95% CIs, per image."""
        cs = [self._cell[i] for i in ids]
        col = {k: np.array([getattr(c, k) for c in cs], float) for k in ("precision", "recall", "f1", "pq", "sq",
                                                                            "dq", "aji")}
        tp = np.array([c.tp50 for c in cs], float)
        iou_sum = np.array([c.iou_sum50 for c in cs], float)
        cell: dict = {}
        for name, key in (("f1_50", "f1"), ("precision_50", "precision"), ("recall_50", "recall"), ("pq", "pq"),
                          ("sq", "sq"), ("dq", "dq"), ("aji", "aji")):
            v = col[key]
            cell[name] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
            cell[f"{name}_ci95"] = list(mean_ci(v, W))
        cell["mean_matched_iou"] = float(iou_sum.sum() / tp.sum()) if tp.sum() else float("nan")
        cell["mean_matched_iou_ci95"] = list(ratio_ci(iou_sum, tp, W))
        if self.remove_boundary_cells:
            v = np.array([c.f1_boundary_removed for c in cs], float)
            cell["f1_50_boundary_removed"] = float(v.mean())
            cell["f1_50_boundary_removed_ci95"] = list(mean_ci(v, W))
        cell["f1_boundary_cells"] = "kept (also reported removed)" if self.remove_boundary_cells else "kept"
        per_image = {i: {"f1_50": c.f1, "pq": c.pq, "aji": c.aji, "tp50": c.tp50} for i, c in zip(ids, cs)}
        return {"cell": cell, "per_image_cell": per_image}

    def _coco(self, W: np.ndarray | None = None) -> dict:
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
            if W is None:
                W = self.resamples([p[0] for p in self._pairs]).weights
            per_t = weighted_ap_many(mt, W)          # (B, T): every resample at once
            from bench.metrics.resample import quantile_ci

            with warnings.catch_warnings():  # a resample without any gt: NaN, left out of the quantiles
                warnings.simplefilter("ignore", RuntimeWarning)
                summary["AP_ci95"] = list(quantile_ci(np.nanmean(per_t, axis=1)))
            summary["AP50_ci95"] = list(quantile_ci(per_t[:, 0]))
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


def _mean_valid(p: np.ndarray) -> float:
    p = p[p > -1]
    return float(p.mean()) if p.size else float("nan")


def _majority_class(gt: Instances, classes: Sequence[str]) -> str:
    cl = gt.classes[gt.classes >= 0]
    return classes[int(np.bincount(cl).argmax())] if cl.size else "all"


def evaluate_predictions(gt: dict[str, tuple[Instances, str]], pred: dict[str, Instances], classes: Sequence[str],
                         return_matches: str | None = None,
                         breakdown: tuple[str, dict[str, str]] | None = None, **kw):
    """Score a whole prediction set. Images missing from ``pred`` score 0 and are counted;
    ids in ``pred`` unknown to the ground truth are an error. With ``return_matches=MODEL``,
    returns ``(results, match table)``. ``breakdown``: (attribute, image id -> value) adds
    ``res["breakdown"]`` (scores per value)."""
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
    return (res, ev.match_table(return_matches)) if return_matches is not None else res
