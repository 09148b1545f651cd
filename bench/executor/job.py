"""One job of a sweep's executor: one variant x seed (its pretrain stages, then its own fit).

Locally it runs as ``python -m bench.executor.job SWEEP VARIANT SEED`` (a process of its own, so
its environment, GPU and cores are its own); on SLURM submitit calls :class:`SweepJob` on the
node. Both run :func:`run_job`: the same code as ``bench sweep --jobs 1`` (``bench.sweep._run_one``
on the run folders of ``bench.store``), so results cannot depend on the executor. Everything the
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


def run_folders(sweep: SweepDir, cfg, variant: str, seed: int) -> list[RunDir]:
    """The job's run folders: its pretrain stages in order, then its own."""
    stages = [sweep.pretrain_run(variant, seed, j) for j in range(len(cfg.variants[variant].pretrain))]
    return stages + [sweep.run(variant, seed)]


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


def run_job(sweep_dir: str | Path, variant: str, seed: int, executor: str = "local") -> dict[str, Any]:
    """Run one variant x seed of a sweep (resuming whatever of it is finished); returns its state."""
    from bench.sweep import SweepConfig, _run_one

    sweep = SweepDir(sweep_dir)
    manifest = sweep.read_manifest()
    if manifest is None:
        raise FileNotFoundError(f"{sweep.manifest_path}: no sweep here (is the folder visible from this node?)")
    jd = sweep.job(variant, seed)
    req = json.loads(jd.request.read_text())
    cfg = SweepConfig(**manifest["config"])
    rec = where_am_i(executor)
    for run in run_folders(sweep, cfg, variant, seed):
        _record_attempt(run, rec)
    print(f"job {variant}/seed{seed} on {rec['host']} (pid {rec['pid']}, {rec.get('slurm_job_id') or 'local'}, "
          f"threads {rec['omp_num_threads']}, GPU {rec['cuda_visible_devices']})", flush=True)
    state = _run_one(cfg, variant, seed, sweep.path, req["data"], req["base_preset"], req["preset"],
                     req["device"], req["sets"], req["opts"], lambda m: print(m, flush=True), req["timeout_s"],
                     Path(req["cache"]))
    state["executor"] = {k: rec[k] for k in ("executor", "host", "slurm_job_id", "stdout", "stderr") if k in rec}
    atomic_write_json(jd.state, state)
    return state


class SweepJob:
    """What submitit runs on a SLURM node. ``checkpoint`` makes it requeueable: on a time-out or
    preemption signal submitit resubmits the same call, and :func:`run_job` continues the run
    folders (finished stages kept, an unfinished fit starts over)."""

    def __call__(self, sweep_dir: str, variant: str, seed: int) -> dict[str, Any]:
        return run_job(sweep_dir, variant, seed, executor="slurm")

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def probe(sweep_dir: str) -> dict[str, Any]:
    """The probe job: can this node see the sweep folder (and so the data and split in it)?"""
    p = Path(sweep_dir)
    return {"host": platform.node(), "visible": (p / "sweep.json").is_file(), "python": sys.executable}


def main(argv: list[str]) -> int:
    """``python -m bench.executor.job SWEEP VARIANT SEED``: the local executor's job process."""
    from bench.runner.run import RunInterrupted
    from bench.runner.worker import _exit_with_parent

    _exit_with_parent()  # the sweep's process killed outright: the job stops with it
    sweep_dir, variant, seed = argv[0], argv[1], int(argv[2])
    try:
        state = run_job(sweep_dir, variant, seed)
    except RunInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr, flush=True)
        return 130
    return 0 if state.get("state") in ("done", "not installed", "failed") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
