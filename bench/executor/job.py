"""One job of an executor: a sweep's variant x seed (its fine-tune), one pretrain stage of it, or one model of a run.

Locally it runs as ``python -m bench.executor.job SWEEP VARIANT SEED [STAGE]`` (a process of its
own, so its environment, GPU and cores are its own); on SLURM submitit calls :class:`SweepJob` on
the node. Both run :func:`run_job`: the same code as ``bench sweep --jobs 1`` (``bench.sweep._run_one``
and ``run_stage`` on the run folders of ``bench.store``), so results cannot depend on the
executor; a model of ``bench run`` runs ``bench.runner.run._run_model`` (:func:`run_model_job`). Everything the
job needs is in ``SWEEP/sweep.json`` and the job's ``request.json``; what came of it goes to its
``state.json`` and, with where it ran, to each of its run folders' ``executor.json``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from bench.store import RunDir, SweepDir
from bench.util import atomic_write_json


def write_request(sweep: SweepDir, variant: str, seed: int, request: dict[str, Any]) -> None:
    """What the job runs; its earlier state goes, so a state file always belongs to the latest attempt."""
    jd = sweep.job(variant, seed).mkdir()
    jd.state.unlink(missing_ok=True)
    atomic_write_json(jd.request, {**request, "variant": variant, "seed": seed})


def where_am_i(executor: str) -> dict[str, Any]:
    """The job's host, pid, threads, GPU and (on SLURM) job ids and log files, as the job sees them."""
    env = os.environ
    rec: dict[str, Any] = {"executor": executor, "host": platform.node(), "pid": os.getpid(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "omp_num_threads": env.get("OMP_NUM_THREADS"),
                           "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES")}
    if hasattr(os, "sched_getaffinity"):
        rec["cores"] = sorted(os.sched_getaffinity(0))
    if env.get("SLURM_JOB_ID"):
        rec.update(slurm_job_id=_slurm_id(), slurm_raw_job_id=env["SLURM_JOB_ID"],
                   slurm_restart_count=int(env.get("SLURM_RESTART_COUNT", "0") or 0),
                   slurm_partition=env.get("SLURM_JOB_PARTITION"), slurm_node=env.get("SLURMD_NODENAME"))
        try:
            import submitit

            paths = submitit.JobEnvironment().paths
            rec.update(stdout=str(paths.stdout), stderr=str(paths.stderr))
        except (ImportError, RuntimeError, KeyError):
            pass
    return rec


def _slurm_id() -> str:
    """``ARRAYID_TASK`` for an array element (what squeue and scancel take), else the job id."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '0')}"
    return env["SLURM_JOB_ID"]


def _record_attempt(run: RunDir, rec: dict[str, Any]) -> None:
    """``RUN/executor.json``: every attempt at this run (a requeued job adds one), the latest last."""
    run.mkdir()
    old = json.loads(run.executor_record.read_text()) if run.executor_record.is_file() else {}
    attempts = list(old.get("attempts", []))[-19:] + [rec]
    atomic_write_json(run.executor_record, {**rec, "attempts": attempts})


def _load(sweep_dir: str | Path):
    from bench.sweep import SweepConfig

    sweep = SweepDir(sweep_dir)
    manifest = sweep.read_manifest()
    if manifest is None:
        raise FileNotFoundError(f"{sweep.manifest_path}: no sweep here (is the folder visible from this node?)")
    return sweep, SweepConfig(**manifest["config"])


def _start_note(what: str, rec: dict[str, Any]) -> None:
    print(f"job {what} on {rec['host']} (pid {rec['pid']}, {rec.get('slurm_job_id') or 'local'}, "
          f"threads {rec['omp_num_threads']}, GPU {rec['cuda_visible_devices']})", flush=True)


def _where(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: rec[k] for k in ("executor", "host", "slurm_job_id", "stdout", "stderr") if k in rec}


def run_job(sweep_dir: str | Path, variant: str, seed: int, executor: str = "local",
            stage: int | None = None) -> dict[str, Any]:
    """Run one variant x seed of a sweep (resuming whatever of it is finished); returns its state.

    ``stage`` J: only its pretrain stage J (a job of its own, which the next stage or the
    fine-tune waits for). None: the fine-tune, after its stages; stages already finished (by
    their own jobs) are taken as they are, a stage left unfinished is run first."""
    from bench.sweep import _run_one, run_stage

    sweep, cfg = _load(sweep_dir)
    jd = sweep.job(variant, seed) if stage is None else sweep.stage_job(variant, seed, stage)
    req = json.loads(sweep.job(variant, seed).request.read_text())
    rec = where_am_i(executor)
    own = sweep.run(variant, seed) if stage is None else sweep.pretrain_run(variant, seed, stage)
    _record_attempt(own, rec)
    _start_note(f"{variant}/seed{seed}" + ("" if stage is None else f" pretrain stage {stage}"), rec)
    args = (cfg, variant, seed, sweep.path, req["data"], req["base_preset"], req["preset"], req["device"],
            req["sets"], req["opts"], lambda m: print(m, flush=True), req["timeout_s"], Path(req["cache"]))
    if stage is None:
        state = _run_one(*args, stages_done=True)
    else:
        state = run_stage(*args[:3], stage, *args[3:])
    state["executor"] = _where(rec)
    atomic_write_json(jd.state, state)
    return state


def run_model_job(run_dir: str | Path, label: str, executor: str = "local") -> dict[str, Any]:
    """One model of ``bench run --jobs N`` / ``--executor slurm``: its worker, as ``bench run`` runs it
    one after the other (``bench.runner.run._run_model`` on the same model folder)."""
    from bench.runner.run import _run_model
    from bench.store import DevicePlan

    run = RunDir(run_dir)
    jd = run.job(label)
    req = json.loads(jd.request.read_text())
    rec = where_am_i(executor)
    _start_note(f"{label} of {run.path}", rec)
    plan = DevicePlan.from_dict(req["plan"])
    o = _run_model(run, req["spec"], req["config"], req["data"], plan, req["seed"], lambda m: print(m, flush=True),
                   req["timeout_s"], req["train_on"])
    state = {"key": label, "label": o.label, "state": o.state, "detail": o.detail, "device": o.device,
             "executor": _where(rec)}
    atomic_write_json(jd.state, state)
    return state


class SweepJob:
    """What submitit runs on a SLURM node. ``checkpoint`` makes it requeueable: on a time-out or
    preemption signal submitit resubmits the same call, and :func:`run_job` continues the run
    folders (finished stages kept, an unfinished fit starts over)."""

    def __call__(self, sweep_dir: str, variant: str, seed: int, stage: int | None = None) -> dict[str, Any]:
        return run_job(sweep_dir, variant, seed, executor="slurm", stage=stage)

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


class ModelJob(SweepJob):
    """One model of ``bench run --executor slurm`` (requeueable as :class:`SweepJob`)."""

    def __call__(self, run_dir: str, label: str) -> dict[str, Any]:  # type: ignore[override]
        return run_model_job(run_dir, label, executor="slurm")


def probe(marker: str) -> dict[str, Any]:
    """The probe job: can this node see the sweep's (or run's) manifest, and so the folder?"""
    return {"host": platform.node(), "visible": Path(marker).is_file(), "python": sys.executable}


def main(argv: list[str]) -> int:
    """The local executor's job process: ``python -m bench.executor.job SWEEP VARIANT SEED [STAGE]``
    (a sweep's job, or one pretrain stage of it) or ``... model RUN LABEL`` (a model of a run)."""
    from bench.runner.run import RunInterrupted
    from bench.runner.worker import _exit_with_parent

    _exit_with_parent()  # the sweep's process killed outright: the job stops with it
    try:
        if argv[0] == "model":
            state = run_model_job(argv[1], argv[2])
        else:
            state = run_job(argv[0], argv[1], int(argv[2]), stage=int(argv[3]) if len(argv) > 3 else None)
    except RunInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr, flush=True)
        return 130
    return 0 if state.get("state") in ("done", "not installed", "failed") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
