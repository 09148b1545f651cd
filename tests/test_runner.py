"""The runner with a fake adapter (crash isolation, resume, atomic writes) and the two real adapters."""

import json
import os
from pathlib import Path

import pytest

from bench.adapters import registry
from bench.runner.run import run_benchmark
from bench.util import atomic_write_json

FAKE = str(Path(__file__).parent / "plugins" / "fake_adapter.py")


@pytest.fixture(autouse=True)
def fake_plugin(monkeypatch):
    monkeypatch.setenv("CELLBENCH_PLUGINS", FAKE)
    registry.load_plugins()


def _run(tmp_path, models, data, **kw):
    return run_benchmark(models, str(data), "smoke", "cpu", 0, kw.pop("out", tmp_path / "run"),
                         results=tmp_path / "results", echo=lambda *_: None, **kw)


def test_crash_in_one_model_does_not_stop_the_others(tmp_path, tiny_synth):
    run_dir, out = _run(tmp_path, ["fake:mode=crash_fit", "fake:mode=kill", "fake", "fake:mode=drop_half"],
                        tiny_synth)
    states = {o.label: o.state for o in out}
    assert states == {"fake--mode=crash_fit": "failed", "fake--mode=kill": "failed", "fake": "done",
                      "fake--mode=drop_half": "done"}
    crashed = run_dir / "models" / "fake--mode=crash_fit"
    assert "fake crash in fit" in (crashed / "log.txt").read_text()
    assert json.loads((crashed / "status.json").read_text())["stage"] == "fit"
    killed = next(o for o in out if o.label == "fake--mode=kill")
    assert "signal 9" in killed.detail
    ok = {o.label: o.metrics for o in out if o.state == "done"}
    assert ok["fake"]["kaggle_map"] == pytest.approx(1.0)
    assert ok["fake--mode=drop_half"]["kaggle_map"] < 0.7
    m = json.loads((run_dir / "manifest.json").read_text())
    for key in ("command", "configs", "seed", "split_hash", "packages", "git_commit", "device", "host"):
        assert key in m
    assert m["models_state"]["fake--mode=crash_fit"]["state"] == "failed"
    assert json.loads((run_dir / "split.json").read_text())["hash"] == m["split_hash"]
    t = ok["fake"]["timings"]
    assert t["iterations"] == 3 and t["infer_ms_per_image"] > 0 and t["fit_peak_rss_mb"] > 0
    assert len((run_dir / "models" / "fake" / "train_log.jsonl").read_text().splitlines()) == 3


def test_resume_redoes_only_unfinished_stages(tmp_path, tiny_synth):
    counters = tmp_path / "counters"
    counters.mkdir()
    spec = f"fake:mode=crash_predict_once,counter_dir={counters}"
    run_dir, out = _run(tmp_path, [spec, "fake"], tiny_synth)
    assert [o.state for o in out] == ["failed", "done"]
    label = out[0].label
    mdir = run_dir / "models" / label
    assert (mdir / "fit.done.json").is_file() and not (mdir / "metrics.json").exists()
    finished = (run_dir / "models" / "fake" / "metrics.json").read_bytes()
    with pytest.raises(FileExistsError):
        _run(tmp_path, [spec, "fake"], tiny_synth, out=run_dir)
    run_dir2, out2 = _run(tmp_path, [spec, "fake"], tiny_synth, out=run_dir, resume=True)
    assert run_dir2 == run_dir and [o.state for o in out2] == ["done", "done"]
    assert (counters / "fit.count").read_text() == "1"  # fit was not redone
    assert (run_dir / "models" / "fake" / "metrics.json").read_bytes() == finished  # untouched


def test_unknown_model_or_key_fails_before_anything_runs(tmp_path, tiny_synth):
    with pytest.raises(registry.ConfigError, match="unknown model 'nope'"):
        _run(tmp_path, ["fake", "nope"], tiny_synth)
    with pytest.raises(registry.ConfigError, match="colour"):
        _run(tmp_path, ["fake:colour=red"], tiny_synth)
    with pytest.raises(registry.ConfigError, match="iterations"):
        _run(tmp_path, ["fake:iterations=many"], tiny_synth)
    assert not (tmp_path / "run").exists()


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"a": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_model_specs_parse():
    assert registry.split_specs("cellpose:diam_mean=20,epochs=3,maskrcnn") == ["cellpose:diam_mean=20,epochs=3",
                                                                           "maskrcnn"]
    assert registry.parse_spec("cellpose:diam_mean=20,weights=a.pt") == ("cellpose",
                                                                        {"diam_mean": 20, "weights": "a.pt"})


def test_report_from_a_run(tmp_path, tiny_synth):
    from bench.report.leaderboard import write_report

    run_dir, _ = _run(tmp_path, ["fake", "fake:mode=drop_half", "fake:mode=crash_fit"], tiny_synth)
    paths = write_report([run_dir], tmp_path / "report")
    names = {p.name for p in paths}
    assert {"leaderboard.md", "leaderboard.csv", "leaderboard.html", "leaderboard.png", "precision_vs_iou.png",
            "per_class.png", "accuracy_vs_speed.png", "loss_curves.png", "overlays.png"} <= names
    md = (tmp_path / "report" / "leaderboard.md").read_text()
    assert md.index("| fake |") < md.index("| fake--mode=drop_half |")
    assert "failed" in md and "fake crash in fit" in md
    csv_text = (tmp_path / "report" / "leaderboard.csv").read_text()
    assert csv_text.splitlines()[1].startswith("fake,done")
    assert "worse" in md  # paired test: dropping half the cells is distinguishably worse
    assert "data:image/png;base64," in (tmp_path / "report" / "leaderboard.html").read_text()


def test_tiny_smoke_comparison_with_real_adapters(tmp_path, tiny_synth):
    """The harness end to end with real frameworks: watershed and a few maskrcnn-tv iterations."""
    tv = ("maskrcnn-tv:iterations=4,min_size=128,max_size=128,box_score_thresh=0.0,detections_per_image=30,"
          "rpn_post_nms_top_n_test=60,rpn_pre_nms_top_n_test=120,warmup_iters=1,lr_steps=[3]")
    run_dir, out = _run(tmp_path, ["watershed", tv], tiny_synth)
    assert [o.state for o in out] == ["done", "done"], [o.detail for o in out]
    for o in out:
        m = o.metrics
        assert 0 <= m["kaggle_map"] <= 1 and m["coco"]["max_dets"] == 1000
        assert set(m["per_threshold"]) == {f"{t:.2f}" for t in [0.5 + 0.05 * k for k in range(10)]}
        assert m["timings"]["infer_ms_per_image"] > 0
    tv_dir = run_dir / "models" / out[1].label
    assert (tv_dir / "checkpoint" / "model.pt").is_file()
    assert len((tv_dir / "train_log.jsonl").read_text().splitlines()) >= 1


def test_models_command_lists_everything():
    from typer.testing import CliRunner

    from bench.cli import app

    r = CliRunner().invoke(app, ["models"])
    assert r.exit_code == 0
    for name in ("watershed", "maskrcnn-tv", "cellpose", "cascade", "maskrcnn"):
        assert name in r.output
