"""The two built-in adapters with their real frameworks: torchvision Mask R-CNN and watershed."""

from pathlib import Path

import numpy as np
import pytest

from bench.adapters.base import FitContext
from bench.adapters.registry import ConfigError, build, get, make_config, registered
from bench.data.io import read_sartorius
from bench.metrics import kaggle

TINY_TV = {"iterations": 6, "batch_size": 2, "min_size": 128, "max_size": 128, "log_every": 2,
           "warmup_iters": 2, "lr_steps": [5], "box_score_thresh": 0.0, "detections_per_image": 50,
           "rpn_post_nms_top_n_test": 100, "rpn_pre_nms_top_n_test": 200}


def test_registry_lists_all_five_models_without_importing_frameworks():
    import subprocess
    import sys

    assert {"watershed", "maskrcnn-tv", "cellpose", "cascade", "maskrcnn", "stardist", "yolo-seg"} <= set(registered())
    code = ("import sys; from bench.adapters.registry import registered; registered(); "
            "print(sorted(m for m in ('torch', 'mmdet', 'mmcv', 'detectron2', 'cellpose', 'tensorflow', "
            "'stardist', 'ultralytics') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # framework imports live inside the adapters' methods


def test_every_adapters_declarations_hold():
    """What each adapter declares is checked against something outside it: ``framework`` names the
    distribution installed here (its version is what the manifest records), the pins its install hint
    quotes are the ones ``make setup`` installs, and a trainable adapter spells its options in the shared
    vocabulary (one of iterations/epochs, lr, batch_size) and maps only options it has."""
    import importlib.metadata
    import importlib.util
    import re

    from bench.adapters.trainable import VOCABULARY, TrainableAdapter

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    for name, cls in registered().items():
        if name.startswith("fake"):
            continue
        if importlib.util.find_spec(cls.framework_modules[0].split(".")[0]) is not None:
            assert importlib.metadata.version(cls.framework), name
        for pin in re.findall(r'"([^"]+[<>=][^"]+)"', cls.install_hint):
            assert f'"{pin}"' in makefile, (name, pin)
        if issubclass(cls, TrainableAdapter):
            fields = set(cls.Config.model_fields)
            assert len({"iterations", "epochs"} & fields) == 1 and {"lr", "batch_size"} <= fields, name
            assert {"lr", "batch_size"} | ({"iterations", "epochs"} & fields) <= set(cls.framework_keys), name
            assert set(cls.framework_keys) == set(VOCABULARY) & fields, name  # every shared knob it has, named


def test_every_shipped_preset_validates():
    """Each preset in configs/*.yaml builds its model's config (a typo fails here, not after a download)."""
    import yaml

    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        assert doc["model"] == path.stem and doc["presets"], path
        for preset in doc["presets"]:
            make_config(doc["model"], preset)


def test_maskrcnn_tv_trains_predicts_saves_loads(tiny_synth, tmp_path):
    ds = read_sartorius(tiny_synth)
    train, val = ds.samples[:8], ds.samples[8:10]
    cfg = make_config("maskrcnn-tv", "smoke", TINY_TV)
    a = build("maskrcnn-tv", ds.classes, "smoke")
    log, prog = [], []
    ctx = FitContext(tmp_path / "work", "cpu", 0, lambda d, t, i: prog.append((d, t)), log.append)
    a.fit(train, val, cfg, ctx)
    assert prog[-1] == (6, 6) and [r["step"] for r in log] == [1, 3, 5, 6]
    assert all(np.isfinite(r["loss"]) and "loss_mask" in r for r in log)
    preds = a.predict(val)
    assert len(preds) == 2
    for p, s in zip(preds, val):
        assert (p.height, p.width) == (s.height, s.width) and p.scores is not None
        assert len(p) > 0 and ((p.classes >= 0) & (p.classes < 3)).all()
    a.save(tmp_path / "ckpt")
    b = build("maskrcnn-tv", ds.classes, "smoke")
    b.load(tmp_path / "ckpt")
    for p, q in zip(preds, b.predict(val)):
        assert len(p) == len(q)
        np.testing.assert_array_equal(p.scores, q.scores)
        for c1, c2 in zip(p.counts, q.counts):
            np.testing.assert_array_equal(c1, c2)
    # batched inference (one model([...]) call for both images) returns what image-by-image does
    b.cfg = b.cfg.model_copy(update={"predict_batch_size": 2})
    for p, q in zip(preds, b.predict(val)):
        assert len(p) == len(q)
        np.testing.assert_allclose(p.scores, q.scores, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("opts", [{"optimizer": "adam", "augment": "extra", "min_size_train": [112, 128]},
                                  {"augment": "none"}])
def test_maskrcnn_tv_study_variants_and_validation_curve(tiny_synth, tmp_path, opts):
    """Adam / augmentation variants train for real; a validation curve leaves training unchanged."""
    ds = read_sartorius(tiny_synth)
    train, val = ds.samples[:6], ds.samples[6:8]
    cfg = make_config("maskrcnn-tv", "smoke", {**TINY_TV, "iterations": 4, **opts})
    runs = []
    for every in (0, 2):
        a = build("maskrcnn-tv", ds.classes, "smoke")
        curve, log = [], []
        a.fit(train, val, cfg, FitContext(tmp_path / f"w{every}", "cpu", 0, None, log.append, val=val,
                                          eval_every=every, log_val=curve.append))
        assert np.isfinite(log[-1]["loss"])
        runs.append((a.predict(val), curve))
    assert runs[0][1] == [] and [r["step"] for r in runs[1][1]] == [2, 4]
    assert runs[1][1][-1]["kaggle_map"] == pytest.approx(kaggle.quick_map([s.instances for s in val], runs[1][0]))
    for p, q in zip(runs[0][0], runs[1][0]):
        np.testing.assert_array_equal(p.scores, q.scores)


def test_maskrcnn_tv_training_sizes_follow_the_augmentation():
    """none: the test size only; default: the asked multi-scale sizes; extra: those plus a wider range
    around them (torchvision's transform draws one per batch)."""
    sizes = get("maskrcnn-tv")._train_sizes
    cfg = lambda aug: make_config("maskrcnn-tv", "smoke", {**TINY_TV, "augment": aug,  # noqa: E731
                                                           "min_size_train": [112, 128]})
    assert sizes(cfg("none")) == (128,)
    assert sizes(cfg("default")) == (112, 128)
    extra = sizes(cfg("extra"))
    assert {112, 128} < set(extra) and min(extra) < 112 and max(extra) > 128 and list(extra) == sorted(set(extra))


def test_maskrcnn_tv_weights_are_local_only(tiny_synth, tmp_path):
    ds = read_sartorius(tiny_synth)
    cfg = make_config("maskrcnn-tv", "smoke", {**TINY_TV, "iterations": 1, "weights": str(tmp_path / "nope.pt")})
    a = build("maskrcnn-tv", ds.classes, "smoke")
    with pytest.raises(FileNotFoundError, match="nope.pt.*never downloads"):
        a.fit(ds.samples[:2], [], cfg, FitContext(tmp_path))


def test_config_errors_are_named():
    with pytest.raises(ConfigError, match="backbone"):
        make_config("maskrcnn-tv", "smoke", {"backbone": "vgg"})
    with pytest.raises(ConfigError, match="no preset 'huge'"):
        make_config("maskrcnn-tv", "huge")


def test_watershed_segments_real_nuclei(shared):
    import tifffile

    from bench.data.sample import Instances, Sample
    from bench.metrics.evaluator import evaluate_predictions

    src = shared / "stardist_dsb2018"
    if not (src / "img2d.tif").is_file():
        pytest.skip("DSB2018 image not present")
    img, lab = tifffile.imread(src / "img2d.tif"), tifffile.imread(src / "mask2d.tif")
    s = Sample("dsb", Instances.from_label_image(lab.astype(np.int64), cls_id=0), _image=img)
    pred = build("watershed:feature=intensity", ["nucleus"]).predict([s])[0]
    assert 60 < len(pred) < 250 and pred.scores.max() <= 1.0
    res = evaluate_predictions({"dsb": (s.instances, "nucleus")}, {"dsb": pred}, ["nucleus"], n_resamples=50)
    assert res["kaggle_map"] > 0.2  # nuclei on a dark background: the classical method works here


def test_maskrcnn_tv_loader_workers_do_not_change_training(tiny_synth, tmp_path):
    """Batches and augmentation seeds are fixed up front: two loader processes train the same model."""
    ds = read_sartorius(tiny_synth)
    train, val = ds.samples[:6], ds.samples[6:7]
    preds = []
    for workers in (0, 2):
        cfg = make_config("maskrcnn-tv", "smoke", {**TINY_TV, "iterations": 3, "num_workers": workers})
        a = build("maskrcnn-tv", ds.classes, "smoke")
        a.fit(train, val, cfg, FitContext(tmp_path / f"w{workers}", "cpu", 0))
        preds.append(a.predict(val)[0])
    assert len(preds[0]) == len(preds[1]) > 0
    np.testing.assert_array_equal(preds[0].scores, preds[1].scores)


def test_maskrcnn_tv_trains_on_crops_with_auto_anchors_and_predicts_tiles(tiny_synth, tmp_path):
    """train_crop + anchor_sizes=auto train for real; the anchors derived are in meta.json and survive
    load; predict_tile stitches whole-image predictions (full size, within the image)."""
    import json

    from bench.tiling import predictor

    ds = read_sartorius(tiny_synth)
    train, val = ds.samples[:4], ds.samples[6:7]
    opts = {**TINY_TV, "iterations": 3, "train_crop": 80, "min_size": 80, "max_size": 80,
            "anchor_sizes": "auto", "predict_tile": 80, "predict_tile_overlap": 24}
    cfg = make_config("maskrcnn-tv", "smoke", opts)
    a = build("maskrcnn-tv", ds.classes, "smoke")
    log = []
    a.fit(train, val, cfg, FitContext(tmp_path / "w", "cpu", 0, None, log.append))
    assert np.isfinite(log[-1]["loss"])
    got = a.anchors["anchor_sizes"]
    assert len(got) == 5 and got == sorted(got) and got[0] <= a.anchors["size_p5"] <= a.anchors["size_p95"] <= got[-1]
    assert [s[0] for s in a.model.rpn.anchor_generator.sizes] == got
    img, t = get("maskrcnn-tv")._target(a._tensor(train[0].image), train[0].instances, np.random.default_rng(0), cfg)
    assert tuple(img.shape[1:]) == tuple(t["masks"].shape[1:]) == (80, 80)  # a crop of the 128 px image
    assert len(t["boxes"]) and int(t["masks"].flatten(1).sum(1).min()) >= cfg.train_crop_min_area
    pred = predictor(a)(val)[0]
    assert (pred.height, pred.width) == (val[0].height, val[0].width) > (80, 80)  # 4 tiles
    assert a.policy.norm == a.cfg.input_norm == "percentile"  # the tiles' identity policy is undone
    a.save(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "meta.json").read_text())["extra"]["anchors"]["anchor_sizes"] == got
    b = build("maskrcnn-tv", ds.classes, "smoke")
    b.load(tmp_path / "ckpt")
    again = predictor(b)(val)[0]
    np.testing.assert_array_equal(pred.scores, again.scores)
