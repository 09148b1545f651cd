"""The two built-in adapters with their real frameworks: torchvision Mask R-CNN and watershed."""

from pathlib import Path

import numpy as np
import pytest

from bench.adapters.base import FitContext
from bench.adapters.registry import ConfigError, build, make_config, registered
from bench.data.io import read_sartorius
from bench.metrics import kaggle

TINY_TV = {"iterations": 6, "batch_size": 2, "min_size": 128, "max_size": 128, "log_every": 2,
           "warmup_iters": 2, "lr_steps": [5], "box_score_thresh": 0.0, "detections_per_image": 50,
           "rpn_post_nms_top_n_test": 100, "rpn_pre_nms_top_n_test": 200}


def test_registry_lists_all_five_models_without_importing_frameworks():
    import subprocess
    import sys

    assert {"watershed", "maskrcnn-tv", "cellpose", "cascade", "maskrcnn"} <= set(registered())
    code = ("import sys; from bench.adapters.registry import registered; registered(); "
            "print(sorted(m for m in ('torch', 'mmdet', 'mmcv', 'detectron2', 'cellpose') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # framework imports live inside the adapters' methods


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
    sizes = type(a)._train_sizes(cfg)
    assert sizes == ((128,) if cfg.augment == "none" else (90, 106, 112, 122, 128, 138, 154))


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
    paper = make_config("maskrcnn-tv", "paper")
    assert paper.anchor_sizes == [24, 40, 80, 128, 256] and paper.detections_per_image == 700


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
