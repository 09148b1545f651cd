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


def test_batched_prediction_times_each_call_and_keeps_the_predictions(tmp_path, tiny_synth):
    """predict_batch_size N: the worker hands N images per call (the warm-up still one), every image
    gets 1/N of its call's time, predictions are those of image-by-image prediction."""
    from bench.data.predictions import read_predictions
    from bench.store import RunDir

    counters = tmp_path / "counters"
    counters.mkdir()
    run_dir, out = _run(tmp_path, ["fake", f"fake:predict_batch_size=3,counter_dir={counters}"], tiny_synth)
    assert [o.state for o in out] == ["done", "done"]
    run = RunDir(run_dir)
    one, three = (run.model(o.label) for o in out)
    calls = [int(n) for n in (counters / "predict_calls.txt").read_text().split()]
    n_val = one.read_predict_done().images
    warm = three.read_predict_done().warmup_images
    assert calls == [1] * warm + [3] * (n_val // 3) + ([n_val % 3] if n_val % 3 else [])
    assert three.read_predict_done().extra == {"predict_batch_size": 3}
    p1, _ = read_predictions(one.predictions)
    p3, _ = read_predictions(three.predictions)
    assert p1.keys() == p3.keys()
    for k in p1:
        assert [list(c) for c in p1[k].counts] == [list(c) for c in p3[k].counts]


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


# ---------------------------------------------------------------------------
# timeouts, kills, interrupts, one writer per run folder (issues 13 and 19)
# ---------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_timeout_is_reported_as_a_timeout_and_takes_the_worker_group(tmp_path, tiny_synth):
    import time

    counters = tmp_path / "counters"
    counters.mkdir()
    spec = f"fake:fit_sleep=300,spawn_child=true,counter_dir={counters}"
    t0 = time.monotonic()
    # 20 s per model: the second model's fresh worker must start within it, even on a loaded machine
    run_dir, out = _run(tmp_path, [spec, "fake"], tiny_synth, timeout_s=20)
    assert time.monotonic() - t0 < 120
    assert [o.state for o in out] == ["failed", "done"]  # the next model still runs
    assert out[0].detail == "timed out after 20 s"
    status = json.loads((run_dir / "models" / out[0].label / "status.json").read_text())
    assert status["state"] == "failed" and status["error"] == "timed out after 20 s"
    assert "signal" not in status["error"] and "memory" not in status["error"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["models_state"][out[0].label]["detail"] == "timed out after 20 s"
    child = int((counters / "child.pid").read_text())  # what the worker started went with it
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(child)


def test_a_worker_killed_in_fit_is_resumed_from_fit(tmp_path, tiny_synth):
    counters = tmp_path / "counters"
    counters.mkdir()
    spec = f"fake:mode=kill_fit_once,counter_dir={counters}"
    run_dir, out = _run(tmp_path, [spec], tiny_synth)
    assert out[0].state == "failed" and out[0].detail == "killed by signal 9 (out of memory?)"
    mdir = run_dir / "models" / out[0].label
    status = json.loads((mdir / "status.json").read_text())
    assert status["stage"] == "fit" and "signal 9" in status["error"]
    assert not (mdir / "fit.done.json").exists() and not (mdir / "checkpoint").exists()
    _, out2 = _run(tmp_path, [spec], tiny_synth, out=run_dir, resume=True)
    assert out2[0].state == "done" and out2[0].metrics["kaggle_map"] == pytest.approx(1.0)
    assert (counters / "fit.count").read_text() == "2"  # fit ran again, from the start
    assert (mdir / "fit.done.json").is_file() and (mdir / "checkpoint" / "fake.json").is_file()
    status = json.loads((mdir / "status.json").read_text())
    assert status["state"] == "done" and not status.get("error") and not status.get("traceback")
    assert status.get("stage") is None
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["models_state"][out[0].label]["state"] == "done"


def test_resume_of_a_missing_folder_is_an_error(tmp_path, tiny_synth):
    with pytest.raises(FileNotFoundError, match="holds no run"):
        _run(tmp_path, ["fake"], tiny_synth, out=tmp_path / "nope", resume=True)
    assert not (tmp_path / "nope").exists()
    (tmp_path / "empty").mkdir()  # a folder without a run is no run either
    with pytest.raises(FileNotFoundError, match="holds no run"):
        _run(tmp_path, ["fake"], tiny_synth, out=tmp_path / "empty", resume=True)
    from typer.testing import CliRunner

    from bench.cli import app

    r = CliRunner().invoke(app, ["run", "--models", "fake", "--data", str(tiny_synth), "--device", "cpu",
                                 "--out", str(tmp_path / "nope"), "--resume"])
    assert r.exit_code == 2 and "holds no run" in r.output
    assert not (tmp_path / "nope").exists()


def test_a_second_runner_on_a_locked_run_is_refused(tmp_path, tiny_synth):
    import platform

    from bench.store import RunDir, RunLocked

    run_dir, _ = _run(tmp_path, ["fake"], tiny_synth)
    with RunDir(run_dir).lock():  # as a runner still working on it would
        with pytest.raises(RunLocked, match=f"pid {os.getpid()} on host {platform.node()}"):
            _run(tmp_path, ["fake", "fake:mode=drop_half"], tiny_synth, out=run_dir, resume=True)
        with pytest.raises(RunLocked):  # a new run into a locked (empty) folder as well
            (tmp_path / "fresh").mkdir()
            with RunDir(tmp_path / "fresh").lock():
                _run(tmp_path, ["fake"], tiny_synth, out=tmp_path / "fresh")
    assert not (run_dir / "models" / "fake--mode=drop_half").exists()  # nothing ran
    _, out = _run(tmp_path, ["fake", "fake:mode=drop_half"], tiny_synth, out=run_dir, resume=True)
    assert [o.state for o in out] == ["done", "done"]  # the lock went with its holder


def test_a_running_bench_run_holds_its_folder_and_stops_on_sigterm(tmp_path, tiny_synth, bench_processes):
    """A real second process: refused while the first runs; SIGTERM reaches the worker, which is
    marked interrupted (not out of memory); --resume then finishes it."""
    import signal

    from bench.store import RunLocked

    counters = tmp_path / "counters"
    counters.mkdir()
    spec = f"fake:fit_sleep=120,counter_dir={counters}"
    out = tmp_path / "run"
    proc = bench_processes.start("run", "--models", spec, "--data", tiny_synth, "--device", "cpu", "--out", out)
    bench_processes.wait_until(proc, (counters / "fit.started").is_file, timeout=120, poll=0.2)
    worker = int((counters / "fit.started").read_text())
    with pytest.raises(RunLocked, match=f"pid {proc.pid} "):
        _run(tmp_path, [spec], tiny_synth, out=out, resume=True)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130, proc.stdout.read()
    assert not _alive(worker)
    from bench.store import model_label

    label = model_label(spec)
    mdir = out / "models" / label
    assert mdir.is_dir(), list((out / "models").iterdir())
    status = json.loads((mdir / "status.json").read_text())
    assert status["state"] == "interrupted" and status["error"] == "interrupted by SIGTERM"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["models_state"][label]["state"] == "interrupted"


# ---------------------------------------------------------------------------
# device planning from the adapters' declared capabilities
# ---------------------------------------------------------------------------

def test_plan_follows_the_declared_capabilities():
    from bench.adapters.base import Capabilities
    from bench.runner.devices import DeviceError, plan_model

    both = Capabilities(predicts_classes=True, overlapping_masks=True)
    cpu_only = Capabilities(predicts_classes=False, overlapping_masks=False, devices=("cpu",), trainable=False)
    gpu_only = Capabilities(predicts_classes=True, overlapping_masks=True, devices=("cuda",))
    p = plan_model("maskrcnn-tv", both, "cuda:1")
    assert (p.device, p.fit, p.resolve_overlaps, p.note) == ("cuda:1", "train", True, "")
    p = plan_model("watershed", cpu_only, "cuda:1")
    assert (p.device, p.requested, p.fit, p.resolve_overlaps) == ("cpu", "cuda:1", "skip", False)
    assert "runs on cpu" in p.note and "not trainable" in p.note
    assert plan_model("watershed", cpu_only, "cpu").device == "cpu"
    with pytest.raises(DeviceError, match="cannot run on cpu"):
        plan_model("gpu-thing", gpu_only, "cpu")
    assert plan_model("gpu-thing", gpu_only, "cuda:0").device == "cuda:0"
    needs = Capabilities(predicts_classes=True, overlapping_masks=True, needs_weights=True)
    with pytest.raises(DeviceError, match="needs a weights file"):
        plan_model("pretrained", needs, "cpu", {"weights": None})
    assert plan_model("pretrained", needs, "cpu", {"weights": "/w.pt"}).device == "cpu"


def test_resolve_device_keeps_the_index_and_checks_it(monkeypatch):
    from bench.runner import devices

    monkeypatch.setattr(devices, "_cuda_count", lambda: 0)
    assert devices.resolve_device("auto") == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA device"):
        devices.resolve_device("cuda")
    monkeypatch.setattr(devices, "_cuda_count", lambda: 2)
    assert devices.resolve_device("auto") == "cuda"
    assert devices.resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(RuntimeError, match="2 CUDA device"):
        devices.resolve_device("cuda:2")
    with pytest.raises(ValueError):
        devices.resolve_device("gpu")


def test_a_cuda_run_puts_cpu_only_models_on_the_cpu_and_records_it(tmp_path, tiny_synth, monkeypatch):
    from bench.runner import devices, run
    from bench.runner.run import summary_table

    monkeypatch.setattr(devices, "_cuda_count", lambda: 2)  # a machine with two GPUs, as torch would say
    monkeypatch.setattr(run, "_gpu_name", lambda d: f"Fake GPU {d}")
    lines = []
    run_dir, out = run_benchmark(["fake", "fake-frozen"], str(tiny_synth), "smoke", "cuda:1", 0, tmp_path / "run",
                                 results=tmp_path / "results", echo=lines.append)
    assert [o.state for o in out] == ["done", "done"], [o.detail for o in out]
    assert [o.device for o in out] == ["cpu", "cpu"]
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["device"] == "cuda:1" and m["gpu"] == "Fake GPU cuda:1"
    assert m["devices"]["fake"]["device"] == "cpu" and m["devices"]["fake"]["requested"] == "cuda:1"
    assert m["models_state"]["fake"]["device"] == "cpu"
    job = json.loads((run_dir / "models" / "fake" / "job.json").read_text())
    assert job["device"] == "cpu" and job["requested_device"] == "cuda:1"
    metrics = json.loads((run_dir / "models" / "fake" / "metrics.json").read_text())
    assert metrics["device"] == "cpu" and metrics["requested_device"] == "cuda:1"
    assert any("runs on cpu" in line and "cuda:1" in line for line in lines)  # said, not silent
    table = summary_table(out)
    assert "device" in table.splitlines()[0] and " cpu " in table.splitlines()[1]
    from bench.report.leaderboard import write_report

    write_report([run_dir], tmp_path / "report")
    md = (tmp_path / "report" / "leaderboard.md").read_text()
    assert "device `cuda:1`" in md and "fake (cpu), fake-frozen (cpu)" in md
    assert "fake,done" in (tmp_path / "report" / "leaderboard.csv").read_text()
    assert (tmp_path / "report" / "leaderboard.csv").read_text().splitlines()[1].endswith(",cpu")


def test_a_model_that_cannot_run_as_asked_is_refused_before_anything_trains(tmp_path, tiny_synth):
    from bench.runner.devices import DeviceError

    with pytest.raises(DeviceError, match="fake-gpu cannot run on cpu"):
        _run(tmp_path, ["fake", "fake-gpu"], tiny_synth)
    with pytest.raises(DeviceError, match="needs a weights file"):
        _run(tmp_path, ["fake", "fake-weights"], tiny_synth)
    assert not (tmp_path / "run").exists()  # not even the first model ran


def test_not_trainable_skips_fit_and_declared_flat_masks_are_checked(tmp_path, tiny_synth):
    run_dir, out = _run(tmp_path, ["fake-frozen", "fake-flat"], tiny_synth)
    frozen, flat = out
    assert frozen.state == "done", frozen.detail  # its fit raises if called
    fd = json.loads((run_dir / "models" / "fake-frozen" / "fit.done.json").read_text())
    assert fd["skipped"] is True and fd["iterations"] == 0
    assert frozen.metrics["fit"] == "skipped (not trainable)" and frozen.metrics["overlaps"] == "resolved by score"
    assert (run_dir / "models" / "fake-frozen" / "checkpoint" / "fake.json").is_file()  # bench predict can load it
    # fake-flat declares non-overlapping masks but returns the (overlapping) ground truth: not silently fixed
    assert flat.state == "failed" and "overlap" in flat.detail
    status = json.loads((run_dir / "models" / "fake-flat" / "status.json").read_text())
    assert status["stage"] == "evaluate"


def test_predict_plans_its_device_like_run(tmp_path, tiny_synth, monkeypatch):
    from bench.infer import load_model
    from bench.runner import devices

    run_dir, _ = _run(tmp_path, ["fake"], tiny_synth)
    lm = load_model(run_dir, "fake", "cpu")
    assert lm.device == "cpu" and lm.device_note == ""
    monkeypatch.setattr(devices, "_cuda_count", lambda: 1)
    lm = load_model(run_dir, "fake", "cuda")
    assert lm.device == "cpu" and "runs on cpu" in lm.device_note  # said, not silent
    monkeypatch.setattr(devices, "_cuda_count", lambda: 0)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        load_model(run_dir, "fake", "cuda")


def test_a_corrupt_or_missized_image_stops_the_run_before_its_folder_exists(tmp_path, tiny_synth):
    """Preflight reads every image of the split first: a corrupt one and a wrongly annotated size
    are both named, and no run folder (nor manifest) is written."""
    import shutil

    from bench.preflight import PreflightError

    data = tmp_path / "data"
    shutil.copytree(tiny_synth, data)
    pngs = sorted((data / "train").glob("*.png"))
    pngs[0].write_bytes(b"not a png")
    rows = (data / "train.csv").read_text().splitlines()
    other = pngs[1].stem
    rows = [rows[0]] + [r.replace(",128,128,", ",128,130,", 1) if r.startswith(other + ",") else r
                        for r in rows[1:]]
    (data / "train.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(PreflightError) as err:
        _run(tmp_path, ["fake"], data)
    assert pngs[0].name in str(err.value) and other in str(err.value)
    assert not (tmp_path / "run").exists()


def test_a_full_disk_while_saving_names_the_path_and_resume_needs_no_cleanup(tmp_path, tiny_synth):
    counters = tmp_path / "c"
    counters.mkdir()
    spec = f"fake:mode=disk_full_save_once,counter_dir={counters}"
    run_dir, out = _run(tmp_path, [spec], tiny_synth)
    assert out[0].state == "failed"
    assert "No space left on device" in out[0].detail and "checkpoint.tmp" in out[0].detail
    mdir = run_dir / "models" / out[0].label
    assert not (mdir / "checkpoint.tmp").exists() and not (mdir / "checkpoint").exists()
    _, again = _run(tmp_path, [spec], tiny_synth, resume=True)   # space freed: resume just works
    assert again[0].state == "done" and (mdir / "checkpoint" / "fake.json").is_file()
