"""COCO mask AP through pycocotools, without the 100-detection trap.

pycocotools' ``summarize()`` hard-codes maxDets=100 for AP, so a 780-cell image is
scored on its 100 best detections only. cellbench runs ``evaluate()`` and
``accumulate()`` with ``maxDets=[N]`` and reads AP/AP50/AP75/APs/APm/APl straight from
``eval['precision']``. IoUs come from :mod:`bench.metrics.matching` (sparse, exact)
instead of pycocotools' pairwise RLE merges; a test checks they give identical AP.
Area ranges are LIVECell's cell-sized ones.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bench.data.sample import Instances
from bench.metrics.matching import mask_overlaps

AREA_RANGES = {"all": [0, 1e10], "small": [0, 18 ** 2], "medium": [18 ** 2, 31 ** 2], "large": [31 ** 2, 1e10]}


@dataclass
class CocoInputs:
    """GT and predictions of many images, as pycocotools wants them, plus our masks for IoU."""

    gt: COCO
    dt: COCO
    masks: dict[int, object]  # annotation id -> counts (gt ids positive, dt ids negative)
    sizes: dict[int, tuple[int, int]]


def build_coco(images: list[tuple[str, Instances, Instances]], n_classes: int, class_aware: bool) -> CocoInputs:
    """Assemble in-memory COCO objects. No segmentation strings are built: IoUs are ours."""
    if class_aware and any((p.classes < 0).any() for _, _, p in images):
        raise ValueError("class-aware COCO AP needs a class for every prediction; this model predicts none")
    cats = [{"id": k + 1, "name": str(k)} for k in range(max(n_classes, 1))]
    gimgs, ganns, danns, masks, sizes = [], [], [], {}, {}
    gid = did = 0
    for num, (_iid, gt, pred) in enumerate(images, start=1):
        gimgs.append({"id": num, "height": gt.height, "width": gt.width})
        sizes[num] = (gt.height, gt.width)
        garea = gt.areas
        for k, c in enumerate(gt.counts):
            gid += 1
            cat = int(gt.classes[k]) + 1 if class_aware else 1
            ganns.append({"id": gid, "image_id": num, "category_id": max(cat, 1), "area": float(garea[k]),
                          "iscrowd": 0, "bbox": [0, 0, 1, 1], "ignore": 0})
            masks[gid] = c
        parea = pred.areas
        scores = pred.scores if pred.scores is not None else np.ones(len(pred))
        for k, c in enumerate(pred.counts):
            did += 1
            cat = int(pred.classes[k]) + 1 if class_aware else 1
            danns.append({"id": did, "image_id": num, "category_id": max(cat, 1), "area": float(parea[k]),
                          "iscrowd": 0, "bbox": [0, 0, 1, 1], "score": float(scores[k])})
            masks[-did] = c
    with contextlib.redirect_stdout(io.StringIO()):
        G = COCO()
        G.dataset = {"images": gimgs, "annotations": ganns, "categories": cats}
        G.createIndex()
        D = COCO()
        D.dataset = {"images": gimgs, "annotations": danns, "categories": cats}
        D.createIndex()
    return CocoInputs(G, D, masks, sizes)


class SparseIoUCOCOeval(COCOeval):
    """COCOeval whose computeIoU uses cellbench's exact sparse overlaps (same order, same values)."""

    def __init__(self, inputs: CocoInputs, **kw):
        with contextlib.redirect_stdout(io.StringIO()):
            super().__init__(inputs.gt, inputs.dt, iouType="segm", **kw)
        self._masks, self._sizes = inputs.masks, inputs.sizes
        # 'segm' would make _prepare() build pycocotools RLEs we never use; segm and bbox share
        # every other parameter, and computeIoU below is mask IoU whatever the label says.
        self.params.iouType = "bbox"

    def _gt_dt(self, imgId, catId) -> tuple[list, list]:  # noqa: N803
        """Ground truth and detections of one image (one category, or all when useCats=0)."""
        if self.params.useCats:
            return self._gts[imgId, catId], self._dts[imgId, catId]
        cats = self.params.catIds
        return [g for c in cats for g in self._gts[imgId, c]], [d for c in cats for d in self._dts[imgId, c]]

    def computeIoU(self, imgId, catId):  # noqa: N802 (pycocotools' name)
        p = self.params
        gt, dt = self._gt_dt(imgId, catId)
        if len(gt) == 0 and len(dt) == 0:
            return []
        inds = np.argsort([-d["score"] for d in dt], kind="mergesort")
        dt = [dt[i] for i in inds][: p.maxDets[-1]]
        h, w = self._sizes[imgId]
        ov = mask_overlaps([self._masks[-d["id"]] for d in dt], [self._masks[g["id"]] for g in gt], h, w)
        return ov.dense_iou()

    def evaluateImg(self, imgId, catId, aRng, maxDet):  # noqa: N802
        """pycocotools' greedy matching, same results, but only over pairs with IoU >= 0.5.

        The stock loop visits every (threshold, detection, gt) triple in Python: about
        5 million steps for one 700-cell image. Pairs below the lowest threshold can
        never match, so only the few candidates per detection are visited, and when no
        detection or gt competes for another the matching is assigned at once.
        """
        p = self.params
        gt, dt = self._gt_dt(imgId, catId)
        if len(gt) == 0 and len(dt) == 0:
            return None
        g_ign = np.array([1 if (g["ignore"] or g["area"] < aRng[0] or g["area"] > aRng[1]) else 0 for g in gt],
                         dtype=np.int64)
        gtind = np.argsort(g_ign, kind="mergesort")
        gt = [gt[i] for i in gtind]
        gtIg = g_ign[gtind]
        dtind = np.argsort([-d["score"] for d in dt], kind="mergesort")
        dt = [dt[i] for i in dtind[0:maxDet]]
        ious = self.ious[imgId, catId]
        ious = ious[:, gtind] if len(ious) > 0 else ious
        T, G, D = len(p.iouThrs), len(gt), len(dt)
        gtm, dtm, dtIg = np.zeros((T, G)), np.zeros((T, D)), np.zeros((T, D))
        gt_ids = np.array([g["id"] for g in gt], dtype=float)
        dt_ids = np.array([d["id"] for d in dt], dtype=float)
        if len(ious) and D and G:
            ious = np.asarray(ious)[:D]
            cd, cg = np.nonzero(ious >= min(float(np.min(p.iouThrs)), 1 - 1e-10))
            cv = ious[cd, cg]
            for tind, t in enumerate(p.iouThrs):
                thr = min(t, 1 - 1e-10)
                k = cv >= thr
                d_, g_, v_ = cd[k], cg[k], cv[k]
                if len(np.unique(d_)) == len(d_) and len(np.unique(g_)) == len(g_):
                    dtm[tind, d_], gtm[tind, g_], dtIg[tind, d_] = gt_ids[g_], dt_ids[d_], gtIg[g_]
                    continue
                starts = np.searchsorted(d_, np.arange(D + 1))
                for dind in np.unique(d_):
                    best, m = thr, -1
                    for j in range(starts[dind], starts[dind + 1]):
                        gind = g_[j]
                        if gtm[tind, gind] > 0:
                            continue
                        if m > -1 and gtIg[m] == 0 and gtIg[gind] == 1:
                            break
                        if v_[j] < best:
                            continue
                        best, m = v_[j], gind
                    if m == -1:
                        continue
                    dtIg[tind, dind], dtm[tind, dind], gtm[tind, m] = gtIg[m], gt_ids[m], dt_ids[dind]
        a = np.array([d["area"] < aRng[0] or d["area"] > aRng[1] for d in dt]).reshape((1, D))
        dtIg = np.logical_or(dtIg, np.logical_and(dtm == 0, np.repeat(a, T, 0)))
        return {"image_id": imgId, "category_id": catId, "aRng": aRng, "maxDet": maxDet,
                "dtIds": [d["id"] for d in dt], "gtIds": [g["id"] for g in gt], "dtMatches": dtm, "gtMatches": gtm,
                "dtScores": [d["score"] for d in dt], "gtIgnore": gtIg, "dtIgnore": dtIg}


def check_max_dets(max_dets) -> None:
    """maxDets < 1 keeps no detection at all: AP 0.0 that looks like a score. Refused."""
    if isinstance(max_dets, bool) or not isinstance(max_dets, (int, np.integer)) or max_dets < 1:
        raise ValueError(f"max_dets must be an integer >= 1, got {max_dets!r}")


def coco_eval(images: list[tuple[str, Instances, Instances]], n_classes: int = 1, max_dets: int = 1000,
              class_aware: bool = False) -> tuple[dict, COCOeval]:
    """AP, AP50, AP75, APs, APm, APl (segm) at ``max_dets`` detections per image; NaN where undefined."""
    check_max_dets(max_dets)
    inputs = build_coco(images, n_classes, class_aware)
    E = SparseIoUCOCOeval(inputs)
    E.params.useCats = int(class_aware)
    E.params.maxDets = [int(max_dets)]
    E.params.areaRng = list(AREA_RANGES.values())
    E.params.areaRngLbl = list(AREA_RANGES)
    with contextlib.redirect_stdout(io.StringIO()):
        E.evaluate()
        E.accumulate()
    return summarize_precision(E.eval["precision"], E.params.iouThrs, max_dets), E


def summarize_precision(precision: np.ndarray, iou_thrs: np.ndarray, max_dets: int, m: int = -1) -> dict:
    """The numbers summarize() would print, but at our maxDets (precision: T x R x K x A x M)."""
    def ap(a: int, t: int | None = None) -> float:
        p = precision[:, :, :, a, m] if t is None else precision[t, :, :, a, m]
        p = p[p > -1]
        return float(p.mean()) if p.size else float("nan")

    t50 = int(np.argmin(np.abs(iou_thrs - 0.5)))
    t75 = int(np.argmin(np.abs(iou_thrs - 0.75)))
    return {"AP": ap(0), "AP50": ap(0, t50), "AP75": ap(0, t75), "APs": ap(1), "APm": ap(2), "APl": ap(3),
            "max_dets": int(max_dets)}


# ---------------------------------------------------------------------------
# AP from per-image matches with image weights (bootstrap without re-matching)
# ---------------------------------------------------------------------------

@dataclass
class MatchTable:
    """Per-detection match flags from a finished COCOeval (area 'all', K = 1), for resampling images."""

    scores: np.ndarray     # (D,) sorted descending across all images
    tp: np.ndarray         # (T, D) bool
    fp: np.ndarray         # (T, D) bool
    det_image: np.ndarray  # (D,) image position
    npig: np.ndarray       # (n_images,) non-ignored gt per image
    rec_thrs: np.ndarray


def match_table(E: COCOeval) -> MatchTable:
    p = E.params
    n_img = len(p.imgIds)
    max_det = p.maxDets[-1]
    A = len(p.areaRng)
    per = E.evalImgs[:n_img] if len(p.catIds if p.useCats else [-1]) == 1 else None
    if per is None:
        raise ValueError("match_table supports a single category (class-agnostic) evaluation")
    T = len(p.iouThrs)
    sc, tp, fp, img, npig = [], [], [], [], np.zeros(n_img)
    for i, e in enumerate(per):
        if e is None:
            continue
        d_sc = np.asarray(e["dtScores"][:max_det])
        dtm = np.asarray(e["dtMatches"])[:, :max_det].reshape(T, -1)
        dtig = np.asarray(e["dtIgnore"])[:, :max_det].reshape(T, -1)
        gtig = np.asarray(e["gtIgnore"])
        npig[i] = np.count_nonzero(gtig == 0)
        sc.append(d_sc)
        tp.append(np.logical_and(dtm, ~dtig.astype(bool)))
        fp.append(np.logical_and(~dtm.astype(bool), ~dtig.astype(bool)))
        img.append(np.full(len(d_sc), i))
    del A
    if not sc:
        return MatchTable(np.zeros(0), np.zeros((T, 0), bool), np.zeros((T, 0), bool), np.zeros(0, int), npig,
                          p.recThrs)
    scores = np.concatenate(sc)
    order = np.argsort(-scores, kind="mergesort")
    return MatchTable(scores[order], np.concatenate(tp, 1)[:, order], np.concatenate(fp, 1)[:, order],
                      np.concatenate(img)[order], npig, p.recThrs)


def weighted_ap(mt: MatchTable, weights: np.ndarray | None = None) -> np.ndarray:
    """Per-IoU-threshold AP (T,) as pycocotools' accumulate() computes it, with images weighted.

    With all weights 1 this equals pycocotools exactly (tested); integer weights are
    the multiplicities of a bootstrap resample.
    """
    T = mt.tp.shape[0]
    w_img = np.ones(len(mt.npig)) if weights is None else np.asarray(weights, float)
    npig = float((w_img * mt.npig).sum())
    if npig == 0:
        return np.full(T, np.nan)
    wd = w_img[mt.det_image]
    keep = wd > 0
    tps = np.cumsum(mt.tp[:, keep] * wd[keep], axis=1)
    fps = np.cumsum(mt.fp[:, keep] * wd[keep], axis=1)
    out = np.zeros(T)
    R = len(mt.rec_thrs)
    for t in range(T):
        tp, fp = tps[t], fps[t]
        nd = len(tp)
        if nd == 0:
            continue
        rc = tp / npig
        pr = tp / (fp + tp + np.spacing(1))
        pr = np.maximum.accumulate(pr[::-1])[::-1]
        inds = np.searchsorted(rc, mt.rec_thrs, side="left")
        q = np.zeros(R)
        valid = inds < nd
        q[valid] = pr[inds[valid]]
        out[t] = q.mean()
    return out
