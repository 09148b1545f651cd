"""Detectron2 Mask R-CNN adapter.

Everything that does not need detectron2 (the paper preset's mapping onto detectron2
keys, dataset dicts, availability, config validation) runs everywhere; the tests that
train the real framework are marked ``detectron2`` and skip where it is not importable.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.adapters import detectron2_maskrcnn as d2m
from bench.adapters.base import FitContext
from bench.adapters.registry import ConfigError, build, get, make_config
from bench.adapters.trainable import VOCABULARY
from bench.data.normalize import InputPolicy, normalize
from bench.data.rle import from_coco_segmentation
from bench.data.sample import Instances, Sample

HAS_D2 = importlib.util.find_spec("detectron2") is not None
needs_d2 = [pytest.mark.detectron2, pytest.mark.skipif(not HAS_D2, reason="detectron2 is not installed")]
CLASSES = ["shsy5y", "astro", "cort"]


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """8 synthetic 160x128 images (Sartorius format), read back as a cellbench dataset."""
    from bench.data.io import read_sartorius
    from bench.data.synth import generate

    root = tmp_path_factory.mktemp("synth_d2")
    generate(root, n_images=8, size=(160, 128), seed=0)
    return read_sartorius(root)


def _square_sample(image_id="a", h=40, w=50, dtype=np.uint8, with_path=None) -> Sample:
    m1 = np.zeros((h, w), bool)
    m1[5:15, 10:30] = True
    m2 = np.zeros((h, w), bool)
    m2[20:35, 2:9] = True
    inst = Instances.from_masks(np.stack([m1, m2]), classes=np.array([2, 0]))
    img = (np.arange(h * w).reshape(h, w) % 251).astype(dtype)
    return Sample(image_id, inst, path=with_path, _image=None if with_path else img)


# ---------------------------------------------------------------------------
# without detectron2
# ---------------------------------------------------------------------------

def test_registered_and_declared():
    cls = get("maskrcnn")
    assert cls is d2m.Detectron2MaskRCNN
    assert cls.framework == "detectron2"
    assert cls.framework_modules == ("detectron2", "detectron2.model_zoo")
    assert cls.capabilities.predicts_classes and cls.capabilities.overlapping_masks
    assert "make setup-detectron2 D2_SRC=" in cls.install_hint


def test_shared_vocabulary_and_framework_keys():
    cls = get("maskrcnn")
    assert set(cls.framework_keys) == set(VOCABULARY) & set(cls.Config.model_fields)
    assert cls.framework_keys["iterations"] == "SOLVER.MAX_ITER" and cls.framework_keys["lr"] == "SOLVER.BASE_LR"
    assert cls.framework_keys["batch_size"] == "SOLVER.IMS_PER_BATCH"
    # every detectron2 key named there is one the adapter sets
    opts = d2m.to_detectron2_opts(make_config("maskrcnn", "smoke"))
    named = {v.split()[0] for v in cls.framework_keys.values() if v.split()[0].isupper()}
    assert named and named <= set(opts), named - set(opts)


def test_unavailable_gives_install_hint(monkeypatch):
    # None in sys.modules makes any import of the name fail with ModuleNotFoundError
    for mod in ("detectron2", "detectron2.model_zoo"):
        monkeypatch.setitem(sys.modules, mod, None)
    av = d2m.Detectron2MaskRCNN.available()
    assert not av.ok and av.version is None
    assert "detectron2 has no PyPI package: make setup-detectron2 D2_SRC=" in av.hint


def test_paper_preset_lands_on_detectron2_keys(monkeypatch):
    cfg = make_config("maskrcnn", "paper")
    monkeypatch.setitem(sys.modules, "detectron2", None)  # the mapping must not import detectron2
    o = d2m.to_detectron2_opts(cfg, num_classes=3, device="cuda", pixel_mean=[1.0, 2.0, 3.0], pixel_std=[4.0] * 3)
    expected = {
        "MODEL.RESNETS.DEPTH": 50,
        "MODEL.ANCHOR_GENERATOR.SIZES": [[24.0], [40.0], [80.0], [128.0], [256.0]],
        "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[0.33, 1.0, 3.0]],
        "MODEL.RPN.IOU_THRESHOLDS": [0.2, 0.7],
        "MODEL.RPN.NMS_THRESH": 0.75,
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 15000,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN": 3000,
        "MODEL.RPN.PRE_NMS_TOPK_TEST": 10000,
        "MODEL.RPN.POST_NMS_TOPK_TEST": 2000,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 512,
        "TEST.DETECTIONS_PER_IMAGE": 700,
        "MODEL.PIXEL_MEAN": [127.965] * 3,       # the preset's value wins over the data's
        "MODEL.PIXEL_STD": [4.0] * 3,            # not set by the preset: the data's
        "SOLVER.BASE_LR": 5e-4,
        "SOLVER.GAMMA": 0.8,
        "SOLVER.STEPS": (2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000),
        "SOLVER.MAX_ITER": 10000,
        "MODEL.BACKBONE.FREEZE_AT": 1,
        "INPUT.RANDOM_FLIP": "horizontal",
        "INPUT.MASK_FORMAT": "bitmask",
        "MODEL.ROI_HEADS.NUM_CLASSES": 3,
        "MODEL.DEVICE": "cuda",
        "MODEL.WEIGHTS": "",
        "MODEL.MASK_ON": True,
    }
    for k, v in expected.items():
        assert o[k] == v, (k, o[k], v)
        assert type(o[k]) is type(v), k  # yacs refuses e.g. an int where a float was
    assert len(o["INPUT.MIN_SIZE_TRAIN"]) > 1 and o["INPUT.MIN_SIZE_TRAIN_SAMPLING"] == "choice"  # multi-scale


def test_every_preset_validates_and_maps():
    for preset in ("smoke", "default", "paper"):
        cfg = make_config("maskrcnn", preset)
        o = d2m.to_detectron2_opts(cfg, num_classes=3, device="cpu")
        assert o["MODEL.WEIGHTS"] == ""           # never the zoo's download URL
        assert o["TEST.DETECTIONS_PER_IMAGE"] >= 700
        assert all(k.isupper() or "." in k for k in o)
    smoke = make_config("maskrcnn", "smoke")
    assert smoke.resnet_depth <= 50 and smoke.iterations <= 500
    assert d2m.to_detectron2_opts(smoke)["MODEL.RESNETS.RES2_OUT_CHANNELS"] == (64 if smoke.resnet_depth < 50 else 256)


def test_weights_path_goes_to_model_weights(tmp_path):
    w = tmp_path / "w.pth"
    w.write_bytes(b"x")
    cfg = make_config("maskrcnn", "smoke", {"weights": str(w)})
    assert d2m.to_detectron2_opts(cfg)["MODEL.WEIGHTS"] == str(w)


@pytest.mark.parametrize("bad", [
    {"no_such_option": 1},
    {"anchor_sizes": [8, 16, 32]},                  # needs one per FPN level
    {"rpn_iou_thresholds": [0.8, 0.3]},
    {"lr_steps": [300, 100]},
    {"random_flip": "diagonal"},
    {"pixel_std": 0},
    {"resnet_depth": 42},
])
def test_config_validation(bad):
    with pytest.raises(ConfigError):
        make_config("maskrcnn", "smoke", bad)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope" / "model.pkl"
    m = build(f"maskrcnn:weights={missing}", CLASSES, preset="smoke")
    with pytest.raises(FileNotFoundError, match=str(missing)):
        m.fit([_square_sample()], [], m.cfg, FitContext(workdir=tmp_path / "w"))


def test_dataset_dicts(tmp_path):
    s = _square_sample()
    (d,) = d2m.to_dataset_dicts([s], CLASSES, image_dir=tmp_path)
    assert (d["height"], d["width"], d["image_id"]) == (40, 50, "a")
    assert Path(d["file_name"]).is_file() and np.array_equal(np.load(d["file_name"]), s.image)
    a0, a1 = d["annotations"]
    assert a0["bbox"] == [10.0, 5.0, 20.0, 10.0] and a1["bbox"] == [2.0, 20.0, 7.0, 15.0]
    assert a0["bbox_mode"] == 1 and a0["category_id"] == 2 and a1["category_id"] == 0 and a0["iscrowd"] == 0
    assert set(a0["segmentation"]) == {"size", "counts"} and isinstance(a0["segmentation"]["counts"], str)
    assert np.array_equal(from_coco_segmentation(a0["segmentation"], 40, 50), s.instances.counts[0])
    # pycocotools reads the RLE back to the same mask
    from pycocotools import mask as mask_util

    assert np.array_equal(mask_util.decode(a0["segmentation"]).astype(bool), s.instances.dense(0))


def test_dataset_dicts_use_the_sample_path(tiny):
    dicts = d2m.to_dataset_dicts(tiny.samples[:2], tiny.classes)
    assert [d["file_name"] for d in dicts] == [str(s.path) for s in tiny.samples[:2]]
    assert sum(len(d["annotations"]) for d in dicts) == sum(len(s.instances) for s in tiny.samples[:2])


def test_dataset_dicts_errors():
    with pytest.raises(ValueError, match="image_dir"):
        d2m.to_dataset_dicts([_square_sample()], CLASSES)
    with pytest.raises(ValueError, match="class"):
        d2m.to_dataset_dicts([_square_sample()], ["only"], image_dir="/tmp")


def test_network_input_is_the_policy_in_bgr255(tmp_path):
    g = np.array([[0.0, 0.4], [0.8, 1.0]], np.float32)
    out = d2m.to_bgr255(g)
    assert out.shape == (2, 2, 3) and out.dtype == np.float32 and out.flags.c_contiguous
    assert np.array_equal(out[..., 0], g * 255) and np.array_equal(out[..., 2], g * 255)
    rgb = np.zeros((2, 2, 3), np.float32)
    rgb[..., 0] = 1.0  # red
    assert (d2m.to_bgr255(rgb)[..., 2] == 255).all() and (d2m.to_bgr255(rgb)[..., 0] == 0).all()

    m = build("maskrcnn", CLASSES, preset="smoke")
    s = _square_sample()
    assert np.array_equal(m._network_input(s.image), d2m.to_bgr255(normalize(s.image, InputPolicy())))
    # training reads the dataset dicts' files through the same policy as inference
    (d,) = d2m.to_dataset_dicts([s], CLASSES, image_dir=tmp_path)
    assert np.array_equal(d2m._Mapper([], m.policy).image(d["file_name"]), m._network_input(s.image))


def test_image_stats(tmp_path):
    s = _square_sample()
    x = d2m.to_bgr255(normalize(s.image, InputPolicy()))
    mean, std = d2m.image_stats(d2m.to_dataset_dicts([s], CLASSES, image_dir=tmp_path), InputPolicy())
    assert mean == pytest.approx([float(x.mean())] * 3, abs=1e-3)
    assert std == pytest.approx([float(x.std())] * 3, abs=1e-2)


# ---------------------------------------------------------------------------
# with detectron2: real training on CPU
# ---------------------------------------------------------------------------

TINY_OPTS = {"iterations": 12, "lr_steps": [10], "warmup_iters": 2, "log_every": 4, "min_size_train": [128],
             "min_size_test": 128, "num_workers": 0, "score_thresh_test": 0.0}


@pytest.mark.detectron2
@pytest.mark.skipif(not HAS_D2, reason="detectron2 is not installed")
def test_detectron2_config_merges_every_key():
    m = build("maskrcnn", CLASSES, preset="paper")
    m.pixel_stats = ([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    d2 = m._d2_config(seed=3)
    opts = d2m.to_detectron2_opts(m.cfg, num_classes=3, device="cpu", pixel_mean=[1.0, 2.0, 3.0],
                                  pixel_std=[4.0, 5.0, 6.0], seed=3)
    for k, v in opts.items():
        node = d2
        for part in k.split("."):
            node = node[part]
        assert (list(node) if isinstance(node, tuple) else node) == (list(v) if isinstance(v, tuple) else v), k
    assert d2.MODEL.WEIGHTS == "" and d2.MODEL.PIXEL_MEAN == [127.965] * 3


@pytest.mark.detectron2
@pytest.mark.slow
@pytest.mark.skipif(not HAS_D2, reason="detectron2 is not installed")
def test_fit_predict_save_load(tiny, tmp_path):
    from detectron2.data import DatasetCatalog

    train, val = tiny.samples[:6], tiny.samples[6:]
    # one in-memory sample (no file): written to the work dir for detectron2
    train = train[:-1] + [Sample("inmem", train[-1].instances, None, dict(train[-1].meta), train[-1].image)]
    m = build("maskrcnn", tiny.classes, preset="smoke")
    cfg = make_config("maskrcnn", "smoke", TINY_OPTS)
    logs, progress, curve = [], [], []
    ctx = FitContext(workdir=tmp_path / "run", log_loss=logs.append,
                     progress=lambda d, t, info: progress.append((d, t)), val=val, eval_every=6,
                     log_val=curve.append)
    before = set(DatasetCatalog.list())
    m.fit(train, val, cfg, ctx)
    assert [r["step"] for r in curve] == [6, 12] and all(0 <= r["kaggle_map"] <= 1 for r in curve)
    assert m.model.training is False
    assert set(DatasetCatalog.list()) == before          # registered for the fit only
    assert [r["step"] for r in logs] == [4, 8, 12]       # the shared log schema
    assert all(np.isfinite(r["loss"]) and "loss_mask" in r and r["lr"] > 0 and r["seconds"] >= 0
               and not {"iteration", "time", "time_s"} & set(r) for r in logs)
    # the input policy: a uint16 image and the same image as uint8 reach the network alike
    gray8 = val[0].image if val[0].image.ndim == 2 else val[0].image[:, :, 0]
    x8, x16 = m._network_input(gray8), m._network_input(gray8.astype(np.uint16) * 257)
    assert x8.shape == gray8.shape + (3,) and np.allclose(x8, x16, atol=1e-3)
    assert progress[-1] == (12, 12)
    assert (tmp_path / "run" / "detectron2" / "images" / "inmem.npy").is_file()

    preds = m.predict(val)
    assert len(preds) == len(val)
    for p, s in zip(preds, val):
        assert (p.height, p.width) == (s.height, s.width)
        assert p.scores is not None and len(p.scores) == len(p)
        assert ((p.classes >= 0) & (p.classes < 3)).all()
    assert sum(len(p) for p in preds) > 0  # score_thresh_test=0: an untrained model still proposes

    m.save(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [d2m.D2_CONFIG_FILE, "meta.json",
                                                                       d2m.WEIGHTS_FILE]
    fresh = build("maskrcnn", ["x"], preset="smoke")   # classes and config come from meta.json
    fresh.load(tmp_path / "saved")
    assert fresh.classes == list(tiny.classes) and fresh.cfg == m.cfg
    assert tuple(fresh.pixel_stats) == tuple(m.pixel_stats)
    again = fresh.predict(val)
    for a, b in zip(preds, again):
        assert len(a) == len(b)
        assert np.array_equal(a.scores, b.scores) and np.array_equal(a.classes, b.classes)
        assert all(np.array_equal(x, y) for x, y in zip(a.counts, b.counts))
    # batched inference (one GeneralizedRCNN call for all images) returns what image-by-image does
    fresh.cfg = fresh.cfg.model_copy(update={"predict_batch_size": len(val)})
    for a, b in zip(preds, fresh.predict(val)):
        assert len(a) == len(b) and np.array_equal(a.classes, b.classes)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=1e-5)

    # a local weights file to start from (here: the model just saved), never downloaded
    tuned = build("maskrcnn", tiny.classes, preset="smoke")
    tcfg = make_config("maskrcnn", "smoke", {**TINY_OPTS, "iterations": 1, "lr_steps": [],
                                             "weights": str(tmp_path / "saved" / "model_final.pth")})
    tuned.fit(train, val, tcfg, FitContext(workdir=tmp_path / "tuned"))
    assert len(tuned.predict(val[:1])) == 1


@pytest.mark.detectron2
@pytest.mark.skipif(not HAS_D2, reason="detectron2 is not installed")
@pytest.mark.parametrize("preset", ["smoke", "default", "paper"])
def test_every_preset_builds_a_model(preset):
    m = build("maskrcnn", CLASSES, preset=preset)
    m.pixel_stats = ([128.0] * 3, [10.0] * 3)
    d2 = m._d2_config()
    model = m._build_model(d2)
    assert model.roi_heads.num_classes == 3 and d2.MODEL.WEIGHTS == ""
    assert d2.INPUT.MASK_FORMAT == "bitmask" and d2.MODEL.MASK_ON


@pytest.mark.detectron2
@pytest.mark.skipif(not HAS_D2, reason="detectron2 is not installed")
def test_uint16_grey_training_step(tmp_path):
    """A 16-bit grey in-memory sample goes through the mapper and one training step."""
    s = _square_sample(h=64, w=64, dtype=np.uint16)
    m = build("maskrcnn", CLASSES, preset="smoke")
    cfg = make_config("maskrcnn", "smoke", {**TINY_OPTS, "iterations": 2, "lr_steps": [], "batch_size": 1,
                                            "min_size_train": [64], "min_size_test": 64, "num_workers": 1})
    m.fit([s], [], cfg, FitContext(workdir=tmp_path))
    (p,) = m.predict([s])
    assert (p.height, p.width) == (64, 64)


@pytest.mark.detectron2
@pytest.mark.skipif(not HAS_D2, reason="detectron2 is not installed")
@pytest.mark.parametrize("opts", [{"optimizer": "adam", "augment": "extra"}, {"augment": "none"}])
def test_optimizer_and_augmentation_variants_train(tiny, tmp_path, opts):
    """The study's Adam and augmentation variants are real detectron2 trainings, not config labels."""
    from detectron2.data import transforms as T

    m = build("maskrcnn", tiny.classes, preset="smoke")
    cfg = make_config("maskrcnn", "smoke", {**TINY_OPTS, "iterations": 2, "lr_steps": [], **opts})
    m.cfg = cfg
    m.pixel_stats = ([128.0] * 3, [10.0] * 3)
    augs = d2m.train_augmentations(m._d2_config(), cfg.augment)
    kinds = [type(a).__name__ for a in augs]
    if cfg.augment == "extra":
        assert {"RandomBrightness", "RandomContrast", "RandomFlip"} <= set(kinds) and kinds.count("RandomFlip") == 2
        assert isinstance(augs[0], T.ResizeShortestEdge) and augs[0].is_range
    else:
        assert kinds == ["ResizeShortestEdge"]
    logs = []
    m.fit(tiny.samples[:4], [], cfg, FitContext(workdir=tmp_path, log_loss=logs.append))
    assert logs and np.isfinite(logs[-1]["loss"])
    if cfg.optimizer == "adam":
        assert logs[-1]["lr"] > 0
