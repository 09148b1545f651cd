"""Executors: where a sweep's jobs run, between the planner (``bench.sweep``) and the worker.

A job is one variant x seed of a sweep: its pretrain stages in order (a fine-tune waits for its
stage), then its own run; each stage is an ordinary run folder of the runner. ``bench sweep``
plans and validates everything, then hands the unfinished jobs to an executor:

- ``local`` with ``--jobs 1`` (the default): the jobs one after the other in the sweep's own
  process, exactly as before executors existed (``ExecutorSpec.serial``; this module is not used);
- ``local`` with ``--jobs N`` / ``--gpus``: N job processes at once (:mod:`bench.executor.local`);
- ``slurm``: one SLURM job array through submitit (:mod:`bench.executor.slurm`).

Every executor runs the same :func:`bench.executor.job.run_job`, so the results do not depend on
which one ran them. The sweep folder is locked while its jobs run (a second sweep there is
refused); what each job did is in the sweep's state, its run folders' ``executor.json`` and
``bench status``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.executor.options import EXECUTORS, ExecutorSpec, SlurmOptions, parse_gpus, parse_slurm_options  # noqa: F401
from bench.executor.slurm import ExecutorError  # noqa: F401
from bench.store import SweepDir
from bench.util import atomic_write_json


def run_sweep_jobs(spec: ExecutorSpec, sweep_dir: Path, manifest: dict[str, Any], keys: list[tuple[str, int]],
                   request: dict[str, Any], echo=print) -> dict[str, dict]:
    """Run the unfinished of ``keys`` with the executor of ``spec``; returns every key's state.

    ``manifest`` is the sweep's (``sweep.json``): each job's state is written into it as it
    changes. ``request``: what every job runs with (data, presets, device, --set/--opt, timeout,
    cache). Finished runs are not run again; on SLURM, a job of an earlier submission still in
    the queue is watched, not submitted twice.
    """
    from bench.executor.job import write_request
    from bench.executor.status import run_done

    sweep = SweepDir(sweep_dir)
    with sweep.lock():  # one sweep process per folder
        def on_state(variant: str, seed: int, state: dict) -> None:
            key = f"{variant}/seed{seed}"
            old = manifest["runs"].get(key) or _base_state(sweep, manifest, variant, seed)
            new = {**{k: v for k, v in old.items() if k not in ("state", "detail")}, **state}
            new["executor"] = {**old.get("executor", {}), **state.get("executor", {})}
            manifest["runs"][key] = new
            atomic_write_json(sweep.manifest_path, manifest)

        todo, attach = [], {}
        queued = _queued(manifest, keys) if spec.name == "slurm" else {}
        for v, s in keys:
            if run_done(sweep.run(v, s)):
                echo(f"[{v} seed {s}] finished earlier: skipped")
                if manifest["runs"].get(f"{v}/seed{s}", {}).get("state") != "done":
                    on_state(v, s, _done_state(sweep, v, s))
            elif (v, s) in queued:
                attach[(v, s)] = queued[(v, s)]
            else:
                write_request(sweep, v, s, request)
                todo.append((v, s))
        _executor(spec, manifest, echo).run(sweep, todo, on_state, **({"attach": attach} if attach else {}))
    return {f"{v}/seed{s}": manifest["runs"][f"{v}/seed{s}"] for v, s in keys}


def _executor(spec: ExecutorSpec, manifest: dict, echo):
    if spec.name == "slurm":
        from bench.executor.slurm import SlurmExecutor, require_sbatch

        require_sbatch()
        return SlurmExecutor(spec.slurm, name=f"cellbench-{manifest.get('name', 'sweep')}", echo=echo)
    from bench.executor.local import LocalExecutor

    return LocalExecutor(spec.jobs, spec.gpus, echo)


def _queued(manifest: dict, keys: list[tuple[str, int]]) -> dict[tuple[str, int], dict]:
    """Keys whose SLURM job (recorded in the sweep's state) is still pending or running."""
    from bench.executor.slurm import queue, require_sbatch

    require_sbatch()
    q = queue()
    if q is None:  # submitting again what may still run would run it twice
        raise ExecutorError("squeue does not answer: cannot tell which jobs of the sweep are still queued, so "
                            "nothing was submitted; try again when the controller answers")
    out = {}
    for v, s in keys:
        ex = manifest["runs"].get(f"{v}/seed{s}", {}).get("executor", {})
        if ex.get("slurm_job_id") in q:
            out[(v, s)] = ex
    return out


def _base_state(sweep: SweepDir, manifest: dict, v: str, s: int) -> dict:
    """What the report needs of a run before its job has said anything (as ``bench.sweep._run_one`` writes)."""
    cfg = manifest["config"]
    return {"variant": v, "seed": s, "model": cfg["variants"][v].get("model") or cfg["base"]["model"],
            "run_dir": str(sweep.run(v, s).path.relative_to(sweep.path)), "stages": []}


def _done_state(sweep: SweepDir, v: str, s: int) -> dict:
    from bench.executor.status import read_json

    st = read_json(sweep.job(v, s).state) or {}
    return {**st, "variant": v, "seed": s, "state": "done", "detail": ""}


def check_executor(spec: ExecutorSpec, device: str) -> None:
    """What can be refused before the sweep writes anything."""
    if spec.name == "slurm":
        from bench.executor.slurm import require_sbatch

        require_sbatch()
    if spec.gpus and not device.startswith("cuda"):
        raise ExecutorError(f"--gpus {','.join(spec.gpus)} but the sweep runs on {device}: use --device cuda")

