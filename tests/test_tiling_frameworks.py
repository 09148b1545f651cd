"""train_crop spelled in Detectron2's and MMDetection's own augmentation steps draws and clips as the
shared rule (bench/tiling.py) does; anchor_sizes=auto reaches their configs. Skipped where the
framework is not importable."""

import numpy as np
import pytest

from bench import tiling
from bench.adapters.registry import make_config
from bench.data.sample import Instances


def _scene(h: int = 90, w: int = 120) -> tuple[np.ndarray, Instances]:
    """Rectangles, some of them bound to be cut by a 48 px crop; an RGB image whose R and G
    channels are the row and column (so a crop's window can be read off its first pixel)."""
    lab = np.zeros((h, w), np.int32)
    k = 0
    for y in range(2, h - 12, 14):
        for x in range(3, w - 14, 17):
            k += 1
            lab[y:y + 10 + k % 3, x:x + 12 - k % 4] = k
    yy, xx = np.mgrid[:h, :w]
    img = np.stack([yy, xx, np.zeros_like(yy)], axis=2).astype(np.float32) / 255.0
    return img, Instances.from_label_image(lab, cls_id=0)


def _mask_set(masks) -> set[bytes]:
    return {np.packbits(np.asarray(m, bool)).tobytes() for m in masks if np.asarray(m).any()}


@pytest.mark.detectron2
def test_detectron2_random_crop_matches_the_shared_rule(tmp_path):
    pytest.importorskip("detectron2")
    from detectron2.data import transforms as T

    from bench.adapters import detectron2_maskrcnn as d2m

    img, inst = _scene()
    np.save(tmp_path / "a.npy", img)
    from bench.data.sample import Sample

    d = d2m.to_dataset_dicts([Sample("a", inst, _image=img)], ["cell"], image_dir=tmp_path)[0]
    mapper = d2m._Mapper([T.RandomCrop("absolute", (48, 48))], lambda x: x, crop_min_area=10)
    seen = set()
    for seed in range(6):
        np.random.seed(seed)
        out = mapper(d)
        im = out["image"].numpy()  # BGR x 255: channel 2 is R = row, 1 is G = column
        y0, x0 = int(round(im[2, 0, 0])), int(round(im[1, 0, 0]))
        h, w = im.shape[1:]
        seen.add((y0, x0))
        want = tiling.crop_instances(inst, y0, x0, h, w, min_area=10)
        got = out["instances"]
        assert (h, w) == (48, 48) and len(got) == len(want)
        assert _mask_set(got.gt_masks.tensor.numpy()) == _mask_set(want.dense(i) for i in range(len(want)))
        boxes = got.gt_boxes.tensor.numpy()
        xywh = want.boxes_xywh()
        np.testing.assert_allclose(np.sort(boxes[:, 2] - boxes[:, 0]), np.sort(xywh[:, 2]))
    assert len(seen) > 1


def test_mmdet_random_crop_matches_the_shared_rule():
    pytest.importorskip("mmdet")
    pytest.importorskip("mmcv.ops")
    from mmdet.registry import TRANSFORMS
    from mmdet.structures.bbox import HorizontalBoxes
    from mmdet.structures.mask import BitmapMasks
    from mmengine.registry import init_default_scope

    from bench.adapters.mmdet_cascade import train_crop_steps

    init_default_scope("mmdet")
    img, inst = _scene()
    cfg = make_config("cascade", "smoke", {"train_crop": 48, "train_crop_min_area": 10})
    steps = [TRANSFORMS.build(s) for s in train_crop_steps(cfg)]
    assert train_crop_steps(make_config("cascade", "smoke")) == []  # off by default
    masks = np.stack([inst.dense(i) for i in range(len(inst))]).astype(np.uint8)
    xywh = inst.boxes_xywh()
    seen = set()
    for seed in range(6):
        np.random.seed(seed)
        r = {"img": (img * 255).astype(np.uint8), "img_shape": img.shape[:2],
             "gt_bboxes": HorizontalBoxes(np.c_[xywh[:, :2], xywh[:, :2] + xywh[:, 2:]].astype(np.float32)),
             "gt_bboxes_labels": np.zeros(len(inst), np.int64), "gt_ignore_flags": np.zeros(len(inst), bool),
             "gt_masks": BitmapMasks(masks, *img.shape[:2])}
        for t in steps:
            r = t(r)
        y0, x0 = int(r["img"][0, 0, 0]), int(r["img"][0, 0, 1])
        h, w = r["img"].shape[:2]
        seen.add((y0, x0))
        want = tiling.crop_instances(inst, y0, x0, h, w, min_area=10)
        assert (h, w) == (48, 48) and len(r["gt_masks"]) == len(want)
        assert _mask_set(r["gt_masks"].masks) == _mask_set(want.dense(i) for i in range(len(want)))
        np.testing.assert_allclose(np.sort(r["gt_bboxes"].tensor.numpy()[:, 2] - r["gt_bboxes"].tensor.numpy()[:, 0]),
                                   np.sort(want.boxes_xywh()[:, 2]))
    assert len(seen) > 1


def test_detectron2_auto_anchors_reach_its_config():
    from bench.adapters import detectron2_maskrcnn as d2m

    _, inst = _scene()
    cfg = make_config("maskrcnn", "smoke", {"anchor_sizes": "auto", "min_size_test": 180, "max_size_test": 400})
    got = d2m.auto_anchors(cfg, [inst])
    assert got["size_p5"] >= 9 * 2 * 0.9  # rectangles of ~9-12 px, resized x2 (90 -> 180 px)
    opts = d2m.to_detectron2_opts(cfg, anchor_sizes=got["anchor_sizes"])
    assert opts["MODEL.ANCHOR_GENERATOR.SIZES"] == [[float(s)] for s in got["anchor_sizes"]]
    with pytest.raises(ValueError, match="auto needs the training set"):
        d2m.to_detectron2_opts(cfg)


def test_cascade_auto_anchor_scales_are_octaves_over_its_strides():
    from bench.adapters.mmdet_cascade import FPN_STRIDES, auto_anchor_scales

    _, inst = _scene()
    cfg = make_config("cascade", "smoke", {"anchor_scales": "auto", "image_scale": 2.0})
    got = auto_anchor_scales(cfg, [inst])
    (scale,) = got["anchor_scales"]
    assert got["anchor_sizes"] == pytest.approx([scale * s for s in FPN_STRIDES], rel=1e-3)
    assert got["anchor_sizes"][0] <= got["size_p5"] and got["anchor_sizes"][-1] >= got["size_p95"]


def _tiny_synth(tmp_path):
    from bench.data.io import read_sartorius
    from bench.data.synth import generate

    generate(tmp_path / "synth", n_images=6, size=(128, 128), seed=0)
    return read_sartorius(tmp_path / "synth")


@pytest.mark.detectron2
def test_detectron2_trains_on_crops_with_auto_anchors_and_predicts_tiles(tmp_path):
    """A real tiny Detectron2 training with train_crop and anchor_sizes=auto; the anchors derived are in
    the network and in meta.json; tiled prediction gives whole-image instances, the same after load."""
    pytest.importorskip("detectron2")
    import json

    from bench.adapters.base import FitContext
    from bench.adapters.registry import build
    from bench.tiling import predictor

    ds = _tiny_synth(tmp_path)
    opts = {"iterations": 2, "lr_steps": [], "warmup_iters": 1, "log_every": 1, "min_size_train": [80],
            "max_size_train": 80, "min_size_test": 80, "max_size_test": 80, "num_workers": 0,
            "score_thresh_test": 0.0, "batch_size": 2, "train_crop": 80, "anchor_sizes": "auto",
            "predict_tile": 80, "predict_tile_overlap": 24}
    cfg = make_config("maskrcnn", "smoke", opts)
    a = build("maskrcnn", ds.classes, "smoke")
    log = []
    a.fit(ds.samples[:4], [], cfg, FitContext(tmp_path / "w", "cpu", 0, None, log.append))
    assert np.isfinite(log[-1]["loss"])
    got = a.anchors["anchor_sizes"]
    assert [list(s) for s in a.d2cfg.MODEL.ANCHOR_GENERATOR.SIZES] == [[float(s)] for s in got]
    val = ds.samples[4:5]
    pred = predictor(a)(val)[0]
    assert (pred.height, pred.width) == (128, 128)
    a.save(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "meta.json").read_text())["extra"]["anchors"]["anchor_sizes"] == got
    b = build("maskrcnn", ds.classes, "smoke")
    b.load(tmp_path / "ckpt")
    np.testing.assert_array_equal(predictor(b)(val)[0].scores, pred.scores)


def test_cascade_trains_on_crops_with_auto_anchor_scales_and_predicts_tiles(tmp_path):
    """The same with MMDetection: its RandomCrop/FilterAnnotations steps in a real (2-iteration)
    training, the derived anchor scale in the model and in meta.json, tiled prediction."""
    pytest.importorskip("mmdet")
    pytest.importorskip("mmcv.ops")
    import json

    from bench.adapters.base import FitContext
    from bench.adapters.registry import build
    from bench.tiling import predictor

    ds = _tiny_synth(tmp_path)
    opts = dict(depth=18, base_channels=32, fpn_channels=32, bbox_fc_channels=64, mask_convs=1, rpn_sample_num=64,
                rcnn_sample_num=64, rpn_train_nms_pre=300, rpn_train_max_per_img=300, rpn_nms_pre=300,
                rpn_max_per_img=200, max_per_img=100, score_thr=0.0, iterations=2, warmup_iters=1, batch_size=2,
                num_workers=0, log_every=1, train_crop=80, anchor_scales="auto", predict_tile=80,
                predict_tile_overlap=24, image_scale="auto", target_cell_px=20.0)
    cfg = make_config("cascade", "smoke", opts)
    a = build("cascade", ds.classes, "smoke")
    log = []
    a.fit(ds.samples[:4], [], cfg, FitContext(tmp_path / "w", "cpu", 0, None, log.append))
    assert np.isfinite(log[-1]["loss"])
    (scale,) = a.anchors["anchor_scales"]
    assert list(a.model.rpn_head.prior_generator.scales.tolist()) == pytest.approx([scale])
    # image_scale=auto: target / the training cells' median, the factor the anchors were measured at
    from bench.anchors import median_cell_px

    median = median_cell_px([s.instances for s in ds.samples[:4]])
    assert a.cfg.image_scale == pytest.approx(round(20.0 / median / 0.05) * 0.05) == a.derived_scale["image_scale"]
    val = ds.samples[4:5]
    pred = predictor(a)(val)[0]
    assert (pred.height, pred.width) == (128, 128)
    a.save(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "meta.json").read_text())["extra"]["anchors"]["anchor_scales"] == [scale]


def test_torchvision_scale_from_the_training_set_reaches_training_prediction_and_checkpoint(tmp_path, monkeypatch):
    """``train_crop: auto`` / ``predict_tile: auto`` / ``anchor_sizes: auto`` in a real (2-iteration)
    torchvision training: the crop derived from the training cells' median is the one the training
    loop crops to and the tile prediction uses, meta.json keeps the resolved config and how it was
    derived, and a loaded model predicts with the same tile (same scores)."""
    import json

    from bench.adapters.base import FitContext
    from bench.adapters.registry import build
    from bench.anchors import auto_scale_crop
    from bench.data.io import read_sartorius
    from bench.data.synth import generate
    from bench.tiling import predictor

    generate(tmp_path / "synth", n_images=5, size=(256, 256), seed=0)
    ds = read_sartorius(tmp_path / "synth")
    train, val = ds.samples[:4], ds.samples[4:5]
    want = auto_scale_crop([s.instances for s in train], 128, 12.0)
    assert 0 < want["train_crop"] < 256  # the test needs a real crop
    opts = {"backbone": "resnet18", "fpn_channels": 32, "iterations": 2, "lr_steps": [], "warmup_iters": 1,
            "log_every": 1, "batch_size": 2, "min_size": 128, "min_size_train": [128], "max_size": 256,
            "box_score_thresh": 0.0, "train_crop": "auto", "predict_tile": "auto", "target_cell_px": 12.0,
            "anchor_sizes": "auto"}
    cfg = make_config("maskrcnn-tv", "smoke", opts)
    a = build("maskrcnn-tv", ds.classes, "smoke")
    seen = []
    real_crop = tiling.random_crop

    def spy(img, inst, size, *args, **kw):
        seen.append(size)
        return real_crop(img, inst, size, *args, **kw)

    monkeypatch.setattr(tiling, "random_crop", spy)  # the training loop imports it at each crop
    a.fit(train, [], cfg, FitContext(tmp_path / "w", "cpu", 0, None, lambda r: None))
    monkeypatch.undo()
    assert a.cfg.train_crop == a.cfg.predict_tile == want["train_crop"] and set(seen) == {want["train_crop"]}
    assert a.derived_scale["median_cell_px"] == want["median_cell_px"]
    assert min(a.anchors["anchor_sizes"]) >= 8  # never under 2x the P2 stride
    pred = predictor(a)(val)[0]
    assert (pred.height, pred.width) == (256, 256)
    a.save(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "meta.json").read_text())
    assert meta["config"]["predict_tile"] == want["train_crop"] and meta["extra"]["scale"]["target_cell_px"] == 12.0
    b = build("maskrcnn-tv", ds.classes, "smoke")
    b.load(tmp_path / "ckpt")
    assert b.cfg.predict_tile == want["train_crop"]
    np.testing.assert_array_equal(predictor(b)(val)[0].scores, pred.scores)
    # predict_tile=auto means the crop train_crop=auto derives: alone it is refused, naming both
    lone = make_config("maskrcnn-tv", "smoke", {**opts, "train_crop": 0})
    with pytest.raises(ValueError, match="predict_tile=auto.*train_crop=auto"):
        build("maskrcnn-tv", ds.classes, "smoke").fit(train, [], lone, FitContext(tmp_path / "w2", "cpu", 0, None,
                                                                                   lambda r: None))


def test_bench_run_predicts_tiles_where_asked(tmp_path, tiny_synth):
    """Through the runner: watershed with predict_tile (4 tiles per 128 px image) scores as the whole-image
    watershed does (the seams are stitched), and its predictions cover the whole images."""
    from bench.data.predictions import read_predictions
    from bench.runner.run import run_benchmark

    run_dir, out = run_benchmark(["watershed", "watershed:predict_tile=80,predict_tile_overlap=32"], str(tiny_synth),
                                 "smoke", "cpu", 0, tmp_path / "run", results=tmp_path / "results",
                                 echo=lambda *_: None)
    assert [o.state for o in out] == ["done", "done"], [o.detail for o in out]
    whole, tiled = (o.metrics["kaggle_map"] for o in out)
    assert whole > 0.05 and abs(whole - tiled) < 0.03, (whole, tiled)
    plain, _ = read_predictions(run_dir / "models" / out[0].label / "predictions.jsonl.gz")
    preds, _ = read_predictions(run_dir / "models" / out[1].label / "predictions.jsonl.gz")
    assert preds and all((p.height, p.width) == (128, 128) for p in preds.values())
    # tiles did run: watershed's seeds near the seams see less context, so some masks differ
    assert any(len(preds[k]) != len(plain[k]) or any(not np.array_equal(a, b) for a, b in
                                                     zip(preds[k].counts, plain[k].counts)) for k in preds)


@pytest.mark.parametrize("name", ["maskrcnn", "maskrcnn-tv", "cascade"])
def test_cpu_presets_derive_each_detectors_scale_from_its_own_resize(name, tmp_path):
    """The shipped ``cpu`` presets resolve ``auto`` against each detector's own resize key (Detectron2:
    ``min_size_test``, torchvision: ``min_size``; Cascade: a factor) and the anchors of the resolved
    config: what bench/anchors.py computes for these instances, nothing hard-coded."""
    from bench import anchors
    from bench.adapters.registry import get
    from bench.adapters.trainable import resolve_auto_scale
    from bench.data.io import read_sartorius
    from bench.data.synth import generate

    generate(tmp_path / "synth", n_images=3, size=(704, 520), seed=0)
    train = read_sartorius(tmp_path / "synth").samples
    insts = [s.instances for s in train]
    cfg = make_config(name, "cpu")
    resolved, derived = resolve_auto_scale(get(name), cfg, train)
    if name == "cascade":
        assert resolved.image_scale == anchors.auto_image_scale(insts, 20.0)["image_scale"] == derived["image_scale"]
        assert resolved.train_crop == 0 and resolved.predict_tile == 0
    else:
        short = resolved.min_size_test if name == "maskrcnn" else resolved.min_size
        want = anchors.auto_scale_crop(insts, short, 20.0)
        assert resolved.train_crop == resolved.predict_tile == want["train_crop"] and derived == want
        assert resolved.predict_tile_overlap < max(resolved.predict_tile, 1) or resolved.predict_tile == 0
    assert cfg.model_dump() != resolved.model_dump() and (cfg.train_crop == "auto" or cfg.image_scale == "auto")
