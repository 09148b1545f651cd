"""Raw outputs (bench/raw.py): the cache keeps what the model's own threshold drops, the published
predictions do not change, per-pixel maps decode within the quantisation error, and Detectron2
takes scale TTA when it keeps each image's own size."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.adapters.registry import ConfigError, build, make_config
from bench.data.io import read_sartorius
from bench.data.sample import Instances
from bench.raw import PROB_LEVELS, capture, cached_predictions, publish, quantise, read_maps, take_maps, write_maps

TINY_TV = "maskrcnn-tv:iterations=8,min_size=128,max_size=128,warmup_iters=2,lr_steps=[6],box_score_thresh=0.2"


def _same(a: Instances, b: Instances) -> bool:
    return (len(a) == len(b) and np.array_equal(a.scores, b.scores) and np.array_equal(a.classes, b.classes)
            and all(np.array_equal(x, y) for x, y in zip(a.counts, b.counts)))


def _same_set(a: Instances, b: Instances) -> bool:
    """The same instances, in any order among equal scores (StarDist's NMS orders exact ties by
    its candidate array, which the floor makes longer)."""
    key = lambda inst: sorted((float(sc), int(cl), c.tobytes()) for sc, cl, c in  # noqa: E731
                              zip(inst.scores, inst.classes, inst.counts))
    return len(a) == len(b) and key(a) == key(b)


def test_publish_keeps_scores_strictly_above_in_float32():
    inst = Instances(4, 4, [np.array([0, 16])] * 4, np.arange(4), np.array([0.1, 0.5, 0.50001, np.float32(0.3)]))
    out = publish(inst, 0.3)
    assert out.scores.tolist() == [0.5, 0.50001]        # 0.3 itself is not above 0.3, in float32 either
    assert out.classes.tolist() == [1, 2]
    assert publish(inst, None) is inst


def test_maps_round_trip_within_the_quantisation_error(tmp_path):
    rng = np.random.default_rng(0)
    p = rng.random((37, 53)).astype(np.float32)
    p[0, :3] = [0.0, 1.0, 1.7]  # the ends exact; out of range clipped
    size = write_maps(tmp_path / "m.npz", {"cellprob": quantise(p)}, {"image_id": "a"})
    maps, header = read_maps(tmp_path / "m.npz")
    assert header["image_id"] == "a" and "uint8" in header["encoding"] and size == (tmp_path / "m.npz").stat().st_size
    back = maps["cellprob"]
    assert back.dtype == np.float32 and back.shape == p.shape
    assert np.abs(back - np.clip(p, 0, 1)).max() <= 0.5 / PROB_LEVELS + 1e-7
    assert back[0, :3].tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="not quantised"):
        write_maps(tmp_path / "n.npz", {"x": p})
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(Exception, match="bad.npz.*unreadable"):
        read_maps(tmp_path / "bad.npz")


def test_tv_raw_cache_holds_what_its_threshold_drops(tiny_synth, tmp_path):
    """One tiny torchvision Mask R-CNN: predicting down to the floor and publishing above its
    threshold gives exactly what predicting at its threshold gives; through the worker, the cache
    holds instances below the threshold and bench tune reads it."""
    from bench.adapters.base import FitContext

    ds = read_sartorius(tiny_synth)
    train, val = ds.samples[:8], ds.samples[8:10]
    a = build(TINY_TV, ds.classes, "smoke")
    a.fit(train, val, a.cfg, FitContext(tmp_path / "work", "cpu", 0))
    plain = a.predict(val)
    with capture(a, 0.05):
        raw = a.predict(val)
    assert a.raw_floor is None and a.model.roi_heads.score_thresh == 0.05  # capture ended
    assert sum(len(r) for r in raw) > sum(len(p) for p in plain)
    for r, p in zip(raw, plain):
        assert r.scores.min() > 0.05 - 1e-7
        assert _same(publish(r, 0.2), p)
    a.predict(val)
    assert a.model.roi_heads.score_thresh == 0.2  # back to its own threshold


def test_worker_writes_the_raw_cache_and_tune_reads_it(tiny_synth, tmp_path):
    from bench.data.predictions import read_predictions
    from bench.runner.run import run_benchmark
    from bench.store import ModelDir
    from bench.tta import read_raw_outputs
    from bench.tune import tune_run

    run_dir, out = run_benchmark([TINY_TV], str(tiny_synth), "smoke", "cpu", 0, tmp_path / "run",
                                 results=tmp_path / "results", echo=lambda *_: None)
    assert [o.state for o in out] == ["done"]
    md = ModelDir(next((run_dir / "models").iterdir()))
    preds, _ = read_predictions(md.predictions)
    raw, header = read_raw_outputs(md.raw_outputs)
    assert header["score_floor"] == 0.05 and header["score_threshold"] == 0.2 and header["passes"] == ["identity"]
    below = [s for passes in raw.values() for s in passes["identity"].scores if s <= 0.2]
    assert below and min(below) > 0.05 - 1e-6
    for iid, p in preds.items():  # the published predictions: the cache above the threshold
        assert _same(publish(raw[iid]["identity"], 0.2), p)
    assert cached_predictions(md)[2] == 0.05
    t = tune_run(run_dir, echo=lambda *_: None)[md.label]
    m = json.loads(md.metrics.read_text())
    assert t["source"].startswith("raw outputs") and t["score_floor"] == 0.05
    assert t["untuned"] == pytest.approx(m["kaggle_map"], abs=1e-12)   # untuned: as published
    assert t["tuned_in_sample"] >= t["untuned"] - 1e-12                 # 0.2 is on the grid
    # predictions rewritten since (by hand or a tool): the cache is no longer theirs and is not used
    from bench.data.predictions import write_predictions

    write_predictions(md.predictions, dict(list(preds.items())[:1]), ["a", "b", "c"], {"model": "edited"})
    assert cached_predictions(md) is None
    assert tune_run(run_dir, echo=lambda *_: None)[md.label]["source"].startswith("predictions")


def test_cellpose_caches_its_cell_probability_map(tiny_synth, tmp_path):
    pytest.importorskip("cellpose")
    from bench.runner.run import run_benchmark
    from bench.store import ModelDir

    spec = "cellpose:epochs=1,batch_size=4,nimg_per_epoch=8,bsize=96,lr=0.01,flow_threshold=0.0,cellprob_threshold=-1.0"
    run_dir, out = run_benchmark([spec], str(tiny_synth), "smoke", "cpu", 0, tmp_path / "run",
                                 results=tmp_path / "results", echo=lambda *_: None)
    assert [o.state for o in out] == ["done"], [o.__dict__ for o in out]
    md = ModelDir(next((run_dir / "models").iterdir()))
    done = json.loads(md.predict_done.read_text())
    files = sorted(md.raw_maps.iterdir())
    assert len(files) == done["images"] and done["raw_map_bytes_per_image"] > 0
    maps, header = read_maps(files[0])
    prob = maps["cellprob"]
    assert prob.shape == (128, 128) and 0.0 <= prob.min() and prob.max() <= 1.0
    # the map agrees with the instances: their scores are the mean probability inside each mask
    from bench.data.predictions import read_predictions
    from bench.data import rle

    preds, _ = read_predictions(md.predictions)
    inst = preds[header["image_id"]]
    for c, s in zip(inst.counts, inst.scores):
        idx = rle.pixel_indices(c)
        assert prob.T.ravel()[idx].mean() == pytest.approx(s, abs=1.0 / PROB_LEVELS)


def _has_d2() -> bool:
    try:
        import detectron2  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def test_detectron2_scale_tta_only_at_its_own_size():
    with pytest.raises(ConfigError, match="min_size_test=0"):
        make_config("maskrcnn", "smoke", {"tta": "scale"})
    assert make_config("maskrcnn", "smoke", {"tta": "flip+scale", "min_size_test": 0}).tta == "flip+scale"


@pytest.mark.detectron2
@pytest.mark.skipif(not _has_d2(), reason="detectron2 is not installed")
def test_detectron2_scale_tta_end_to_end(tiny_synth, tmp_path):
    from bench.runner.run import run_benchmark
    from bench.store import ModelDir
    from bench.tta import read_raw_outputs

    spec = ("maskrcnn:iterations=2,lr_steps=[],warmup_iters=1,min_size_train=[128],min_size_test=0,"
            "num_workers=0,detections_per_image=30,score_thresh_test=0.0,raw_floor=0.0,tta=scale")
    run_dir, out = run_benchmark([spec], str(tiny_synth), "smoke", "cpu", 0, tmp_path / "run",
                                 results=tmp_path / "results", echo=lambda *_: None)
    assert [o.state for o in out] == ["done"]
    md = ModelDir(next((run_dir / "models").iterdir()))
    raw, header = read_raw_outputs(md.raw_outputs)
    assert header["passes"] == ["identity", "scale0.8", "scale1.25"]
    for passes in raw.values():
        for inst in passes.values():  # every pass mapped back onto the original 128 x 128 grid
            assert (inst.height, inst.width) == (128, 128)
    assert sum(len(p[k]) for p in raw.values() for k in ("scale0.8", "scale1.25")) > 0  # not vacuous
    t = json.loads(md.metrics.read_text())["timings"]
    assert t["tta"] == "scale" and t["tta_factor"] > 1.5


STARDIST_TINY = ("stardist:patch_size=[64,64],epochs=2,steps_per_epoch=3,batch_size=2,unet_n_filter_base=8,"
                 "net_conv_after_unet=16,lr=0.001,prob_thresh=0.3")


def test_stardist_raw_instances_and_probability_map(tiny_synth, tmp_path):
    """In StarDist's environment (re-run there by the test below): the cache goes below prob_thresh,
    the published set is unchanged, and the object probability map comes from the same network call."""
    pytest.importorskip("stardist.models")
    from bench.adapters.base import FitContext
    from bench.data.io import load_dataset

    ds = load_dataset(str(tiny_synth))
    samples = list(ds)
    m = build(STARDIST_TINY, ds.classes, preset="smoke")
    m.fit(samples[:9], [], m.cfg, FitContext(workdir=tmp_path / "work", seed=0))
    val = samples[9:]
    with capture(m, 0.05):
        raw = m.predict(val)
        maps = take_maps(m)
    assert m.raw_maps is None
    # a threshold that splits this barely trained model's scores, as its configured one
    m.thresholds["prob"] = float(np.median(np.concatenate([r.scores for r in raw])))
    plain = m.predict(val)
    assert len(maps) == len(val)
    gy, gx = m.model.config.grid
    for s, r, p, mp in zip(val, raw, plain, maps):
        assert _same_set(publish(r, m.score_threshold()), p)
        prob = mp["object_prob"]
        assert prob.shape == (-(-s.height // gy), -(-s.width // gx)) and 0 <= prob.min() and prob.max() <= 1
        # every polygon's score is the probability at its centre, a value of this map
        assert all(np.isclose(prob, sc, atol=1e-6).any() for sc in r.scores)
    assert sum(len(r) for r in raw) > sum(len(p) for p in plain)


def test_stardist_raw_in_its_own_environment(run_in_model_env):
    """Where this interpreter has no StarDist, the test above runs in StarDist's environment."""
    run_in_model_env("stardist", "stardist.models", __file__, "test_stardist_raw_instances_and_probability_map")
