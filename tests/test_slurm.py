"""``--executor slurm`` against a real SLURM cluster (scripts/slurm-up.sh starts one on this machine).

Skipped, saying so, where no SLURM answers (``sinfo`` shows no usable node); CI starts the
one-node cluster first (.ci/run). The jobs run the working tree's code: SLURM starts them in the
test's folder with its environment (PYTHONPATH, CELLBENCH_PLUGINS, OMP_NUM_THREADS).
"""

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from bench.adapters import registry
from bench.executor import ExecutorError, ExecutorSpec, SlurmOptions
from bench.executor.status import status_text
from bench.sweep import run_sweep

from test_executor import FAKE, predictions, sweep_file

pytestmark = pytest.mark.slurm


def _cluster_state() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return None
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    states = out.stdout.split()
    return next((s for s in states if s.rstrip("*") in ("idle", "mixed", "allocated", "completing")), None)


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if _cluster_state() is None:
        pytest.skip("no SLURM cluster answers here (sinfo/sbatch missing or no usable node): "
                    "scripts/slurm-up.sh starts a one-node one as root; .ci/run does")


@pytest.fixture(autouse=True)
def fake_plugin(monkeypatch):
    monkeypatch.setenv("CELLBENCH_PLUGINS", FAKE)
    registry.load_plugins()


def _wait(cond, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _job_id(out: Path, key: str) -> str | None:
    try:
        return json.loads((out / "sweep.json").read_text())["runs"][key]["executor"].get("slurm_job_id")
    except (OSError, KeyError, json.JSONDecodeError):
        return None


def _queue_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T"], capture_output=True, text=True, timeout=20).stdout
    return dict(line.split() for line in out.splitlines() if line.strip()).get(job_id, "")


def test_same_masks_whatever_executor_ran_them(tmp_path, tiny_synth):
    """Two variants x two seeds of watershed and a few-iteration maskrcnn-tv, run one after the other,
    two at once and as a SLURM job array: the same masks, image for image."""
    cfg = sweep_file(tmp_path, {"tv": {}, "ws": {"model": "watershed"}}, seeds=[0, 1], base_options={
        "iterations": 3, "min_size": 128, "max_size": 128, "box_score_thresh": 0.0, "detections_per_image": 30,
        "rpn_post_nms_top_n_test": 60, "rpn_pre_nms_top_n_test": 120, "warmup_iters": 1, "lr_steps": [2]})
    cfg.write_text(cfg.read_text().replace("model: fake", "model: maskrcnn-tv"))
    took, preds = {}, {}
    for name, spec in (("serial", ExecutorSpec()), ("local2", ExecutorSpec(jobs=2)),
                       ("slurm", ExecutorSpec(name="slurm", slurm=SlurmOptions(max_parallel=2)))):
        t0 = time.perf_counter()
        out, states = run_sweep(cfg, data=str(tiny_synth), out=tmp_path / name, results=tmp_path / "r",
                                echo=lambda *_: None, executor=spec)
        took[name] = time.perf_counter() - t0
        assert {k: s["state"] for k, s in states.items()} == dict.fromkeys(states, "done"), states
        preds[name] = predictions(out)
    print("wall seconds per executor:", {k: round(v, 1) for k, v in took.items()})
    assert len(preds["serial"]) == 4 and all(preds["serial"].values())
    assert preds["local2"] == preds["serial"]
    assert preds["slurm"] == preds["serial"]
    # the comparison can tell runs apart: the two seeds of the trained model differ
    tv = {k: v for k, v in preds["serial"].items() if k.startswith("runs/tv/")}
    assert len(set(json.dumps(v) for v in tv.values())) == 2
    rec = json.loads((tmp_path / "slurm/runs/tv/seed1/executor.json").read_text())
    assert rec["executor"] == "slurm" and "_" in rec["slurm_job_id"] and Path(rec["stdout"]).is_file()


def _checkpointed(out: Path, variant: str):
    """The ModelDir of the variant's fit once it holds a mid-training checkpoint (``ModelDir.resume``)."""
    from adapters.trainable import RESUME_STATE
    from bench.store import RunDir

    run = RunDir(out / "runs" / variant / "seed0")
    if not run.exists():
        return None
    md = run.model_for(run.read_manifest().models[0])
    return md if (md.resume / RESUME_STATE).is_file() else None


def test_cancelled_job_is_resumed_and_a_requeued_one_continues(tmp_path, tiny_synth):
    """scancel one job (a torchvision Mask R-CNN with ``checkpoint_every``) while it trains, after its
    first checkpoint; signal another as SLURM does before a time limit: the second is requeued by
    submitit and finishes; ``--resume`` then submits only the cancelled one, whose fit continues from
    its checkpoint, and nothing finished runs again."""
    dirs = {v: tmp_path / f"count-{v}" for v in ("base", "requeued")}
    for d in dirs.values():
        d.mkdir()
    tv = {"iterations": 30, "checkpoint_every": 2, "batch_size": 1, "min_size": 128, "max_size": 128,
          "log_every": 1, "warmup_iters": 1, "lr_steps": [20], "box_score_thresh": 0.0, "detections_per_image": 30,
          "rpn_post_nms_top_n_test": 60, "rpn_pre_nms_top_n_test": 120, "fpn_channels": 32}
    cfg = sweep_file(tmp_path, {"base": {"options": {"counter_dir": str(dirs["base"])}},
                                "cancelled": {"model": "maskrcnn-tv", "options": tv},
                                "requeued": {"options": {"counter_dir": str(dirs["requeued"]), "fit_sleep": 10}}},
                     seeds=[0])
    out = tmp_path / "sw"
    spec = ExecutorSpec(name="slurm", slurm=SlurmOptions(probe=False))
    result: dict = {}

    def sweep():
        try:
            result["states"] = run_sweep(cfg, data=str(tiny_synth), out=out, results=tmp_path / "r",
                                         echo=lambda *_: None, executor=spec)[1]
        except BaseException as e:  # noqa: BLE001 - shown by the assertion below
            result["error"] = e

    t0 = time.perf_counter()
    th = threading.Thread(target=sweep)
    th.start()
    # both slow jobs in fit (two CPUs: the base job first, then one of them)
    # both jobs train at once (two CPUs), in whichever order: the cancel lands after the first
    # checkpoint (the test waits for the checkpoint folder), the signal while the other one sleeps in fit
    md = cancelled = requeued = None
    end = time.monotonic() + 300
    while (cancelled is None or requeued is None) and time.monotonic() < end:
        if cancelled is None and (md := _checkpointed(out, "cancelled")) is not None:
            cancelled = _job_id(out, "cancelled/seed0")
            subprocess.run(["scancel", cancelled], check=True)
        if requeued is None and (dirs["requeued"] / "fit.started").is_file():
            requeued = _job_id(out, "requeued/seed0")
            assert "running" in status_text(out) and requeued in status_text(out)
            subprocess.run(["scancel", "--signal=USR2", requeued], check=True)  # what SLURM sends before the limit
        time.sleep(0.3)
    assert cancelled and requeued, "timed out after 300 s waiting for a checkpoint of the job to cancel " \
                                   "and the job to requeue to train"
    _wait(lambda: _queue_state(requeued) == "PENDING", 60, "submitit to requeue the job")
    # a requeued job waits ~2 min before it may start again; the test lets it start now
    subprocess.run(["scontrol", "update", f"JobId={requeued}", "StartTime=now"], check=True)
    th.join(600)
    assert not th.is_alive() and "error" not in result, result.get("error")
    states = result["states"]
    print(f"cancel + requeue sweep: {time.perf_counter() - t0:.1f} s")
    assert states["base/seed0"]["state"] == "done" and states["requeued/seed0"]["state"] == "done"
    assert states["cancelled/seed0"]["state"] == "failed"
    assert "cancelled (scancel)" in states["cancelled/seed0"]["detail"]
    text = status_text(out)
    assert "CANCELLED" in text and "1 failed" in text and "2 done" in text
    # the requeued job ran twice (its unfinished fit restarted), both attempts recorded in its run folder
    assert int((dirs["requeued"] / "fit.count").read_text()) == 2
    attempts = json.loads((out / "runs/requeued/seed0/executor.json").read_text())["attempts"]
    assert [a["slurm_restart_count"] for a in attempts] == [0, 1]

    t1 = time.perf_counter()
    _, states = run_sweep(cfg, out=out, resume=True, results=tmp_path / "r", echo=lambda *_: None, executor=spec)
    print(f"resume: {time.perf_counter() - t1:.1f} s")
    assert {k: s["state"] for k, s in states.items()} == dict.fromkeys(states, "done")
    assert _job_id(out, "cancelled/seed0") != cancelled and _job_id(out, "base/seed0") != cancelled
    counts = {v: int((d / "fit.count").read_text()) for v, d in dirs.items()}
    assert counts == {"base": 1, "requeued": 2}  # the finished ones did not run again
    # the cancelled fit continued from its checkpoint instead of starting over
    done = json.loads(md.fit_done.read_text())
    k = done.get("resumed_from_iteration", 0)
    assert 0 < k < tv["iterations"] and k % tv["checkpoint_every"] == 0, done
    print(f"the cancelled fit resumed from iteration {k} of {tv['iterations']}")
    assert f"resuming the fit from its checkpoint at iteration {k}" in md.log.read_text()
    assert done["iterations"] == tv["iterations"] and not md.resume.exists()


def test_an_option_the_cluster_rejects_shows_sbatchs_error(tmp_path, tiny_synth):
    cfg = sweep_file(tmp_path, {"base": {}}, seeds=[0], slurm={"partition": "no-such-partition"})
    from bench.cli_executor import executor_spec

    spec = executor_spec("slurm", None, None, None, [], sweep_file=cfg, check=False)
    assert spec.slurm.partition == "no-such-partition"
    with pytest.raises(ExecutorError, match="sbatch refused .*(?i:invalid partition)"):
        run_sweep(cfg, data=str(tiny_synth), out=tmp_path / "sw", echo=lambda *_: None, executor=spec)


def test_resume_watches_a_job_still_queued_instead_of_submitting_it_again(tmp_path, tiny_synth):
    """The login-node process dies after submitting; --resume finds the job still in the queue and
    waits for it: one SLURM job, one fit."""
    import os
    import signal
    import sys

    counter = tmp_path / "count"
    counter.mkdir()
    cfg = sweep_file(tmp_path, {"base": {"options": {"counter_dir": str(counter), "fit_sleep": 8}}}, seeds=[0],
                     slurm={"probe": False})
    out = tmp_path / "sw"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-m", "bench", "sweep", str(cfg), "--data", str(tiny_synth), "--out",
                             str(out), "--executor", "slurm", "--no-report"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    job = _wait(lambda: _job_id(out, "base/seed0"), 120, "the sweep to submit its job")
    proc.send_signal(signal.SIGKILL)  # the login session is gone; the job is not
    proc.wait()
    assert _queue_state(job) in ("PENDING", "RUNNING")
    _, states = run_sweep(cfg, out=out, resume=True, results=tmp_path / "r", echo=lambda *_: None,
                          executor=ExecutorSpec(name="slurm"))
    assert states["base/seed0"]["state"] == "done" and _job_id(out, "base/seed0") == job
    attempts = json.loads((out / "runs/base/seed0/executor.json").read_text())["attempts"]
    assert [a["slurm_job_id"] for a in attempts] == [job]
    assert int((counter / "fit.count").read_text()) == 1


def test_pretrain_stages_are_dependent_slurm_jobs(tmp_path, tiny_synth):
    """Each pretrain stage is a SLURM job of its own and the fine-tune is submitted with
    ``--dependency=afterok:<stage's job>``; a fine-tune whose stage failed is cancelled and reported
    failed naming the stage; ``--resume`` redoes neither a finished stage nor a finished fine-tune."""
    dirs = {k: tmp_path / k for k in ("stage", "fine", "bad", "badfine")}
    for d in dirs.values():
        d.mkdir()
    cfg = sweep_file(tmp_path, {
        "retrain": {"options": {"counter_dir": str(dirs["fine"])},
                    "pretrain": [{"data": "split:train+val", "options": {"counter_dir": str(dirs["stage"])}}]},
        "broken": {"options": {"counter_dir": str(dirs["badfine"])},
                   "pretrain": [{"data": "split:train+val", "options": {"mode": "crash_fit",
                                                                        "counter_dir": str(dirs["bad"])}}]}},
        seeds=[0], base_options={"iterations": 2})
    out = tmp_path / "sw"
    spec = ExecutorSpec(name="slurm", slurm=SlurmOptions(probe=False))
    t0 = time.perf_counter()
    _, states = run_sweep(cfg, data=str(tiny_synth), out=out, results=tmp_path / "r", echo=lambda *_: None,
                          executor=spec)
    print(f"stage + fine-tune sweep on SLURM: {time.perf_counter() - t0:.1f} s")
    manifest = json.loads((out / "sweep.json").read_text())
    stage_id = manifest["stage_jobs"]["retrain/seed0/pretrain0"]["executor"]["slurm_job_id"]
    fine_id = _job_id(out, "retrain/seed0")
    assert stage_id and fine_id and stage_id != fine_id
    script = next((out / "slurm").glob(f"{fine_id}_submission.sh")).read_text()
    assert f"--dependency=afterok:{stage_id}" in script
    assert states["retrain/seed0"]["state"] == "done"
    assert json.loads((out / "runs/retrain/seed0-pretrain0/executor.json").read_text())["slurm_job_id"] == stage_id
    assert json.loads((out / "runs/retrain/seed0/executor.json").read_text())["slurm_job_id"] == fine_id
    assert states["broken/seed0"]["state"] == "failed"
    assert "not run: broken seed 0 pretrain stage 0 did not finish" in states["broken/seed0"]["detail"]
    assert not (dirs["badfine"] / "fit.count").exists()
    rows = {line.split(" ", 1)[0]: line.split() for line in status_text(out).splitlines()}
    assert rows["retrain/seed0/pretrain0"][1:3] == ["done", stage_id]  # the stage's job: a row with its id
    assert rows["broken/seed0/pretrain0"][1] == "failed" and rows["broken/seed0"][1] == "failed"
    _, states = run_sweep(cfg, out=out, resume=True, results=tmp_path / "r", echo=lambda *_: None, executor=spec,
                          variants=["retrain"])
    assert states["retrain/seed0"]["state"] == "done"
    counts = {k: int((d / "fit.count").read_text()) for k, d in dirs.items() if (d / "fit.count").exists()}
    assert counts == {"stage": 1, "fine": 1, "bad": 1}


def test_bench_run_models_as_slurm_jobs(tmp_path, tiny_synth):
    """``bench run --executor slurm``: each model a SLURM job on the run's own model folders."""
    from bench.runner.run import run_benchmark

    spec = ExecutorSpec(name="slurm", slurm=SlurmOptions(probe=False))
    run, outcomes = run_benchmark(["fake", "fake:mode=drop_half"], str(tiny_synth), "smoke", "cpu", 0,
                                  tmp_path / "run", results=tmp_path / "r", echo=lambda *_: None, executor=spec)
    assert [o.state for o in outcomes] == ["done", "done"]
    assert outcomes[0].metrics["kaggle_map"] > outcomes[1].metrics["kaggle_map"]  # the ground truth beats half of it
    manifest = json.loads((run / "manifest.json").read_text())
    ids = {k: v["executor"]["slurm_job_id"] for k, v in manifest["models_state"].items()}
    assert len(set(ids.values())) == 2
    assert "2 done" in status_text(run)


def test_bench_run_resume_watches_a_model_job_still_queued(tmp_path, tiny_synth):
    """As for sweeps: the ``bench run`` that submitted dies; ``--resume`` watches the model's job
    still in the queue instead of submitting it again (one job, one fit)."""
    import os
    import signal
    import sys

    from bench.runner.run import run_benchmark

    counter = tmp_path / "count"
    counter.mkdir()
    model = f"fake:counter_dir={counter},fit_sleep=8"
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-m", "bench", "run", "--models", model, "--data", str(tiny_synth),
                             "--device", "cpu", "--out", str(out), "--executor", "slurm", "--slurm", "probe=false"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def job_id():
        try:
            states = json.loads((out / "manifest.json").read_text())["models_state"]
            return next(iter(states.values()))["executor"]["slurm_job_id"]
        except (OSError, KeyError, StopIteration, json.JSONDecodeError):
            return None

    job = _wait(job_id, 120, "bench run to submit its model's job")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _queue_state(job) in ("PENDING", "RUNNING")
    _, outcomes = run_benchmark([model], None, "smoke", "cpu", 0, out, resume=True, results=tmp_path / "r",
                                echo=lambda *_: None, executor=ExecutorSpec(name="slurm"))
    assert [o.state for o in outcomes] == ["done"] and job_id() == job
    assert int((counter / "fit.count").read_text()) == 1
