"""Metrics against independent references on the real annotations.

* the Kaggle metric against a naive dense re-implementation written here (own RLE decoder,
  dense logical and/or IoU, the competition's TP/FP/FN rule), to 1e-12;
* COCO AP against stock pycocotools ``COCOeval`` (segm, RLE IoU, stock evaluateImg), to 1e-12;
* the 100-detection trap of pycocotools' ``summarize()``;
* the known, pinned differences with ``cellpose.metrics.average_precision``;
* overlap handling, missing/unknown images, the bootstrap and the ``bench eval`` command.

The real data live in ../shared (conftest's ``real_csv``/``real_json``); the comparisons against
independent implementations also run on a Sartorius-format set the suite generates, so they
never all skip when ../shared is absent. Nothing is copied into the repository.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections import OrderedDict

import numpy as np
import pytest
from scipy import ndimage as ndi

from bench.data import rle
from bench.data.errors import DataError
from bench.data.io import read_sartorius
from bench.data.sample import Instances
from bench.metrics import kaggle
from bench.metrics.bootstrap import bootstrap_ci, paired_bootstrap
from bench.metrics.coco import coco_eval, match_table, weighted_ap
from bench.metrics.evaluator import evaluate_predictions

THRESHOLDS = np.round(np.arange(0.5, 1.0, 0.05), 2)


# ---------------------------------------------------------------------------
# the naive dense reference (no bench.data.rle in here)
# ---------------------------------------------------------------------------

def naive_decode(annotation: str, h: int, w: int) -> np.ndarray:
    """Kaggle RLE ('start length ...', 1-based, row-major) -> dense H x W bool."""
    v = np.array(annotation.split(), dtype=np.int64)
    flat = np.zeros(h * w, dtype=bool)
    for s, n in zip(v[0::2] - 1, v[1::2]):
        flat[s:s + n] = True
    return flat.reshape(h, w)


def naive_encode(mask: np.ndarray) -> str:
    """Dense mask -> Kaggle RLE string."""
    d = np.diff(np.concatenate(([0], mask.ravel().astype(np.int8), [0])))
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    return " ".join(f"{s + 1} {e - s}" for s, e in zip(starts, ends))


def _bbox(m: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    return ys[0], ys[-1], xs[0], xs[-1]


def naive_iou(gts: list[np.ndarray], preds: list[np.ndarray]) -> np.ndarray:
    """Dense IoU matrix by logical and/or over the whole image. Pairs whose bounding boxes do not
    intersect cannot share a pixel (IoU 0) and are skipped, only to keep the test fast."""
    iou = np.zeros((len(gts), len(preds)))
    gb, pb = [_bbox(g) for g in gts], [_bbox(p) for p in preds]
    for i, g in enumerate(gts):
        for j, p in enumerate(preds):
            a, b = gb[i], pb[j]
            if a[0] > b[1] or b[0] > a[1] or a[2] > b[3] or b[2] > a[3]:
                continue
            inter = np.logical_and(g, p).sum()
            iou[i, j] = inter / np.logical_or(g, p).sum()
    return iou


def naive_kaggle_score(iou: np.ndarray, n_pred: int) -> float:
    if n_pred == 0:
        return 0.0
    prec = []
    for t in THRESHOLDS:
        matches = iou > t
        tp = np.sum(matches.sum(axis=1) == 1)
        fn = np.sum(matches.sum(axis=1) == 0)
        fp = np.sum(matches.sum(axis=0) == 0)
        prec.append(tp / (tp + fp + fn))
    return float(np.mean(prec))


# ---------------------------------------------------------------------------
# perturbed predictions of a few real images
# ---------------------------------------------------------------------------

def _shift(m: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.roll(m, (dy, dx), axis=(0, 1))
    if dy > 0:
        out[:dy] = False
    elif dy < 0:
        out[dy:] = False
    if dx > 0:
        out[:, :dx] = False
    elif dx < 0:
        out[:, dx:] = False
    return out


def _transform(m: np.ndarray, rng) -> np.ndarray:
    """Keep / shift / erode / dilate one dense mask (morphology on a padded crop)."""
    kind = rng.integers(0, 4)
    if kind == 0:
        return m.copy()
    if kind == 1:
        return _shift(m, int(rng.integers(-3, 4)), int(rng.integers(-3, 4)))
    y0, y1, x0, x1 = _bbox(m)
    y0, x0 = max(y0 - 4, 0), max(x0 - 4, 0)
    y1, x1 = min(y1 + 5, m.shape[0]), min(x1 + 5, m.shape[1])
    out = np.zeros_like(m)
    it = int(rng.integers(1, 3))
    op = ndi.binary_erosion if kind == 2 else ndi.binary_dilation
    out[y0:y1, x0:x1] = op(m[y0:y1, x0:x1], iterations=it)
    return out


def _blob(h: int, w: int, rng) -> np.ndarray:
    yy, xx = np.ogrid[:h, :w]
    cy, cx, r = rng.integers(10, h - 10), rng.integers(10, w - 10), rng.integers(4, 12)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _rows_by_id(path) -> "OrderedDict[str, dict]":
    out: "OrderedDict[str, dict]" = OrderedDict()
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            g = out.setdefault(r["id"], {"h": int(r["height"]), "w": int(r["width"]), "ct": r["cell_type"],
                                         "ann": []})
            g["ann"].append(r["annotation"])
    return out


@pytest.fixture(scope="module", params=["shared", "synthetic"])
def metric_csv(request, tmp_path_factory):
    """The annotations the reference comparisons run on: the real Sartorius csv in ../shared (skipped
    where absent) and, always, a Sartorius-format set the suite generates, so that the comparisons
    against independent implementations never all skip."""
    if request.param == "shared":
        return request.getfixturevalue("real_csv")
    from bench.data.synth import generate

    out = tmp_path_factory.mktemp("metric-synth") / "data"
    generate(out, n_images=30, size=(160, 128), seed=3)
    return out / "train.csv"


@pytest.fixture(scope="module")
def real(metric_csv):
    """The annotation set: cellbench's dataset, the raw csv rows, and the chosen small images:
    the 3 cort, 3 astro and 2 shsy5y images with the fewest masks (+1 cort left unpredicted)."""
    ds = read_sartorius(metric_csv, require_images=False)
    rows = _rows_by_id(metric_csv)
    by_type: dict[str, list[str]] = {}
    for iid, g in sorted(rows.items(), key=lambda kv: len(kv[1]["ann"])):
        by_type.setdefault(g["ct"], []).append(iid)
    chosen = by_type["cort"][:3] + by_type["astro"][:3] + by_type["shsy5y"][:2]
    empty = by_type["cort"][3]
    return {"ds": ds, "rows": rows, "chosen": chosen, "empty": empty}


@pytest.fixture(scope="module")
def perturbed(real):
    """Per chosen image: non-overlapping Kaggle predictions (RLE strings + scores) and
    overlapping raw predictions (Instances with random scores, duplicates) for COCO."""
    rng = np.random.default_rng(1234)
    kaggle_preds, raw_preds = {}, {}
    for iid in real["chosen"]:
        g = real["rows"][iid]
        h, w = g["h"], g["w"]
        gts = [naive_decode(a, h, w) for a in g["ann"]]
        masks = [_transform(m, rng) for m in gts if rng.random() > 0.15]
        masks += [_blob(h, w, rng) for _ in range(3)]
        masks = [m for m in masks if m.any()]
        scores = rng.random(len(masks))
        # non-overlapping (Kaggle) set: paint in increasing score, so the higher score wins
        lab = np.zeros((h, w), dtype=np.int32)
        for k in np.argsort(scores):
            lab[masks[k]] = k + 1
        keep = [k for k in range(len(masks)) if (lab == k + 1).any()]
        kaggle_preds[iid] = ([naive_encode(lab == k + 1) for k in keep], scores[keep])
        # overlapping set for COCO: + shifted duplicates with lower scores
        dups = [k for k in range(len(masks)) if rng.random() < 0.15]
        all_masks = masks + [_shift(masks[k], 1, 1) for k in dups]
        all_scores = np.concatenate([scores, scores[dups] * rng.uniform(0.5, 1.0, len(dups))])
        raw_preds[iid] = Instances(h, w, [rle.encode_mask(m) for m in all_masks], np.full(len(all_masks), -1),
                                   all_scores)
    return {"kaggle": kaggle_preds, "raw": raw_preds}


def _write_submission_csv(path, kaggle_preds: dict, empty_ids=()) -> None:
    with open(path, "w", newline="") as f:
        wr = csv.writer(f, lineterminator="\n")
        wr.writerow(["id", "predicted"])
        for iid, (strings, _scores) in kaggle_preds.items():
            for s in strings:
                wr.writerow([iid, s])
        for iid in empty_ids:
            wr.writerow([iid, ""])


def _gt_dict(ds, ids):
    by = ds.by_id()
    return {i: (by[i].instances, by[i].meta["cell_type"]) for i in ids}


# ---------------------------------------------------------------------------
# 1. Kaggle metric == naive dense reference
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kaggle_result(real, perturbed, tmp_path_factory):
    from bench.data.predictions import read_submission

    sub = tmp_path_factory.mktemp("sub") / "submission.csv"
    _write_submission_csv(sub, perturbed["kaggle"], [real["empty"]])
    ids = real["chosen"] + [real["empty"]]
    gt = _gt_dict(real["ds"], ids)
    preds = read_submission(sub, {i: (g.height, g.width) for i, (g, _) in gt.items()}, real["ds"].classes)
    res = evaluate_predictions(gt, preds, real["ds"].classes, with_coco=False, n_resamples=200)
    return {"res": res, "sub": sub, "ids": ids}


def test_kaggle_metric_equals_naive_dense_reference(real, perturbed, kaggle_result):
    res = kaggle_result["res"]
    naive = {}
    for iid in kaggle_result["ids"]:
        g = real["rows"][iid]
        gts = [naive_decode(a, g["h"], g["w"]) for a in g["ann"]]
        strings = perturbed["kaggle"].get(iid, ([], None))[0]
        preds = [naive_decode(s, g["h"], g["w"]) for s in strings]
        naive[iid] = naive_kaggle_score(naive_iou(gts, preds), len(preds))
    assert set(res["per_image"]) == set(naive)
    for iid, v in naive.items():
        assert abs(res["per_image"][iid] - v) <= 1e-12, iid
    assert abs(res["kaggle_map"] - np.mean(list(naive.values()))) <= 1e-12
    # the perturbations bite, but not completely: a meaningful, non-trivial comparison
    vals = [naive[i] for i in real["chosen"]]
    assert 0.05 < np.mean(vals) < 0.95 and min(vals) > 0  # perturbed, neither trivial nor empty
    assert naive[real["empty"]] == 0.0 and res["per_image"][real["empty"]] == 0.0
    assert set(res["per_class"]) == {"cort", "astro", "shsy5y"}


def test_exact_iou_half_is_not_a_match():
    gt_mask = np.zeros((32, 32), bool)
    gt_mask[8:18, 8:18] = True  # 100 px
    pred_mask = np.zeros_like(gt_mask)
    pred_mask[8:18, 8:13] = True  # its left half: IoU exactly 50/100
    gt = Instances.from_masks(gt_mask[None])
    pred = Instances.from_masks(pred_mask[None], scores=[1.0])
    assert naive_kaggle_score(naive_iou([gt_mask], [pred_mask]), 1) == 0.0
    s = kaggle.score_image(gt, pred)
    assert s.score == 0.0 and s.tp[0] == 0 and s.fp[0] == 1 and s.fn[0] == 1


# ---------------------------------------------------------------------------
# 2. COCO AP == stock pycocotools
# ---------------------------------------------------------------------------

def _stock_coco(images, max_dets=None, area_rng=True):
    """Stock pycocotools on (gt, pred) Instances: compressed RLE, iouType 'segm', useCats=0."""
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    imgs, anns, res = [], [], []
    for num, (_iid, g, p) in enumerate(images, start=1):
        imgs.append({"id": num, "height": g.height, "width": g.width})
        for c in g.counts:
            seg = rle.to_coco_rle(c, g.height, g.width)
            anns.append({"id": len(anns) + 1, "image_id": num, "category_id": 1, "segmentation": seg,
                         "area": float(mask_util.area(seg)), "bbox": list(mask_util.toBbox(seg)), "iscrowd": 0})
        for c, s in zip(p.counts, p.scores):
            res.append({"image_id": num, "category_id": 1, "segmentation": rle.to_coco_rle(c, p.height, p.width),
                        "score": float(s)})
    with contextlib.redirect_stdout(io.StringIO()):
        G = COCO()
        G.dataset = {"images": imgs, "annotations": anns, "categories": [{"id": 1, "name": "cell"}]}
        G.createIndex()
        D = G.loadRes(res)
        E = COCOeval(G, D, iouType="segm")
        E.params.useCats = 0
        if max_dets is not None:
            E.params.maxDets = [max_dets]
        if area_rng:
            E.params.areaRng = [[0, 1e10], [0, 18 ** 2], [18 ** 2, 31 ** 2], [31 ** 2, 1e10]]
            E.params.areaRngLbl = ["all", "small", "medium", "large"]
        E.evaluate()
        E.accumulate()
    return E


@pytest.mark.parametrize("variant", ["random_scores", "tied_scores", "max_dets_20"])
def test_coco_equals_stock_pycocotools(real, perturbed, variant):
    ds = real["ds"].by_id()
    images = [(i, ds[i].instances, perturbed["raw"][i]) for i in real["chosen"]]
    e = real["empty"]  # an image without any detection
    images.append((e, ds[e].instances, Instances.empty(ds[e].height, ds[e].width)))
    max_dets = 20 if variant == "max_dets_20" else 1000
    if variant == "tied_scores":  # many equal scores: order must follow pycocotools' stable sorts
        images = [(i, g, Instances(p.height, p.width, p.counts, p.classes, np.round(p.scores, 1)))
                  for i, g, p in images]
    summary, E = coco_eval(images, n_classes=3, max_dets=max_dets)
    S = _stock_coco(images, max_dets=max_dets)
    # same IoUs, pair by pair
    for key, ref in S.ious.items():
        ours = E.ious[key]
        if len(ref) == 0:
            assert len(ours) == 0 or np.asarray(ours).size == 0
        else:
            np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=1e-12)
    for k in ("precision", "recall", "scores"):
        assert E.eval[k].shape == S.eval[k].shape
        np.testing.assert_allclose(E.eval[k], S.eval[k], rtol=0, atol=1e-12)
    P = S.eval["precision"]

    def ap(p):
        p = p[p > -1]
        return p.mean()

    assert abs(summary["AP"] - ap(P[:, :, :, 0, 0])) <= 1e-12
    assert abs(summary["AP50"] - ap(P[0, :, :, 0, 0])) <= 1e-12
    assert abs(summary["AP75"] - ap(P[5, :, :, 0, 0])) <= 1e-12
    for name, a in (("APs", 1), ("APm", 2), ("APl", 3)):
        assert abs(summary[name] - ap(P[:, :, :, a, 0])) <= 1e-12, name
    assert 0.05 < summary["AP"] < 0.9 and np.isfinite(summary["APs"])  # non-trivial; APs defined (not NaN)
    if variant != "random_scores":
        return
    # duplicates compete for the same gt (the evaluator's greedy matching takes its slow path)
    assert any(np.asarray(v).size and ((np.asarray(v) >= 0.5).sum(axis=0) > 1).any() for v in E.ious.values())
    # re-accumulating from the match table with unit weights == pycocotools per threshold
    wap = weighted_ap(match_table(E))
    ref = np.array([P[t, :, 0, 0, 0].mean() for t in range(len(THRESHOLDS))])
    np.testing.assert_allclose(wap, ref, rtol=0, atol=1e-12)
    # 0/1 weights == pycocotools on that subset of images
    sub = images[:4]
    S4 = _stock_coco(sub, max_dets=1000)
    w = np.zeros(len(images))
    w[:4] = 1
    ref4 = np.array([S4.eval["precision"][t, :, 0, 0, 0].mean() for t in range(len(THRESHOLDS))])
    np.testing.assert_allclose(weighted_ap(match_table(E), w), ref4, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------
# 3. the 100-detection trap
# ---------------------------------------------------------------------------

def test_700_cells_all_counted_unlike_stock_summarize():
    h, w = 520, 704
    lab = np.zeros((h, w), dtype=np.int32)
    k = 0
    for y in range(4, h - 12, 26):        # 20 rows
        for x in range(4, w - 12, 20):    # 35 columns
            k += 1
            lab[y:y + 12, x:x + 12] = k
    assert k == 700
    gt = Instances.from_label_image(lab)
    scores = np.linspace(1.0, 0.3, 700)
    pred = Instances.from_label_image(lab, scores=scores)
    summary, E = coco_eval([("grid", gt, pred)], max_dets=1000)
    assert summary["AP"] == 1.0 and summary["AP50"] == 1.0 and summary["max_dets"] == 1000
    assert len(E.evalImgs[0]["dtIds"]) == 700
    np.testing.assert_array_equal(E.eval["recall"][:, 0, 0, 0], 1.0)
    # stock summarize(): AP and AR at maxDets=100 see 100 of the 700 cells
    S = _stock_coco([("grid", gt, pred)], max_dets=None, area_rng=False)
    with contextlib.redirect_stdout(io.StringIO()):
        S.summarize()
    assert S.params.maxDets == [1, 10, 100]
    assert S.stats[0] < 0.2 and abs(S.stats[8] - 100 / 700) < 1e-9


# ---------------------------------------------------------------------------
# 4. pinned differences with cellpose.metrics.average_precision
# ---------------------------------------------------------------------------

def test_cellpose_average_precision_differs_slightly(real, perturbed, kaggle_result):
    """cellpose's ``average_precision`` is *not* the Kaggle metric, and this pins by how much.

    Three reasons, all present on the real data:

    1. cellpose matches at IoU >= t, the competition at IoU > t (strict). An IoU of exactly 0.5
       is a match for cellpose and not for Kaggle (checked below on a constructed case).
    2. cellpose takes label images: the ground truth's overlapping masks (~2.5 % of the real
       annotated pixels) lose their shared pixels to whichever mask is painted last, which
       changes IoUs near the thresholds, and a mask covered completely by later ones vanishes
       (cellpose still counts it in n_true = max label, as a miss).
    3. cellpose matches one-to-one (Hungarian); the Kaggle rule counts every gt row with exactly
       one match, so one prediction may be the TP of two near-duplicate gt masks (the real csv has
       repeated masks) and a gt with two matches is no TP.

    So the per-image scores differ, by a little: the mean stays within 0.05.
    """
    cp_metrics = pytest.importorskip("cellpose.metrics")
    res = kaggle_result["res"]
    gts, preds, ids = [], [], real["chosen"]
    for iid in ids:
        g = real["rows"][iid]
        lab = np.zeros((g["h"], g["w"]), dtype=np.int32)
        for k, a in enumerate(g["ann"]):  # later masks overwrite earlier ones
            lab[naive_decode(a, g["h"], g["w"])] = k + 1
        gts.append(lab)
        plab = np.zeros_like(lab)
        for k, s in enumerate(perturbed["kaggle"][iid][0]):
            plab[naive_decode(s, g["h"], g["w"])] = k + 1
        preds.append(plab)
    ap, tp, fp, fn = cp_metrics.average_precision(gts, preds, threshold=list(THRESHOLDS))
    cp = ap.mean(axis=1).astype(float)
    cb = np.array([res["per_image"][i] for i in ids])
    diff = cb - cp
    assert np.abs(diff).max() > 0 and diff.mean() != 0  # they are not the same metric
    assert abs(diff.mean()) < 0.05 and np.abs(diff).max() < 0.1


def test_cellpose_counts_iou_of_exactly_half_as_a_match():
    """Reason 1 above, constructed: IoU exactly 0.5 (a 10x10 gt, its left half predicted)."""
    cp_metrics = pytest.importorskip("cellpose.metrics")
    gt_mask = np.zeros((32, 32), np.int32)
    gt_mask[8:18, 8:18] = 1
    pred_mask = np.zeros_like(gt_mask)
    pred_mask[8:18, 8:13] = 1
    ap1, tp1, _, _ = cp_metrics.average_precision(gt_mask, pred_mask, threshold=list(THRESHOLDS))
    assert tp1[0] == 1 and ap1[0] == 1.0 and (ap1[1:] == 0).all()   # cellpose: a match at 0.5
    ours = kaggle.score_image(Instances.from_label_image(gt_mask),
                              Instances.from_label_image(pred_mask, scores=np.ones(1)))
    assert ours.tp[0] == 0 and ours.score == 0.0                      # Kaggle/cellbench: none


# ---------------------------------------------------------------------------
# 5. overlaps, missing and unknown images
# ---------------------------------------------------------------------------

def _two_squares():
    a = np.zeros((40, 40), bool)
    a[5:20, 5:20] = True
    b = np.zeros((40, 40), bool)
    b[12:30, 12:30] = True
    return a, b


def test_overlapping_predictions_rejected_naming_the_image():
    a, b = _two_squares()
    gt = Instances.from_masks(np.stack([a, b & ~a]))
    pred = Instances.from_masks(np.stack([a, b]), scores=[0.9, 0.1])
    with pytest.raises(DataError, match="img-42"):
        evaluate_predictions({"img-42": (gt, "cort")}, {"img-42": pred}, ["cort"], with_coco=False)


def test_resolve_overlaps_highest_score_keeps_contested_pixels():
    a, b = _two_squares()
    gt = Instances.from_masks(np.stack([a, b & ~a]))  # the truth: a owns the shared pixels
    good = Instances.from_masks(np.stack([a, b]), scores=[0.9, 0.1])
    bad = Instances.from_masks(np.stack([a, b]), scores=[0.1, 0.9])
    r = kaggle.resolve_overlaps(good)
    np.testing.assert_array_equal(r.dense(0), a)
    np.testing.assert_array_equal(r.dense(1), b & ~a)
    np.testing.assert_array_equal(r.scores, [0.9, 0.1])
    r = kaggle.resolve_overlaps(bad)
    np.testing.assert_array_equal(r.dense(0), a & ~b)
    np.testing.assert_array_equal(r.dense(1), b)
    gtd = {"x": (gt, "cort")}
    assert evaluate_predictions(gtd, {"x": good}, ["cort"], resolve_overlaps=True, with_coco=False)["kaggle_map"] == 1.0
    worse = evaluate_predictions(gtd, {"x": bad}, ["cort"], resolve_overlaps=True, with_coco=False)["kaggle_map"]
    assert worse < 1.0


def test_missing_unknown_and_empty_predictions():
    a, b = _two_squares()
    gt = Instances.from_masks(np.stack([a, b & ~a]))
    perfect = Instances(gt.height, gt.width, gt.counts, gt.classes, np.ones(2))
    gtd = {"p": (gt, "cort"), "m": (gt, "cort"), "e": (gt, "astro")}
    res = evaluate_predictions(gtd, {"p": perfect, "e": Instances.empty(40, 40)}, ["cort", "astro"],
                               n_resamples=50)
    assert res["n_images"] == 3 and res["missing_predictions"] == ["m"]
    assert res["per_image"] == {"p": 1.0, "m": 0.0, "e": 0.0}
    assert abs(res["kaggle_map"] - 1 / 3) < 1e-15
    assert res["per_class"] == {"astro": 0.0, "cort": 0.5}
    with pytest.raises(DataError, match="not in the ground truth"):
        evaluate_predictions(gtd, {"p": perfect, "zzz": perfect}, ["cort"], with_coco=False)
    # an image without predictions scores 0 even when it has no ground truth either
    none = Instances.empty(40, 40, with_scores=False)
    assert kaggle.score_image(none, Instances.empty(40, 40)).score == 0.0


def test_submission_with_unknown_id_is_an_error(tmp_path):
    from bench.data.predictions import read_submission

    p = tmp_path / "s.csv"
    p.write_text("id,predicted\nknown,1 3\nstranger,5 2\n")
    with pytest.raises(DataError, match=r"s\.csv:3.*stranger"):
        read_submission(p, {"known": (4, 4)})


# ---------------------------------------------------------------------------
# 6. bootstrap
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_and_worse(real):
    """Every image of the set: gt-derived predictions (overlaps resolved) vs the same minus half the masks."""
    rng = np.random.default_rng(7)
    gtd = {s.image_id: (s.instances, s.meta["cell_type"]) for s in real["ds"]}
    good, worse = {}, {}
    for iid, (g, _) in gtd.items():
        p = kaggle.resolve_overlaps(Instances(g.height, g.width, g.counts, np.full(len(g), -1), rng.random(len(g))))
        good[iid] = p
        worse[iid] = p.subset(rng.random(len(p)) < 0.5)
    kw = dict(with_coco=False, n_resamples=500)
    return (evaluate_predictions(gtd, good, real["ds"].classes, **kw),
            evaluate_predictions(gtd, worse, real["ds"].classes, **kw))


def test_bootstrap_ci_contains_mean_and_is_seeded(good_and_worse):
    res, _ = good_and_worse
    lo, hi = res["kaggle_map_ci95"]
    assert lo < res["kaggle_map"] < hi
    vals = np.array(list(res["per_image"].values()))
    assert bootstrap_ci(vals, 500, seed=0) == tuple(res["kaggle_map_ci95"])
    assert bootstrap_ci(vals, 500, seed=3) == bootstrap_ci(vals, 500, seed=3)
    assert bootstrap_ci(vals, 500, seed=3) != bootstrap_ci(vals, 500, seed=4)
    for c, (clo, chi) in res["per_class_ci95"].items():
        assert clo <= res["per_class"][c] <= chi


def test_paired_bootstrap_better_and_self(good_and_worse, real):
    good, worse = good_and_worse
    assert good["kaggle_map"] > worse["kaggle_map"] + 0.2
    t = paired_bootstrap(good["per_image"], worse["per_image"], n_resamples=1000, seed=0)
    assert t.verdict == "better" and t.p_a_better > 0.95 and t.n_images == len(real["ds"])
    assert t.diff_ci95[0] > 0
    assert paired_bootstrap(worse["per_image"], good["per_image"], 1000).verdict == "worse"
    s = paired_bootstrap(good["per_image"], good["per_image"], n_resamples=1000, seed=0)
    assert s.diff == 0.0 and s.diff_ci95 == (0.0, 0.0) and s.verdict == "not distinguishable"
    assert t.as_dict() == paired_bootstrap(good["per_image"], worse["per_image"], 1000, seed=0).as_dict()


# ---------------------------------------------------------------------------
# 7. bench eval
# ---------------------------------------------------------------------------

def _subset_csv(src, dst, ids) -> None:
    ids = set(ids)
    with open(src, newline="") as f, open(dst, "w", newline="") as g:
        r = csv.reader(f)
        w = csv.writer(g, lineterminator="\n")
        header = next(r)
        w.writerow(header)
        k = header.index("id")
        for row in r:
            if row[k] in ids:
                w.writerow(row)


def test_cli_eval_json_and_broken_rle(real, metric_csv, kaggle_result, tmp_path):
    from typer.testing import CliRunner

    from bench.cli import app
    from bench.data.predictions import read_submission, write_submission

    ids = kaggle_result["ids"]
    gt_csv = tmp_path / "gt.csv"
    _subset_csv(metric_csv, gt_csv, ids)
    gt = read_sartorius(gt_csv, require_images=False)
    preds = read_submission(kaggle_result["sub"], {s.image_id: (s.height, s.width) for s in gt}, gt.classes)
    sub = tmp_path / "sub.csv"
    text = write_submission(sub, preds, gt.classes)
    out = tmp_path / "out.json"
    runner = CliRunner()
    r = runner.invoke(app, ["eval", "--gt", str(gt_csv), "--pred", str(sub), "--json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert isinstance(res["kaggle_map"], float)
    assert abs(res["kaggle_map"] - kaggle_result["res"]["kaggle_map"]) <= 1e-12
    lo, hi = res["kaggle_map_ci95"]
    assert lo <= res["kaggle_map"] <= hi
    assert set(res["per_image"]) == set(ids)
    assert list(res["per_threshold"]) == [f"{t:.2f}" for t in THRESHOLDS]
    assert set(res["per_class"]) == {"cort", "astro", "shsy5y"}
    coco = res["coco"]
    for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert isinstance(coco[k], float), k
    assert coco["max_dets"] == 1000 and 0 < coco["AP"] < coco["AP50"] <= 1

    # a broken RLE (odd number of values) exits 2 naming file:line
    lines = text.splitlines()
    n = 4  # file line 4 = third data row
    iid, ann = lines[n - 1].split(",", 1)
    lines[n - 1] = iid + "," + " ".join(ann.split()[:-1])
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    r = runner.invoke(app, ["eval", "--gt", str(gt_csv), "--pred", str(bad)])
    assert r.exit_code == 2
    assert f"bad.csv:{n}" in r.output and "odd number" in r.output


def test_label_lookup_overlaps_equal_sparse_product(metric_csv):
    """The Kaggle fast path (pred label image) and the general sparse product agree exactly."""
    from bench.metrics.kaggle import resolve_overlaps
    from bench.metrics.matching import mask_overlaps, overlaps_disjoint_pred

    ds = read_sartorius(metric_csv, require_images=False)
    rng = np.random.default_rng(5)
    for s in ds.samples[:6]:
        g = s.instances
        p = g.subset(rng.random(len(g)) > 0.3)
        p.scores = rng.random(len(p))
        p = resolve_overlaps(p)
        a = mask_overlaps(g.counts, p.counts, g.height, g.width)
        b = overlaps_disjoint_pred(g.counts, p.counts, g.height, g.width)
        np.testing.assert_array_equal(a.dense_iou(), b.dense_iou())
        np.testing.assert_array_equal(a.gt_area, b.gt_area)
