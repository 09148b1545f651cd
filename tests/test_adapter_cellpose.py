"""The Cellpose adapter: config validation, no downloads, and real training on tiny data.

The framework tests train the real ``cellpose`` on CPU: a few epochs on tiny synthetic
images (train, predict, save, load, identical predictions) and a short training on
crops of the real DSB2018 nuclei image, which must beat the watershed baseline on
held-out crops.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.adapters.base import FitContext
from bench.metrics import kaggle
from bench.adapters.registry import ConfigError, build, make_config
from bench.adapters.trainable import CheckpointError
from bench.data.normalize import InputPolicy
from bench.data.sample import Instances, Sample

DSB = Path("/work/shared/data/stardist_dsb2018")


# ---- no framework needed -------------------------------------------------------
def test_presets_validate():
    smoke = make_config("cellpose", "smoke")
    default = make_config("cellpose", "default")
    assert smoke.epochs < default.epochs


def test_default_min_size_keeps_cells_cellposes_own_default_drops():
    """The smallest annotated Sartorius cells are below Cellpose's own ``min_size``: ours is lower."""
    models = pytest.importorskip("cellpose.models")
    import inspect

    theirs = inspect.signature(models.CellposeModel.eval).parameters["min_size"].default
    assert make_config("cellpose", "default").min_size < theirs


def test_config_errors():
    with pytest.raises(ConfigError, match="no_such_option"):
        make_config("cellpose", "smoke", {"no_such_option": 1})
    with pytest.raises(ConfigError, match="epochs"):
        make_config("cellpose", "smoke", {"epochs": "many"})
    with pytest.raises(ConfigError, match="diam_mean"):
        make_config("cellpose", "smoke", {"weights": "/x/cyto3", "diam_mean": 20})


def test_missing_weights_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "cyto3"
    m = build(f"cellpose:weights={missing}", ["cell"], preset="smoke")
    with pytest.raises(FileNotFoundError, match=str(missing)):
        m.fit([], [], m.cfg, FitContext(workdir=tmp_path))


def test_predict_before_fit_is_an_error():
    m = build("cellpose", ["cell"], preset="smoke")
    with pytest.raises(RuntimeError, match="before fit"):
        m.predict([])


def test_old_checkpoint_is_refused_clearly(tmp_path):
    """A folder of the pre-meta.json layout (cellpose.json) names what is missing, before any framework call."""
    (tmp_path / "cellpose.json").write_text(json.dumps({"config": {}, "diam_mean": 17.0, "diam_labels": 17.0}))
    (tmp_path / "cellpose_net.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="meta.json"):
        build("cellpose", ["cell"], preset="smoke").load(tmp_path)


def test_input_is_the_shared_policy_in_gray():
    """Cellpose sees what every model sees (bench.data.normalize), made gray; its options choose it."""
    from bench.data.normalize import InputPolicy, normalize

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 4096, size=(20, 24, 3)).astype(np.uint16)
    for opts in ({}, {"input_norm": "fixed"}, {"input_percentiles": [5, 95]}):
        m = build("cellpose:" + ",".join(f"{k}={v}" for k, v in opts.items()) if opts else "cellpose",
                  ["cell"], preset="smoke")
        x = m._prep(rgb)
        assert x.shape == (20, 24) and x.dtype == np.float32
        np.testing.assert_array_equal(x, normalize(rgb, InputPolicy.of(m.cfg)).mean(axis=2))
    assert build("cellpose:input_norm=fixed", ["cell"], preset="smoke")._prep(rgb).max() < 0.1  # 4096 / 65535


def test_lr_schedule_is_train_segs():
    from bench.adapters.cellpose import _lr_schedule

    assert np.allclose(_lr_schedule(0.09, 4), [0.0, 0.01, 0.02, 0.03])  # warm-up only
    s = _lr_schedule(0.2, 500)
    assert len(s) == 500 and s[9] == s[399] == 0.2 and s[400] == 0.1 and s[-1] == 0.2 / 2 ** 10



def test_lr_schedule_equals_the_one_in_train_segs_source():
    """The independent reference: the schedule block of the installed ``train_seg``, run as written."""
    import inspect
    import textwrap

    train = pytest.importorskip("cellpose.train")
    from bench.adapters.cellpose import _lr_schedule

    src = inspect.getsource(train.train_seg)
    start = src.index("LR = np.linspace")
    block = textwrap.dedent(src[src.rindex("\n", 0, start) + 1:src.index("\n\n", start)])
    for lr, n in ((0.2, 500), (0.05, 150), (0.1, 40), (0.09, 12)):
        env = {"np": np, "learning_rate": lr, "n_epochs": n}
        exec(block, env)
        np.testing.assert_array_equal(_lr_schedule(lr, n), env["LR"][:n])


# ---- the real framework -----------------------------------------------------------
def test_cellpose_never_downloads(tmp_path, monkeypatch):
    models = pytest.importorskip("cellpose.models")
    from bench.adapters.cellpose import _no_downloads

    monkeypatch.setattr(models, "MODEL_DIR", tmp_path)  # an empty model cache: cyto3 "needs" a download
    with _no_downloads(), pytest.raises(RuntimeError, match="never downloads"):
        models.model_path("cyto3")
    assert not (tmp_path / "cyto3").exists()


def _tiny_fit_cfg(**more) -> str:
    opts = dict(epochs=4, batch_size=4, nimg_per_epoch=8, bsize=96, lr=0.01,
                flow_threshold=0.0, cellprob_threshold=-1.0)
    opts.update(more)
    return "cellpose:" + ",".join(f"{k}={v}" for k, v in opts.items())


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    pytest.importorskip("cellpose.train")
    from bench.data.io import read_sartorius
    from bench.data.synth import generate

    out = generate(tmp_path_factory.mktemp("cp_synth"), n_images=8, size=(160, 128), seed=1)
    return read_sartorius(out)


@pytest.mark.slow
def test_train_predict_save_load_roundtrip(synth, tmp_path):
    train, val = synth.samples[:6], synth.samples[6:]
    m = build(_tiny_fit_cfg(), synth.classes, preset="smoke")
    logs, progress = [], []
    curve = []
    ctx = FitContext(workdir=tmp_path / "work", seed=0, log_loss=logs.append,
                     progress=lambda d, t, info: progress.append((d, t)), val=val, eval_every=2,
                     log_val=curve.append)
    m.fit(train, val, m.cfg, ctx)

    # validation curve from train_seg's snapshots: saved after 0-based epoch 2 (3 epochs done), then the end
    assert [r["step"] for r in curve] == [3, 4]
    assert all(0.0 <= r["kaggle_map"] <= 1.0 for r in curve)
    assert curve[-1]["kaggle_map"] == pytest.approx(
        kaggle.quick_map([s.instances for s in val], m.predict(val)))  # the end point is the final model

    # one record per epoch in the shared schema (step = epoch), progress up to the end
    assert [r["epoch"] for r in logs] == [r["step"] for r in logs] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in logs)
    assert [r["lr"] for r in logs] == pytest.approx([0.0, 0.01 / 9, 0.02 / 9, 0.03 / 9])  # train_seg's warm-up
    assert all(0 <= a["seconds"] <= b["seconds"] for a, b in zip(logs, logs[1:]))
    assert progress[-1] == (4, 4)
    assert (tmp_path / "work" / "cellpose" / "models" / "cellpose_net").is_file()  # train_seg's own file

    preds = m.predict(val)
    assert len(preds) == len(val)
    for s, p in zip(val, preds):
        assert isinstance(p, Instances)
        assert (p.height, p.width) == (s.height, s.width)
        assert p.scores is not None and len(p.scores) == len(p)
        assert np.all((p.scores >= 0) & (p.scores <= 1))
        assert np.all(p.classes == -1)
        lab = p.to_label_image()
        assert len(np.unique(lab[lab > 0])) == len(p)  # never overlapping
    assert sum(len(p) for p in preds) > 0, "nothing predicted: the reload comparison would be vacuous"

    m.save(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "meta.json").read_text())
    assert meta["adapter"] == "cellpose" and meta["config"]["epochs"] == 4
    assert meta["extra"]["diam_mean"] > 0 and meta["extra"]["diam_labels"] > 0
    assert meta["input_policy"] == m.policy.as_dict() == InputPolicy().as_dict()  # the default, as every model's

    fresh = build("cellpose", synth.classes, preset="smoke")
    fresh.load(tmp_path / "saved")
    assert fresh.cfg == m.cfg
    again = fresh.predict(val)
    for p, q in zip(preds, again):
        assert len(p) == len(q)
        assert all(np.array_equal(a, b) for a, b in zip(p.counts, q.counts))
        np.testing.assert_array_equal(p.scores, q.scores)

    # fine-tuning from a local weights file: the network keeps the diameter it was trained at
    tuned = build(_tiny_fit_cfg(weights=tmp_path / "saved" / "cellpose_net.pth", epochs=1),
                  synth.classes, preset="smoke")
    tuned.fit(train, [], tuned.cfg, FitContext(workdir=tmp_path / "work2", seed=0))
    assert tuned._diam_mean == pytest.approx(m._diam_mean)
    assert len(tuned.predict(val[:1])) == 1


def _dsb_crops(img: np.ndarray, lab: np.ndarray, quadrants, size: int = 128) -> list[Sample]:
    out = []
    for qy, qx in quadrants:
        for dy in range(0, 256, size):
            for dx in range(0, 256, size):
                y, x = qy + dy, qx + dx
                gt = Instances.from_label_image(lab[y:y + size, x:x + size].astype(np.int32), cls_id=0)
                out.append(Sample(f"dsb_{y}_{x}", gt, meta={"cell_type": "nucleus"},
                                  _image=img[y:y + size, x:x + size]))
    return out


@pytest.mark.slow
@pytest.mark.skipif(not (DSB / "img2d.tif").is_file() or not (DSB / "mask2d.tif").is_file(),
                    reason=f"DSB2018 sample not at {DSB}")
def test_beats_watershed_on_real_nuclei(tmp_path):
    """12 crops of 128x128 from three quadrants of the DSB2018 image train; the 4 crops of the
    fourth quadrant are held out. Briefly trained Cellpose must score above watershed there."""
    pytest.importorskip("cellpose.train")
    import tifffile

    from bench.metrics.evaluator import evaluate_predictions

    img = tifffile.imread(DSB / "img2d.tif")
    lab = tifffile.imread(DSB / "mask2d.tif")
    train = _dsb_crops(img, lab, [(0, 0), (0, 256), (256, 0)])
    held = _dsb_crops(img, lab, [(256, 256)])
    classes = ["nucleus"]

    # nuclei are ~23 px across; working at diam_mean=12 shrinks each crop to ~64 px, so a
    # 64 px training patch holds a whole crop: a quarter of the compute of full resolution
    m = build("cellpose:epochs=30,batch_size=8,nimg_per_epoch=24,bsize=64,diam_mean=12,lr=0.01",
              classes, preset="smoke")
    m.fit(train, [], m.cfg, FitContext(workdir=tmp_path, seed=0))
    gt = {s.image_id: (s.instances, "nucleus") for s in held}

    def kaggle_map(preds):
        res = evaluate_predictions(gt, {s.image_id: p for s, p in zip(held, preds)}, classes,
                                   resolve_overlaps=True, n_resamples=20)
        return res["kaggle_map"]

    cp = kaggle_map(m.predict(held))
    ws = kaggle_map(build("watershed", classes).predict(held))
    print(f"held-out DSB2018 kaggle mAP: cellpose {cp:.3f}, watershed {ws:.3f}")
    assert cp > ws, f"cellpose {cp:.3f} <= watershed {ws:.3f} on held-out DSB2018 crops"
