"""bench.overhead: the cellbench-vs-native measurement runs, both sides train, the figures are complete."""

import json

import numpy as np
import pytest

from bench import overhead


def test_overhead_maskrcnn_tv_measures_both_sides(tmp_path):
    pytest.importorskip("torchvision")
    pytest.importorskip("pycocotools")
    res = overhead.measure("maskrcnn-tv", iterations=2, warmup=1, reps=1, n_train=4, n_test=2, size=(96, 96),
                           workdir=tmp_path, log=lambda s: None)
    assert res["status"] == "ok", res
    cfg = res["config"]
    assert cfg["iterations"] == 2 and cfg["num_workers"] == 0
    for part, unit in (("train", "s_per_iter"), ("infer", "ms_per_img")):
        figs = res[part]
        for side in ("cellbench", "native"):
            assert np.isfinite(figs[f"{side}_{unit}"]) and figs[f"{side}_{unit}"] > 0
        assert figs["ratio"] > 0 and len(figs["reps"]) >= 1
    assert {r["side"] for r in res["train"]["reps"]} == {"cellbench", "native"}
    for side in ("cellbench", "native"):
        t = res["trained"][side]
        assert t["params_changed"] is True, (side, t)   # the weights moved after the first iteration
        assert t["losses_finite"] is True
    # the same network on both sides; from the same weights (score threshold 0, a detection cap) both
    # predict detections, cellbench at most as many (it drops masks that come out empty)
    assert res["trained"]["cellbench"]["n_params"] == res["trained"]["native"]["n_params"]
    last = res["infer"]["reps"][-1]
    assert 0 < last["cellbench_detections"] <= last["native_detections"]
    assert "maskrcnn-tv" in overhead.table({"maskrcnn-tv": res})
    json.dumps(res)  # serialisable as it is


def test_overhead_skips_a_framework_that_is_not_installed(tmp_path, monkeypatch, capsys):
    # torchvision is always installed, so the adapter itself is available and the native side's
    # reason is the one that must come through, as given
    monkeypatch.setattr(overhead.TorchvisionNative, "available", lambda self: "torchvision not importable (test)")
    out = tmp_path / "o.json"
    assert overhead.main(["--adapters", "maskrcnn-tv", "--in-process", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    r = doc["adapters"]["maskrcnn-tv"]
    assert r["status"] == "skipped" and r["reason"] == "torchvision not importable (test)"  # passed through as given
    assert doc["git"]["commit"] and "cpu_count" in doc["machine"]
    assert "maskrcnn-tv: skipped" in capsys.readouterr().out
