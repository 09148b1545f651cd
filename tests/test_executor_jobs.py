"""bench run through the executors, per-job resources, pretrain stages as dependent jobs.

``bench run --jobs 2`` must give the masks ``--jobs 1`` gives (watershed and a 2-iteration
torchvision Mask R-CNN on tiny data); resources come from the model's config under the sweep
file's ``slurm:`` and ``--slurm``; a fine-tune waits for its pretrain stage's job and is not run
when that failed; ``--resume`` never redoes a finished stage. SLURM's side: test_slurm.py.
"""

import gzip
import json
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bench.adapters import registry
from bench.adapters.registry import ConfigError
from bench.executor import ExecutorSpec, parse_slurm_options
from bench.executor.resources import Resources, job_gpus, job_resources, model_resources
from bench.runner.run import run_benchmark
from bench.sweep import run_sweep

from test_executor import FAKE, sweep_file

TV_TINY = ("maskrcnn-tv:iterations=2,min_size=128,max_size=128,box_score_thresh=0.0,detections_per_image=30,"
           "rpn_post_nms_top_n_test=60,rpn_pre_nms_top_n_test=120,warmup_iters=1,lr_steps=[1]")


def _masks(run: Path) -> dict[str, list]:
    out = {}
    for p in sorted(run.glob("models/*/predictions.jsonl.gz")):
        with gzip.open(p, "rt") as f:
            out[p.parent.name.split("--")[0]] = [json.loads(x) for x in f if x.strip()]
    return out


def _files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.glob("models/**/*") if p.is_file()}


def test_bench_run_jobs_2_gives_the_masks_of_jobs_1(tmp_path, tiny_synth):
    from bench.cli import app

    serial, outcomes = run_benchmark([TV_TINY, "watershed"], str(tiny_synth), "smoke", "cpu", 0, tmp_path / "serial",
                                     results=tmp_path / "r", echo=lambda *_: None)
    assert [o.state for o in outcomes] == ["done", "done"]
    res = CliRunner().invoke(app, ["run", "--models", TV_TINY + ",watershed", "--data", str(tiny_synth),
                                   "--device", "cpu", "--out", str(tmp_path / "par"), "--jobs", "2"])
    assert res.exit_code == 0, res.output
    par = tmp_path / "par"
    if len(os.sched_getaffinity(0)) >= 2:  # both at once: the second job got the other core
        assert "slot 0: cores 0" in res.output and "slot 1: cores 1" in res.output
    masks = _masks(par)
    assert set(masks) == {"maskrcnn-tv", "watershed"} and all(masks.values())
    assert masks == _masks(serial)
    assert _files(par) == _files(serial)  # the same model folders, the same files
    manifest = json.loads((par / "manifest.json").read_text())
    assert [v["state"] for v in manifest["models_state"].values()] == ["done", "done"]
    for label in manifest["models_state"]:  # each model's job: its request, state and log under RUN/jobs/
        st = json.loads((par / "jobs" / label / "state.json").read_text())
        assert st["state"] == "done" and st["executor"]["executor"] == "local"
        assert "job " in (par / "jobs" / label / "log.txt").read_text()
    # --resume through the executor: nothing left to do, nothing rewritten
    tv = next(par.glob("models/maskrcnn-tv*/metrics.json"))
    before = tv.stat().st_mtime_ns
    res = CliRunner().invoke(app, ["run", "--models", TV_TINY + ",watershed", "--device", "cpu", "--out", str(par),
                                   "--resume", "--jobs", "2"])
    assert res.exit_code == 0 and "finished earlier" in res.output
    assert tv.stat().st_mtime_ns == before


def test_bench_run_executor_options_are_refused_before_anything_is_written(tmp_path, tiny_synth, monkeypatch):
    from bench.cli import app

    res = CliRunner().invoke(app, ["run", "--models", "watershed", "--data", str(tiny_synth), "--device", "cpu",
                                   "--out", str(tmp_path / "g"), "--gpus", "0"])
    assert res.exit_code == 2 and "--gpus 0 but the sweep runs on cpu" in res.output
    res = CliRunner().invoke(app, ["run", "--models", "watershed", "--data", str(tiny_synth), "--device", "cpu",
                                   "--out", str(tmp_path / "s"), "--jobs", "2", "--slurm", "cpus=many"])
    assert res.exit_code == 2 and "--slurm: cpus" in res.output
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    res = CliRunner().invoke(app, ["run", "--models", "watershed", "--data", str(tiny_synth), "--device", "cpu",
                                   "--out", str(tmp_path / "s"), "--executor", "slurm"])
    assert res.exit_code == 2 and "sbatch, squeue, scontrol not on PATH" in res.output
    assert not (tmp_path / "g").exists() and not (tmp_path / "s").exists()


def test_shipped_configs_declare_sensible_resources():
    for name in ("maskrcnn", "cascade", "maskrcnn-tv", "cellpose", "stardist", "yolo-seg"):
        for preset in ("smoke", "default", "paper"):
            r = model_resources(name, preset)
            assert r.gpus == 1 and r.mem_gb and r.time_min, (name, preset, r)
        assert model_resources(name, "smoke").cpus is None  # --jobs N divides the cores
        assert model_resources(name, "default").cpus == 4
    ws = model_resources("watershed", "default")
    assert ws.gpus == 0 and ws.cpus == 1
    # GPUs count on a cuda run only, and never for a CPU-only model
    assert job_gpus(model_resources("maskrcnn-tv", "default"), "cuda", ("cpu", "cuda")) == 1
    assert job_gpus(model_resources("maskrcnn-tv", "default"), "cpu", ("cpu", "cuda")) == 0
    assert job_gpus(ws, "cuda", registry.get("watershed").capabilities.devices) == 0
    with pytest.raises(ValueError, match="gpus=0 but it runs on cuda"):
        job_gpus(Resources(gpus=0), "cuda", ("cpu", "cuda"))


def _config(root: Path, resources, presets=("smoke", "default")) -> Path:
    root.mkdir(exist_ok=True)
    doc = {"model": "maskrcnn-tv", "presets": {p: {"iterations": 5} for p in presets}, "resources": resources}
    p = root / "maskrcnn-tv.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def test_resources_precedence_model_then_sweep_file_then_command_line(tmp_path):
    root = tmp_path / "configs"
    _config(root, {"gpus": 2, "cpus": 8, "mem_gb": 32, "time_min": 600, "presets": {"smoke": {"time_min": 30}}})
    assert model_resources("maskrcnn-tv", "smoke", root) == Resources(gpus=2, cpus=8, mem_gb=32, time_min=30)
    assert model_resources("maskrcnn-tv", "default", root).time_min == 600  # the preset's only over its own
    from bench.cli_executor import executor_spec

    cfg = sweep_file(tmp_path, {"base": {}}, slurm={"cpus": 4, "time_min": 90, "partition": "gpu"})
    file_only = executor_spec("slurm", None, None, None, [], sweep_file=cfg, check=False)
    assert job_resources("maskrcnn-tv", "smoke", file_only.slurm, root) == Resources(gpus=2, cpus=4, mem_gb=32,
                                                                                     time_min=90)
    both = executor_spec("slurm", None, None, None, ["time_min=20", "mem_gb=3"], sweep_file=cfg,
                         check=False)
    assert job_resources("maskrcnn-tv", "smoke", both.slurm, root) == Resources(gpus=2, cpus=4, mem_gb=3, time_min=20)
    # SLURM's defaults (cpus=1, time_min=60) are not "given": they never hide the model's
    assert job_resources("maskrcnn-tv", "default", parse_slurm_options({}, []), root).cpus == 8


def test_resources_become_the_slurm_jobs_options(tmp_path):
    from bench.executor.slurm import SlurmExecutor

    ex = SlurmExecutor(parse_slurm_options({"partition": "gpu", "additional": {"constraint": "a100"}}, []))
    sub = ex._submitit(tmp_path, res=Resources(cpus=6, mem_gb=12, time_min=45), gpus=1, after=["17", "18_2"])
    p = sub.parameters
    assert (p["cpus_per_task"], p["mem"], p["time"], p["gpus_per_node"], p["partition"]) == (6, "12288M", 45, 1, "gpu")
    assert p["additional_parameters"] == {"constraint": "a100", "dependency": "afterok:17:18_2"}
    assert "OMP_NUM_THREADS=6" in p["setup"][0]
    cpu = ex._submitit(tmp_path, res=Resources(gpus=1), gpus=0).parameters  # a CPU run asks SLURM for no GPU
    assert "gpus_per_node" not in cpu and "dependency" not in cpu["additional_parameters"]


@pytest.mark.parametrize("resources, problem", [
    ({"gpus": 1, "vram": 8}, "resources: vram: Extra inputs are not permitted"),
    ({"cpus": 0}, "resources: cpus: Input should be greater than or equal to 1"),
    ({"mem_gb": "lots"}, "resources: mem_gb: Input should be a valid number"),
    ({"presets": {"paper": {"gpus": 2}}}, "resources.presets: no preset 'paper'"),
    ({"presets": {"smoke": {"time_min": -5}}}, "resources.presets.smoke: time_min"),
    ("two gpus", "resources: expected a mapping"),
])
def test_bad_resources_are_a_clear_error_naming_the_file(tmp_path, resources, problem):
    path = _config(tmp_path / "configs", resources)
    with pytest.raises(ConfigError) as e:
        model_resources("maskrcnn-tv", "smoke", tmp_path / "configs")
    assert str(path) in str(e.value) and problem in str(e.value)


# ---------------------------------------------------------------------------
# pretrain stages as dependent jobs (the fake adapter: counters show what ran)
# ---------------------------------------------------------------------------

@pytest.fixture
def fake_plugin(monkeypatch):
    monkeypatch.setenv("CELLBENCH_PLUGINS", FAKE)
    registry.load_plugins()


def test_a_fine_tune_waits_for_its_stage_and_is_not_run_when_it_failed(tmp_path, tiny_synth, fake_plugin):
    dirs = {k: tmp_path / k for k in ("st0", "st1", "fine", "bad", "badfine")}
    for d in dirs.values():
        d.mkdir()
    cfg = sweep_file(tmp_path, {
        "two": {"options": {"counter_dir": str(dirs["fine"])},
                "pretrain": [{"data": "split:train+val", "options": {"counter_dir": str(dirs["st0"])}},
                             {"data": "split:train+val", "options": {"counter_dir": str(dirs["st1"]),
                                                                     "mode": "kill_fit_once"}}]},
        "broken": {"options": {"counter_dir": str(dirs["badfine"])},
                   "pretrain": [{"data": "split:train+val", "options": {"mode": "crash_fit",
                                                                        "counter_dir": str(dirs["bad"])}}]}},
        seeds=[0], base_options={"iterations": 2})
    out = tmp_path / "sw"
    _, states = run_sweep(cfg, data=str(tiny_synth), out=out, results=tmp_path / "r", echo=lambda *_: None,
                          executor=ExecutorSpec(jobs=2))
    # stage 1 of "two" was killed: its fine-tune never ran, and says why
    assert states["two/seed0"]["state"] == "failed"
    assert "not run: two seed 0 pretrain stage 1 did not finish" in states["two/seed0"]["detail"]
    assert "killed by signal 9" in states["two/seed0"]["detail"]
    assert states["broken/seed0"]["state"] == "failed" and "fake crash in fit" in states["broken/seed0"]["detail"]
    assert not (dirs["fine"] / "fit.count").exists() and not (dirs["badfine"] / "fit.count").exists()
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["stage_jobs"]["two/seed0/pretrain0"]["state"] == "done"
    assert manifest["stage_jobs"]["two/seed0/pretrain1"]["state"] == "failed"
    # each stage ran in a job of its own, the next one after it
    rec0 = json.loads((out / "runs/two/seed0-pretrain0/executor.json").read_text())
    rec1 = json.loads((out / "runs/two/seed0-pretrain1/executor.json").read_text())
    assert rec0["pid"] != rec1["pid"] and rec0["started"] <= rec1["started"]
    from bench.executor.status import status_text

    text = status_text(out)
    assert "not run: two seed 0 pretrain stage 1" in text
    # every stage job has a row of its own: done, or failed saying why, with the last lines of its log
    assert _row(text, "two/seed0/pretrain0").split()[1] == "done"
    killed = _row(text, "two/seed0/pretrain1")
    assert killed.split()[1] == "failed" and "killed by signal 9" in killed
    assert text.split(killed, 1)[1].startswith("\n    | ")
    crashed = _row(text, "broken/seed0/pretrain0")
    assert crashed.split()[1] == "failed" and "fake crash in fit" in crashed
    assert "1 done, 4 failed" in text  # two stages and two fine-tunes failed
    # --resume: the finished stage 0 is not redone; stage 1 and the fine-tune run
    _, states = run_sweep(cfg, out=out, resume=True, results=tmp_path / "r", echo=lambda *_: None,
                          executor=ExecutorSpec(jobs=2), variants=["two"])
    assert states["two/seed0"]["state"] == "done"
    counts = {k: int((d / "fit.count").read_text()) for k, d in dirs.items() if (d / "fit.count").exists()}
    assert counts == {"st0": 1, "st1": 2, "fine": 1, "bad": 1}
    # the fine-tune started from the last stage's weights
    log = (out / "runs/two/seed0/models/fake/train_log.jsonl").read_text()
    assert "seed0-pretrain1" in log


def test_an_ensemble_job_waits_for_its_members(tmp_path, tiny_synth):
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"""
name: ens-jobs
base: {{model: watershed, preset: smoke, data: {tiny_synth}}}
variants:
  base: {{}}
  otsu-low: {{options: {{threshold_scale: 0.8}}}}
  ens: {{ensemble: {{members: [base, otsu-low], method: score-average, tune: false}}}}
""")
    out, states = run_sweep(cfg, out=tmp_path / "sweep", results=tmp_path / "results", echo=lambda *_: None,
                            variants=["ens"], executor=ExecutorSpec(jobs=2))
    assert {k: v["state"] for k, v in states.items()} == dict.fromkeys(states, "done") and len(states) == 3
    started = (out / "runs/ens/seed0/executor.json").stat().st_mtime
    for m in ("base", "otsu-low"):
        assert next((out / "runs" / m / "seed0").glob("models/*/metrics.json")).stat().st_mtime <= started


def _row(text: str, key: str) -> str:
    """The line of ``bench status`` for the job ``key``."""
    return next(line for line in text.splitlines() if line.split(" ", 1)[0] == key)


def _status_while_a_stage_trains(tmp_path, tiny_synth, executor: ExecutorSpec | None) -> tuple[Path, str, dict]:
    """A one-stage sweep whose stage trains for 6 s: the sweep folder, ``bench status`` while the
    stage trains, and the sweep's final states."""
    import threading
    import time

    from bench.executor.status import status_text

    stage = tmp_path / "stage"
    stage.mkdir()
    cfg = sweep_file(tmp_path, {"retrain": {"pretrain": [{"data": "split:train+val", "options": {
        "counter_dir": str(stage), "fit_sleep": 6}}]}}, seeds=[0], base_options={"iterations": 2})
    out, result = tmp_path / "sw", {}
    extra = {"executor": executor} if executor is not None else {}
    th = threading.Thread(target=lambda: result.update(states=run_sweep(
        cfg, data=str(tiny_synth), out=out, results=tmp_path / "r", echo=lambda *_: None, **extra)[1]))
    th.start()
    end = time.monotonic() + 120
    while not (stage / "fit.started").is_file() and time.monotonic() < end:
        time.sleep(0.2)
    text = status_text(out)
    th.join(180)
    assert (stage / "fit.started").is_file() and not th.is_alive()
    return out, text, result["states"]


def test_status_shows_a_running_stage_job_and_its_waiting_fine_tune(tmp_path, tiny_synth, fake_plugin):
    """While a pretrain stage's job trains, ``bench status`` shows it running in a row of its own and
    the fine-tune pending, waiting for it; afterwards both done."""
    from bench.executor.status import status_text

    out, text, states = _status_while_a_stage_trains(tmp_path, tiny_synth, ExecutorSpec(jobs=2))
    running = _row(text, "retrain/seed0/pretrain0")
    assert running.split()[1] == "running" and "fit" in running, text
    waiting = _row(text, "retrain/seed0")
    assert waiting.split()[1] == "pending" and "waits for pretrain stage 0" in waiting, text
    assert states["retrain/seed0"]["state"] == "done"
    text = status_text(out)
    assert [_row(text, k).split()[1] for k in ("retrain/seed0/pretrain0", "retrain/seed0")] == ["done", "done"]


def test_status_of_a_serial_sweep_shows_its_stage_from_the_run_folders(tmp_path, tiny_synth, fake_plugin):
    """Serially (no executor) a stage trains inside the sweep's own process, without a job record:
    ``bench status`` still gives it a row of its own, from the stage's run folder (running while it
    trains, done after), beside its fine-tune's row."""
    from bench.executor.status import status_text

    out, text, states = _status_while_a_stage_trains(tmp_path, tiny_synth, None)
    assert not (out / "jobs").exists()  # serial: no job records
    running = _row(text, "retrain/seed0/pretrain0")
    assert running.split()[1] == "running", text
    assert states["retrain/seed0"]["state"] == "done"
    text = status_text(out)
    assert [_row(text, k).split()[1] for k in ("retrain/seed0/pretrain0", "retrain/seed0")] == ["done", "done"]
