"""The MMDetection Cascade Mask R-CNN adapter: config validation, no downloads, real training.

The framework tests train the real mmdet 3.3.0 on CPU: a tiny network for a few
iterations on tiny synthetic images (train, predict, save, load, identical predictions),
a second fit in the same process (no leaked mmengine scope/logger state; the RNGs as the
base's seeding left them) and a start from a local mmengine-style checkpoint (which
torch's default ``weights_only=True`` loader rejects).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from bench.adapters.base import FitContext
from bench.adapters.registry import ConfigError, build, get, make_config
from bench.adapters.trainable import VOCABULARY, seed_everything
from bench.data.sample import Instances

CLASSES = ["shsy5y", "astro", "cort"]

# a network small enough to train a few iterations in seconds on one CPU core
TINY = dict(depth=18, base_channels=32, fpn_channels=32, bbox_fc_channels=64, mask_convs=1,
            rpn_sample_num=64, rcnn_sample_num=64, rpn_train_nms_pre=300, rpn_train_max_per_img=300,
            rpn_nms_pre=300, rpn_max_per_img=200, max_per_img=100, score_thr=0.0,
            iterations=4, warmup_iters=2, batch_size=2, num_workers=0, log_every=2, augment="default")


def _needs_mmdet():
    pytest.importorskip("mmdet")
    pytest.importorskip("mmcv.ops")
    pytest.importorskip("mmengine")


# ---- no framework needed -------------------------------------------------------
def test_shared_vocabulary_and_framework_keys():
    cls = get("cascade")
    fields = set(cls.Config.model_fields)
    assert set(cls.framework_keys) == set(VOCABULARY) & fields  # every shared knob it has, named
    assert "seed" not in fields  # the run's seed (the base seeds); no per-adapter one


def test_presets_validate():
    smoke = make_config("cascade", "smoke")
    default = make_config("cascade", "default")
    assert smoke.weights is None and default.weights is None  # from scratch: nothing to download
    assert smoke.iterations < default.iterations
    # Sartorius images hold up to ~700 cells: no preset may cap detections below that
    assert default.max_per_img >= 1000 and default.rpn_max_per_img >= 1000 and default.rpn_nms_pre >= 1000
    assert smoke.max_per_img >= 1000
    assert default.lr_steps == sorted(default.lr_steps) and default.lr_steps[-1] < default.iterations


def test_config_errors():
    with pytest.raises(ConfigError, match="no_such_option"):
        make_config("cascade", "smoke", {"no_such_option": 1})
    with pytest.raises(ConfigError, match="depth"):
        make_config("cascade", "smoke", {"depth": 42})
    with pytest.raises(ConfigError, match="lr_steps"):
        make_config("cascade", "smoke", {"iterations": 100, "lr_steps": [50, 150]})
    with pytest.raises(ConfigError, match="fpn_channels"):
        make_config("cascade", "smoke", {"norm": "GN", "fpn_channels": 48})
    with pytest.raises(ConfigError, match="anchor_ratios"):
        make_config("cascade", "smoke", {"anchor_ratios": []})
    with pytest.raises(ConfigError, match="max_per_img"):
        make_config("cascade", "smoke", {"max_per_img": "lots"})


def test_missing_weights_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "cascade_coco.pth"
    m = build(f"cascade:weights={missing}", CLASSES, preset="smoke")
    with pytest.raises(FileNotFoundError, match=str(missing)):
        m.fit([], [], m.cfg, FitContext(workdir=tmp_path))


# ---- the real mmdet ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from bench.data.io import read_sartorius
    from bench.data.synth import generate

    out = tmp_path_factory.mktemp("cascade_synth")
    generate(out, n_images=8, size=(160, 128), seed=1)
    ds = read_sartorius(out)
    return ds.samples[:6], ds.samples[6:], ds.classes


def _fit(tiny, workdir: Path, curve: list | None = None, seed: int = 0, **overrides):
    train, val, classes = tiny
    cfg = make_config("cascade", "smoke", {**TINY, **overrides})
    model = get("cascade")(cfg, classes, "cpu")
    logs, reports = [], []
    ctx = FitContext(workdir=workdir, seed=seed, log_loss=logs.append,
                     progress=lambda done, total, info: reports.append((done, total)),
                     val=val, eval_every=cfg.eval_every, log_val=(curve.append if curve is not None else None))
    model.fit(train, val, cfg, ctx)
    return model, logs, reports


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    _needs_mmdet()
    workdir = tmp_path_factory.mktemp("cascade_fit")
    model, logs, reports = _fit(tiny, workdir)
    return model, logs, reports, workdir


def _same(a: list[Instances], b: list[Instances]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x) == len(y)
        assert np.array_equal(x.classes, y.classes)
        assert np.array_equal(x.scores, y.scores)
        assert all(np.array_equal(p, q) for p, q in zip(x.counts, y.counts))


def test_model_config_is_mmdets_cascade_adapted_to_cells():
    _needs_mmdet()
    from bench.adapters import mmdet_cascade as M

    assert M._mmdet_config_path(M.BASE_CONFIG).is_file()  # shipped with the installed mmdet
    m = build("cascade", CLASSES, preset="default")
    m.pixel_mean, m.pixel_std = [128.0] * 3, [11.5] * 3
    cfg = m._model_cfg()
    assert cfg["type"] == "CascadeRCNN"
    assert [h["num_classes"] for h in cfg["roi_head"]["bbox_head"]] == [3, 3, 3]
    assert cfg["roi_head"]["mask_head"]["num_classes"] == 3
    assert cfg["rpn_head"]["anchor_generator"]["ratios"] == m.cfg.anchor_ratios
    assert cfg["test_cfg"]["rcnn"]["max_per_img"] == m.cfg.max_per_img >= 1000
    assert cfg["test_cfg"]["rpn"]["max_per_img"] >= 1000
    assert cfg["test_cfg"]["rcnn"]["mask_thr_binary"] == m.cfg.mask_thr_binary
    assert cfg["data_preprocessor"]["mean"] == [128.0] * 3 and cfg["data_preprocessor"]["std"] == [11.5] * 3
    assert cfg["backbone"]["init_cfg"] is None
    text = repr(cfg)
    assert "torchvision://" not in text and "Pretrained" not in text and "http" not in text


def test_fit_predict_save_load(trained, tiny, tmp_path):
    import cv2

    model, logs, reports, workdir = trained
    train, val, _ = tiny
    # losses every log_every iterations in the shared schema, progress every iteration
    steps = [r["step"] for r in logs]
    assert steps == [2, 4]
    assert all(math.isfinite(r["loss"]) and r["lr"] > 0 and "s2.loss_mask" in r and r["seconds"] >= 0
               and not {"iteration", "time", "time_s"} & set(r) for r in logs)
    assert reports[0] == (0, 4) and reports[-1] == (4, 4)
    # the framework's files stay in the model's folder
    assert (workdir / "data" / "train.json").is_file() and (workdir / "mmdet").is_dir()
    coco = json.loads((workdir / "data" / "train.json").read_text())
    assert [c["name"] for c in coco["categories"]] == CLASSES and len(coco["images"]) == 6
    # the input policy: the training PNG is the array prediction feeds, and bit depth does not matter
    png = cv2.imread(str(workdir / "data" / "images" / "000000.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(png, model._image(train[0].image))
    gray8 = train[0].image if train[0].image.ndim == 2 else train[0].image[:, :, 0]
    x8, x16 = model._image(gray8), model._image(gray8.astype(np.uint16) * 257)
    assert x8.dtype == np.uint8 and x8.shape == gray8.shape + (3,)
    assert np.abs(x8.astype(int) - x16).max() <= 1  # equal up to float rounding at .5

    preds = model.predict(val)
    assert len(preds) == len(val)
    for s, p in zip(val, preds):
        assert (p.height, p.width) == (s.height, s.width)
        assert p.scores is not None and len(p.scores) == len(p)
        assert ((p.classes >= 0) & (p.classes < 3)).all()
    assert sum(len(p) for p in preds) > 0
    assert _same(preds, model.predict(val)) is None  # deterministic

    model.save(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "meta.json").read_text())
    assert meta["adapter"] == "cascade" and meta["classes"] == CLASSES
    assert meta["extra"]["pixel_mean"] == model.pixel_mean and meta["extra"]["mmdet_version"]
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["meta.json", "mmdet_model_config.py",
                                                                       "model.pth"]
    fresh = build("cascade", CLASSES, preset="smoke")
    fresh.load(tmp_path / "saved")
    assert fresh.cfg == model.cfg and (fresh.pixel_mean, fresh.pixel_std) == (model.pixel_mean, model.pixel_std)
    _same(preds, fresh.predict(val))


def test_second_fit_in_one_process_leaks_no_global_state(trained, tiny, tmp_path):
    import torch
    from mmengine.logging import MessageHub, MMLogger
    from mmengine.registry import DefaultScope
    from mmengine.visualization import Visualizer

    first = trained[0]
    managers = (DefaultScope, MMLogger, MessageHub, Visualizer)
    before = {cls: list(cls._instance_dict) for cls in managers}
    seed_everything(7)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(123)

    second, logs, _ = _fit(tiny, tmp_path / "second", seed=7, iterations=2, log_every=1)

    # the base seeds the run (seed 7); mmengine's Runner re-seeds and draws, which is undone
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert {cls: list(cls._instance_dict) for cls in managers} == before  # no scope/logger left behind
    assert [r["step"] for r in logs] == [1, 2]
    assert (tmp_path / "second" / "mmdet").is_dir()
    _, val, _ = tiny
    assert len(second.predict(val[:1])) == 1 and len(first.predict(val[:1])) == 1


def test_weights_from_a_local_mmengine_checkpoint(trained, tiny, tmp_path):
    import torch

    model = trained[0]
    sd = {f"module.{k}": v.clone() for k, v in model.model.state_dict().items()}  # as saved from DDP
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"meta": {"epoch": 1, "hist": np.array([1.0, 2.0])}, "state_dict": sd}, ckpt)
    with pytest.raises(Exception):  # why the adapter passes weights_only=False for this file
        torch.load(ckpt, map_location="cpu", weights_only=True)

    tuned, _, _ = _fit(tiny, tmp_path / "ft", weights=str(ckpt), iterations=1, warmup_iters=0,
                       lr=1e-12, weight_decay=0.0, log_every=1)
    now = tuned.model.state_dict()
    for k, v in sd.items():
        assert torch.allclose(now[k[len("module."):]].float(), v.float(), atol=1e-6), k


def test_backbone_only_checkpoint_is_prefixed(trained, tmp_path):
    import torch
    from bench.adapters import mmdet_cascade as M

    src = trained[0].model
    backbone = {k[len("backbone."):]: v.clone() for k, v in src.state_dict().items() if k.startswith("backbone.")}
    path = tmp_path / "resnet.pth"
    torch.save(backbone, path)
    m = build("cascade", CLASSES, preset="smoke")
    m.cfg = make_config("cascade", "smoke", TINY)
    m.pixel_mean, m.pixel_std = trained[0].pixel_mean, trained[0].pixel_std
    with M._mm_isolation("cpu"):
        fresh = m._build_model()
        M._load_weights(fresh, path)
    got = fresh.state_dict()
    assert all(torch.equal(got["backbone." + k], v) for k, v in backbone.items())


def test_multiscale_training_and_lr_steps(tiny, tmp_path):
    """The default preset's code paths: random choice of scales, a scaled test size, lr steps
    (and BatchNorm instead of GroupNorm)."""
    _needs_mmdet()
    model, logs, _ = _fit(tiny, tmp_path, norm="BN", image_scale=1.5, train_scales=[0.85, 1.19], lr_steps=[2],
                          iterations=3, warmup_iters=0, lr=0.01, lr_gamma=0.1, log_every=1)
    # the lr each iteration ran with: milestone 2 = after two iterations
    assert [round(r["lr"], 6) for r in logs] == [0.01, 0.01, 0.001]
    _, val, _ = tiny
    p = model.predict(val[:1])[0]
    assert (p.height, p.width) == (val[0].height, val[0].width)


def test_mmdet_results_become_instances():
    """mmdet's InstanceData (masks, boxes, scores, labels) -> the shared box-cropped encoder:
    empty masks dropped with their scores and labels, a mask spilling out of its box kept whole."""
    _needs_mmdet()
    import torch
    from mmengine.structures import InstanceData

    from bench.adapters import mmdet_cascade as M
    from bench.data import rle

    rng = np.random.default_rng(0)
    masks = np.zeros((5, 37, 53), bool)
    masks[1, 5:9, 50:] = True
    masks[2, 10:20, 10:30] = rng.random((10, 20)) > 0.3
    masks[3] = True
    masks[4, 0, 0] = masks[4, -1, -1] = True
    boxes = np.array([[0, 0, 1, 1], [50, 5, 53, 9], [10, 10, 30, 20], [0, 0, 53, 37], [0, 0, 1, 1]], np.float32)
    pred = InstanceData(masks=torch.from_numpy(masks), bboxes=torch.from_numpy(boxes),
                        scores=torch.linspace(1, 0, 5), labels=torch.arange(5) % 3)
    inst = M._to_instances(pred, 37, 53)
    assert len(inst) == 4 and inst.classes.tolist() == [1, 2, 0, 1]
    assert np.allclose(inst.scores, [0.75, 0.5, 0.25, 0.0])
    for m, c in zip(masks[1:], inst.counts):
        assert np.array_equal(c, rle.encode_mask(m))
    assert len(M._to_instances(pred[:0], 37, 53)) == 0


def test_fit_is_reproducible_and_mask_heads_are_initialised(tiny, tmp_path):
    """The base seeds before train() builds the network, whatever the global RNGs hold; the cascade's
    mask heads (which mmdet 3.3.0 leaves at PyTorch's default init) get FCNMaskHead's init."""
    _needs_mmdet()
    import torch

    states = []
    for k in range(2):
        torch.manual_seed(100 + k)
        np.random.seed(100 + k)
        model, _, _ = _fit(tiny, tmp_path / str(k), iterations=1, warmup_iters=0, lr=1e-12, weight_decay=0.0)
        states.append(model.model.state_dict())
    a, b = states
    assert all(torch.equal(a[k], b[k]) for k in a)
    for i in range(3):  # FCNMaskHead.init_weights: zero biases for the upsampling and the logits
        assert a[f"roi_head.mask_head.{i}.upsample.bias"].abs().max() < 1e-6
        assert a[f"roi_head.mask_head.{i}.conv_logits.bias"].abs().max() < 1e-6


def test_validation_curve_during_training_leaves_training_unchanged(trained, tiny, tmp_path):
    """eval_every records Kaggle mAP on val mid-training, and the trained model is the same as without."""
    curve = []
    model, _, _ = _fit(tiny, tmp_path / "curve", curve=curve, eval_every=2)
    assert [r["step"] for r in curve] == [2, 4] and all(0 <= r["kaggle_map"] <= 1 for r in curve)
    _same(trained[0].predict(tiny[1]), model.predict(tiny[1]))
