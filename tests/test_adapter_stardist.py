"""The StarDist adapter: config and weights-folder checks anywhere, real training in its own environment.

StarDist runs in ``.venv-stardist`` (``make setup-stardist``). The framework test runs there:
directly when this interpreter has StarDist, else re-run in that environment's interpreter by
``test_roundtrip_in_its_own_environment``, which skips (saying how to build it) when it is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import envs
from bench.adapters.base import FitContext
from bench.adapters.registry import ConfigError, build, get, make_config
from bench.adapters.trainable import VOCABULARY
from bench.data.sample import Instances


# ---- no framework needed -------------------------------------------------------------------
def test_registered_in_its_own_environment():
    cls = get("stardist")
    assert envs.of(cls).folder == ".venv-stardist" and envs.of(cls).setup == "make setup-stardist"
    assert not cls.capabilities.predicts_classes and not cls.capabilities.overlapping_masks
    assert {"epochs", "steps_per_epoch", "patch_size", "lr", "batch_size"} <= set(cls.framework_keys)
    assert set(cls.framework_keys) <= set(VOCABULARY) & set(cls.Config.model_fields)


def test_presets_validate():
    smoke, default = make_config("stardist", "smoke"), make_config("stardist", "default")
    assert smoke.epochs * smoke.steps_per_epoch < default.epochs * default.steps_per_epoch
    assert default.patch_size == (256, 256) and default.n_rays == 32 and default.grid == (2, 2)
    assert not default.optimize_thresholds


@pytest.mark.parametrize("opts, words", [
    ({"grid": [3, 2]}, "powers of two"),
    ({"patch_size": [100, 128]}, "multiple of grid"),           # 100 is not a multiple of 2 * 2**3
    ({"patch_size": [8, 8]}, "multiple of grid"),               # smaller than one network cell
    ({"grid": [4, 4], "unet_n_depth": 4, "patch_size": [32, 32]}, "= 64"),
    ({"n_rays": 2}, "n_rays"),
    ({"internal_val": 1.0}, "internal_val"),
])
def test_config_that_does_not_fit_is_refused(opts, words):
    with pytest.raises(ConfigError, match=words):
        make_config("stardist", "smoke", opts)


def _tiny(tiny_synth):
    from bench.data.io import load_dataset

    ds = load_dataset(str(tiny_synth))
    return ds, list(ds)


def test_patch_larger_than_the_images_names_one(tiny_synth, tmp_path):
    ds, samples = _tiny(tiny_synth)  # 128x128 images
    m = build("stardist:patch_size=[256,256]", ds.classes, preset="smoke")
    with pytest.raises(ValueError, match=r"patch_size \[256, 256\].*larger than 12 training image.*128x128"):
        m.fit(samples, [], m.cfg, FitContext(workdir=tmp_path))


def _folder(tmp_path, config: dict | None, h5: bool = True) -> Path:
    f = tmp_path / "model"
    f.mkdir()
    if config is not None:
        (f / "config.json").write_text(json.dumps(config))
    if h5:
        (f / "weights_best.h5").write_bytes(b"")
    return f


@pytest.mark.parametrize("make, words", [
    (lambda t: t / "missing", "a missing path"),
    (lambda t: (t / "w.h5").write_bytes(b"") and t / "w.h5" or t / "w.h5", "not a file|, not a file"),
    (lambda t: _folder(t, None), "not a StarDist model folder"),
    (lambda t: _folder(t, {"n_dim": 3, "n_rays": 96}), "not a StarDist 2D model config"),
    (lambda t: _folder(t, {"n_dim": 2, "n_rays": 32, "n_channel_in": 3}), "3 input channels"),
    (lambda t: _folder(t, {"n_dim": 2, "n_rays": 32}, h5=False), r"holds no weights \(\*.h5\)"),
])
def test_wrong_weights_folder_is_named_before_training(make, words, tiny_synth, tmp_path):
    ds, samples = _tiny(tiny_synth)
    where = make(tmp_path)
    m = build(f"stardist:weights={where},patch_size=[64,64]", ds.classes, preset="smoke")
    with pytest.raises((ValueError, FileNotFoundError), match=words) as e:
        m.fit(samples, [], m.cfg, FitContext(workdir=tmp_path / "work"))
    assert str(where) in str(e.value)


def test_predict_before_fit_is_an_error():
    with pytest.raises(RuntimeError, match="fit"):
        build("stardist", ["cell"], preset="smoke").predict([])


def test_holdout_comes_from_the_training_images_only():
    cls = get("stardist")
    fit, hold = cls._holdout(20, 0.15, seed=0)
    assert len(hold) == 3 and not set(fit) & set(hold) and sorted(fit + hold) == list(range(20))
    assert cls._holdout(20, 0.0, 0) == (list(range(20)), list(range(20)))  # 0: the training images themselves


# ---- the real framework, in its environment ---------------------------------------------------------
TINY = ("stardist:patch_size=[64,64],epochs=2,steps_per_epoch=3,batch_size=2,unet_n_filter_base=8,"
        "net_conv_after_unet=16,lr=0.001")


@pytest.mark.slow
def test_train_predict_save_load_roundtrip(tiny_synth, tmp_path):
    pytest.importorskip("stardist.models")
    ds, samples = _tiny(tiny_synth)
    train, val = samples[:9], samples[9:]
    m = build(TINY + ",optimize_thresholds=true,eval_every=1", ds.classes, preset="smoke")
    logs, progress, curve = [], [], []
    ctx = FitContext(workdir=tmp_path / "work", seed=0, log_loss=logs.append,
                     progress=lambda d, t, info: progress.append((d, t)), val=val, eval_every=1,
                     log_val=curve.append)
    m.fit(train, val, m.cfg, ctx)

    epochs = [r for r in logs if "epoch" in r]
    assert [(r["epoch"], r["step"]) for r in epochs] == [(1, 3), (2, 6)]  # shared schema, one per epoch
    assert all(np.isfinite(r["loss"]) and "prob_loss" in r and "val_loss" in r for r in epochs)
    assert progress[-1] == (6, 6)
    assert [r["step"] for r in curve] == [1, 2] and all(0 <= r["kaggle_map"] <= 1 for r in curve)
    # thresholds fitted on a holdout of the 9 training images, never the 3 validation ones
    assert m.thresholds["fitted_on"] == "1 held-out training images (internal_val=0.15)"
    assert any("optimize_thresholds on 1 held-out training images" in r.get("note", "") for r in logs)

    preds = m.predict(val)
    for s, p in zip(val, preds):
        assert isinstance(p, Instances) and (p.height, p.width) == (s.height, s.width)
        assert p.scores is not None and len(p.scores) == len(p) and np.all((p.scores > 0) & (p.scores <= 1))
        assert np.all(p.classes == -1)
        assert np.all(p.scores >= m.thresholds["prob"])  # scores are StarDist's object probabilities
        lab = p.to_label_image()
        assert len(np.unique(lab[lab > 0])) == len(p)  # never overlapping
    assert sum(len(p) for p in preds) > 0, "nothing predicted: the reload comparison would be vacuous"

    m.save(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "meta.json").read_text())
    assert meta["adapter"] == "stardist" and meta["extra"]["thresholds"] == m.thresholds
    assert (tmp_path / "saved" / "stardist" / "config.json").is_file()

    fresh = build("stardist", ds.classes, preset="smoke")
    fresh.load(tmp_path / "saved")
    assert fresh.cfg == m.cfg and fresh.thresholds == m.thresholds
    for p, q in zip(preds, fresh.predict(val)):
        assert len(p) == len(q)
        assert all(np.array_equal(a, b) for a, b in zip(p.counts, q.counts))
        np.testing.assert_array_equal(p.scores, q.scores)

    # the saved model folder is a local weights folder to start from (the sweep's pretrain stage)
    again = build(TINY.replace("epochs=2", "epochs=1") + f",weights={tmp_path / 'saved' / 'stardist'}", ds.classes, preset="smoke")
    again.fit(train, [], again.cfg, FitContext(workdir=tmp_path / "work2", seed=0))
    assert len(again.predict(val[:1])) == 1


def test_roundtrip_in_its_own_environment(run_in_model_env):
    """Where this interpreter has no StarDist, the framework test runs in StarDist's environment."""
    run_in_model_env("stardist", "stardist.models", __file__, "test_train_predict_save_load_roundtrip")
