"""The Ultralytics YOLO segmentation adapter: config checks anywhere, real training where Ultralytics is.

The network test trains and predicts in a fresh interpreter whose sockets all refuse (and record)
every connection and DNS look-up, with HOME pointing at an empty folder: nothing may be fetched and
nothing written to the user's config folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bench import envs
from bench.adapters.base import FitContext
from bench.adapters.registry import ConfigError, build, get, make_config
from bench.adapters.trainable import VOCABULARY
from bench.data.sample import Instances

ROOT = Path(__file__).resolve().parent.parent


# ---- no framework needed -------------------------------------------------------------------
def test_registered_in_the_main_environment():
    cls = get("yolo-seg")
    assert envs.of(cls).name == envs.MAIN
    assert cls.capabilities.predicts_classes and cls.capabilities.overlapping_masks
    assert "AGPL-3.0" in cls.install_hint
    assert {"epochs", "lr", "batch_size", "optimizer", "amp"} <= set(cls.framework_keys)
    assert set(cls.framework_keys) <= set(VOCABULARY) & set(cls.Config.model_fields)


def test_presets_validate():
    smoke, default = make_config("yolo-seg", "smoke"), make_config("yolo-seg", "default")
    assert smoke.model == default.model == "yolo11n-seg.yaml"
    assert smoke.epochs < default.epochs and smoke.imgsz < default.imgsz


def _detect_yaml(tmp_path) -> Path:
    p = tmp_path / "det.yaml"
    p.write_text("nc: 1\nbackbone: [[-1, 1, Conv, [16, 3, 2]]]\nhead: [[[0], 1, Detect, [nc]]]\n")
    return p


@pytest.mark.parametrize("opts, words", [
    ({"model": "yolo11n.yaml"}, "not a segmentation model YAML.*yolo11n-seg.yaml"),
    ({"model": "yolo11n-seg.pt"}, "not a model YAML"),
    ({"model": "/nowhere/mine-seg.yaml"}, "does not exist"),
    ({"eval_every": 5}, "no validation curve"),
    ({"imgsz": 16}, "imgsz"),
])
def test_bad_config_is_refused_before_training(opts, words):
    with pytest.raises(ConfigError, match=words):
        make_config("yolo-seg", "smoke", opts)


def test_local_detection_yaml_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="Detect.*detection model YAML"):
        make_config("yolo-seg", "smoke", {"model": str(_detect_yaml(tmp_path))})


def test_missing_weights_file_names_the_path(tmp_path, tiny_synth):
    from bench.data.io import load_dataset

    ds = load_dataset(str(tiny_synth))
    m = build(f"yolo-seg:weights={tmp_path / 'none.pt'}", ds.classes, preset="smoke")
    with pytest.raises(FileNotFoundError, match="none.pt"):
        m.fit(list(ds), [], m.cfg, FitContext(workdir=tmp_path / "w"))


def test_predict_before_fit_is_an_error():
    with pytest.raises(RuntimeError, match="fit"):
        build("yolo-seg", ["cell"], preset="smoke").predict([])


# ---- the real framework --------------------------------------------------------------------------
TINY = "yolo-seg:epochs=2,batch_size=4,imgsz=128,conf=0.0,max_det=300"


@pytest.fixture(scope="module")
def tiny(tiny_synth):
    pytest.importorskip("ultralytics")
    from bench.data.io import load_dataset

    ds = load_dataset(str(tiny_synth))
    return ds, list(ds)


@pytest.mark.slow
def test_train_predict_save_load_roundtrip(tiny, tmp_path):
    ds, samples = tiny
    train, val = samples[:9], samples[9:]
    m = build(TINY, ds.classes, preset="smoke")
    logs, progress = [], []
    ctx = FitContext(workdir=tmp_path / "work", seed=0, log_loss=logs.append,
                     progress=lambda d, t, info: progress.append((d, t)))
    m.fit(train, val, m.cfg, ctx)

    assert [(r["epoch"], r["step"]) for r in logs] == [(1, 3), (2, 6)]  # 9 images / batch 4 = 3 batches
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 and "seg_loss" in r for r in logs)
    assert progress[-1] == (6, 6)
    # Ultralytics saw only the training images (its val entry is the training images again)
    exported = {p.stem for p in (tmp_path / "work" / "dataset" / "images" / "train").iterdir()}
    assert len(exported) == 9 and not {s.image_id for s in val} & exported
    assert "images/train" == json.loads(json.dumps(
        __import__("yaml").safe_load((tmp_path / "work" / "dataset" / "data.yaml").read_text())))["val"]

    preds = m.predict(val)
    for s, p in zip(val, preds):
        assert isinstance(p, Instances) and (p.height, p.width) == (s.height, s.width)
        assert p.scores is not None and len(p.scores) == len(p) and np.all((p.scores >= 0) & (p.scores <= 1))
        assert np.all((p.classes >= 0) & (p.classes < len(ds.classes)))
    assert sum(len(p) for p in preds) > 0, "nothing predicted: the reload comparison would be vacuous"

    m.save(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "meta.json").read_text())["adapter"] == "yolo-seg"
    fresh = build("yolo-seg", ds.classes, preset="smoke")
    fresh.load(tmp_path / "saved")
    assert fresh.cfg == m.cfg
    for p, q in zip(preds, fresh.predict(val)):
        assert len(p) == len(q)
        assert all(np.array_equal(a, b) for a, b in zip(p.counts, q.counts))
        np.testing.assert_array_equal(p.scores, q.scores)
        np.testing.assert_array_equal(p.classes, q.classes)

    # the checkpoint's model.pt is a local weights file to start from (a sweep's pretrain stage)
    again = build(TINY.replace("epochs=2", "epochs=1") + f",weights={tmp_path / 'saved' / 'model.pt'}",
                  ds.classes, preset="smoke")
    again.fit(train, [], again.cfg, FitContext(workdir=tmp_path / "work2", seed=0))
    assert len(again.predict(val[:1])) == 1


@pytest.mark.slow
def test_wrong_weights_files_are_named(tiny, tmp_path):
    import torch

    ds, samples = tiny
    state = tmp_path / "state_dict.pt"
    torch.save({"conv.weight": torch.zeros(2, 2)}, state)  # e.g. a torchvision state dict
    from bench.adapters.ultralytics_yolo import offline

    offline(tmp_path / "settings")
    from ultralytics import YOLO

    det = tmp_path / "detect.pt"
    YOLO("yolo11n.yaml").save(str(det))  # a detection model, built from its YAML
    for path, words in [(state, "not an Ultralytics YOLO checkpoint"), (det, "not YOLO segmentation")]:
        m = build(f"{TINY},weights={path}", ds.classes, preset="smoke")
        with pytest.raises(ValueError, match=words) as e:
            m.fit(samples[:4], [], m.cfg, FitContext(workdir=tmp_path / path.stem))
        assert str(path) in str(e.value)


GUARDED = textwrap.dedent("""
    import json, socket, sys, urllib.request
    attempts = []
    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network refused by the test")
    socket.getaddrinfo = socket.create_connection = refuse
    socket.socket.connect = socket.socket.connect_ex = lambda self, *a: refuse(*a)
    try:  # the guard itself works: a plain fetch is caught and recorded
        urllib.request.urlopen("http://example.org", timeout=1)
    except OSError:
        pass
    assert len(attempts) == 1, attempts
    attempts.clear()
    from pathlib import Path
    import numpy as np
    from bench.adapters.base import FitContext
    from bench.adapters.registry import build
    from bench.data.io import load_dataset
    data, work = sys.argv[1], Path("rel")  # relative, as the runner's model folders are
    ds = load_dataset(data)
    samples = list(ds)
    m = build("{spec}", ds.classes, preset="smoke")
    m.fit(samples[:6], samples[6:], m.cfg, FitContext(workdir=work / "work", seed=0))
    preds = m.predict(samples[6:8])
    m.save(work / "saved")
    fresh = build("yolo-seg", ds.classes, preset="smoke")
    fresh.load(work / "saved")
    fresh.predict(samples[6:8])
    from ultralytics.utils import SETTINGS
    dirs = [str(Path(SETTINGS[k]).resolve()) for k in ("runs_dir", "datasets_dir", "weights_dir")]
    print(json.dumps({{"attempts": attempts, "predicted": sum(len(p) for p in preds), "dirs": dirs}}))
""")


@pytest.mark.slow
def test_nothing_is_fetched(tiny, tiny_synth, tmp_path):
    """Train (with amp asked: the AMP check is the one that downloads weights), predict, save and load
    with every socket refused: no attempt at all, and nothing under HOME."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLO_", "XDG_"))}
    env.update(HOME=str(home), PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    script = GUARDED.format(spec=TINY.replace("epochs=2", "epochs=1") + ",amp=true")
    r = subprocess.run([sys.executable, "-c", script, str(tiny_synth), str(tmp_path)], capture_output=True,
                       text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["attempts"] == [], out
    assert out["predicted"] > 0
    assert list(home.iterdir()) == []  # no settings, fonts or weights in the user's folders
    # everything under the adapter's work folder (given relative, as the runner does), nothing beside it
    assert (tmp_path / "rel" / "work" / "yolo" / "weights" / "last.pt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "rel"]
    assert all(d.startswith(str(tmp_path / "rel" / "work")) for d in out["dirs"]), out["dirs"]


class _Killed(Exception):
    """Stands for the SIGTERM / time limit that ends a fit between two epochs' checkpoints."""


@pytest.mark.slow
def test_an_interrupted_fit_resumes_at_its_last_epoch_checkpoint(tiny, tmp_path):
    """``checkpoint_every=1``: the fit is killed in epoch 2 after epoch 1's last.pt was kept; started
    again in the same folders, Ultralytics resumes at epoch 2 (its optimizer and EMA from the
    checkpoint), logs epochs 2-3 only, and the result predicts. Not bit-identical to one fit:
    Ultralytics draws the resumed epochs' data afresh (README: who resumes mid-training)."""
    from bench.adapters.trainable import RESUME_STATE

    ds, samples = tiny
    train = samples[:9]
    spec = TINY.replace("epochs=2", "epochs=3") + ",checkpoint_every=1"

    def fit(kill_at=None):
        m, logs = build(spec, ds.classes, preset="smoke"), []

        def progress(done, total, info):
            if done == kill_at:
                raise _Killed(f"killed at batch {done}")

        ctx = FitContext(workdir=tmp_path / "work", seed=0, log_loss=logs.append, progress=progress,
                         resume_dir=tmp_path / "resume")
        m.fit(train, [], m.cfg, ctx)
        return m, logs, ctx

    with pytest.raises(_Killed):
        fit(kill_at=5)  # 3 batches per epoch: batch 5 is in epoch 2
    state = json.loads((tmp_path / "resume" / RESUME_STATE).read_text())
    assert state["iteration"] == 1 and (tmp_path / "resume" / "iter1" / "last.pt").is_file()
    m, logs, ctx = fit()
    assert ctx.resumed_from == 1
    assert [(r["epoch"], r["step"]) for r in logs] == [(2, 6), (3, 9)]  # epoch 1 not trained again
    assert all(np.isfinite(r["loss"]) for r in logs)
    assert len(m.predict(samples[9:10])) == 1
