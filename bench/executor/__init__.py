"""Executors: where a sweep's jobs run, between the planner (``bench.sweep``) and the worker.

A job is one variant x seed of a sweep (its own fit), each of its pretrain stages (a job of its
own that the next stage or the fine-tune waits for), or one model of ``bench run``; each is an
ordinary run (or model) folder of the runner, with resources from the model's config
(:mod:`bench.executor.resources`). ``bench sweep`` / ``bench run`` plan and validate everything,
then hand the unfinished jobs to an executor:

- ``local`` with ``--jobs 1`` (the default): the jobs one after the other in the sweep's own
  process, exactly as before executors existed (``ExecutorSpec.serial``; this module is not used);
- ``local`` with ``--jobs N`` / ``--gpus``: N job processes at once (:mod:`bench.executor.local`);
- ``slurm``: one SLURM job array through submitit (:mod:`bench.executor.slurm`).

Every executor runs the same :mod:`bench.executor.job`, so the results do not depend on
which one ran them. The sweep folder is locked while its jobs run (a second sweep there is
refused); what each job did is in the sweep's state, its run folders' ``executor.json`` and
``bench status``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.adapters.registry import ConfigError
from bench.executor.options import EXECUTORS, ExecutorSpec, SlurmOptions, parse_gpus, parse_slurm_options  # noqa: F401
from bench.executor.slurm import ExecutorError  # noqa: F401
from bench.store import SweepDir
from bench.util import atomic_write_json


def run_sweep_jobs(spec: ExecutorSpec, sweep_dir: Path, manifest: dict[str, Any], keys: list[tuple[str, int]],
                   request: dict[str, Any], echo=print) -> dict[str, dict]:
    """Run the unfinished of ``keys`` with the executor of ``spec``; returns every key's state.

    ``manifest`` is the sweep's (``sweep.json``): each job's state is written into it as it
    changes (a pretrain stage's job under ``stage_jobs``). ``request``: what every job runs with
    (data, presets, device, --set/--opt, timeout, cache). Each pretrain stage is a job of its own
    that the next stage (and then the fine-tune) waits for; an ensemble waits for its members.
    Finished runs and stages are not run again; on SLURM, a job of an earlier submission still in
    the queue is watched, not submitted twice.
    """
    from bench.executor.job import write_request
    from bench.executor.status import run_done

    sweep = SweepDir(sweep_dir)
    with sweep.lock():  # one sweep process per folder
        def on_state(key: str, state: dict) -> None:
            if key.count("/") == 2:  # a pretrain stage's job
                old = manifest.setdefault("stage_jobs", {}).get(key, {})
                manifest["stage_jobs"][key] = {**old, **state, "executor": {**old.get("executor", {}),
                                                                              **state.get("executor", {})}}
            else:
                variant, seed = key.rsplit("/seed", 1)
                old = manifest["runs"].get(key) or _base_state(sweep, manifest, variant, int(seed))
                new = {**{k: v for k, v in old.items() if k not in ("state", "detail")}, **state}
                new["executor"] = {**old.get("executor", {}), **state.get("executor", {})}
                manifest["runs"][key] = new
            atomic_write_json(sweep.manifest_path, manifest)

        queued = _queued(manifest, keys) if spec.name == "slurm" else {}
        tasks, attach = [], {}
        final: dict[tuple[str, int], str | None] = {}  # each key's task or queued job (None: finished)
        for v, s in keys:
            if run_done(sweep.run(v, s)):
                echo(f"[{v} seed {s}] finished earlier: skipped")
                final[(v, s)] = None
                if manifest["runs"].get(f"{v}/seed{s}", {}).get("state") != "done":
                    on_state(f"{v}/seed{s}", _done_state(sweep, v, s))
                continue
            write_request(sweep, v, s, request)
            for t in _sweep_tasks(spec, sweep, manifest, v, s, request, final):
                if t.key in queued:
                    attach[t.key] = queued[t.key]
                else:
                    tasks.append(t)
            final[(v, s)] = f"{v}/seed{s}"
        if spec.name == "slurm":
            _executor(spec, manifest, echo).run(sweep.path, sweep.slurm_dir, sweep.manifest_path, tasks, on_state,
                                                attach=attach, folders=_folders(sweep, manifest, attach))
        else:
            _executor(spec, manifest, echo).run(tasks, on_state)
    return {f"{v}/seed{s}": manifest["runs"][f"{v}/seed{s}"] for v, s in keys}


def _sweep_tasks(spec: ExecutorSpec, sweep: SweepDir, manifest: dict, v: str, s: int, request: dict,
                 final: dict) -> list:
    """A variant x seed's tasks: its unfinished pretrain stages, each waiting for the one before, then
    its fine-tune waiting for the last; an ensemble waits for its members' jobs of the seed."""
    from bench.adapters import registry
    from bench.executor.job import SweepJob
    from bench.executor.resources import Resources, job_gpus, job_resources
    from bench.executor.status import run_done
    from bench.executor.task import Task
    from bench.sweep import SweepConfig, variant_model, variant_preset

    cfg = SweepConfig(**manifest["config"])
    variant = cfg.variants[v]
    path = str(sweep.path.resolve())
    if variant.ensemble is not None:
        after = tuple(k for m in variant.ensemble.members if (k := final.get((m, s))))
        return [Task(f"{v}/seed{s}", sweep.job(v, s), [path, v, str(s)], SweepJob(), (path, v, s, None),
                     Resources(gpus=0, cpus=1), 0, after, f"{v} seed {s}")]
    model = variant_model(cfg, v)
    res = job_resources(model, variant_preset(cfg, v, request["preset"]), spec.slurm)
    try:
        gpus = job_gpus(res, request["device"], registry.get(model).capabilities.devices)
    except ValueError as e:
        raise ConfigError(f"variant {v}: {e}") from None
    tasks, prev = [], ()
    for j in range(len(variant.pretrain)):
        if run_done(sweep.pretrain_run(v, s, j)):  # finished earlier: nothing to wait for
            continue
        key = f"{v}/seed{s}/pretrain{j}"
        tasks.append(Task(key, sweep.stage_job(v, s, j), [path, v, str(s), str(j)], SweepJob(), (path, v, s, j),
                          res, gpus, prev, f"{v} seed {s} pretrain stage {j}"))
        prev = (key,)
    tasks.append(Task(f"{v}/seed{s}", sweep.job(v, s), [path, v, str(s)], SweepJob(), (path, v, s, None), res, gpus,
                      prev, f"{v} seed {s}"))
    return tasks


def _folders(sweep: SweepDir, manifest: dict, keys) -> dict:
    """The job folders of (attached) task keys."""
    out = {}
    for key in keys:
        parts = key.split("/")
        v, s = parts[0], int(parts[1][4:])
        out[key] = sweep.stage_job(v, s, int(parts[2][8:])) if len(parts) == 3 else sweep.job(v, s)
    return out


def _executor(spec: ExecutorSpec, manifest: dict, echo):
    if spec.name == "slurm":
        from bench.executor.slurm import SlurmExecutor, require_sbatch

        require_sbatch()
        return SlurmExecutor(spec.slurm, name=f"cellbench-{manifest.get('name', 'sweep')}", echo=echo)
    from bench.executor.local import LocalExecutor

    return LocalExecutor(spec.jobs, spec.gpus, echo)


def _queued(manifest: dict, keys: list[tuple[str, int]]) -> dict[str, dict]:
    """Task keys (a variant x seed, or one of its stages) whose SLURM job (recorded in the sweep's
    state) is still pending or running."""
    from bench.executor.slurm import queue, require_sbatch

    require_sbatch()
    q = queue()
    if q is None:  # submitting again what may still run would run it twice
        raise ExecutorError("squeue does not answer: cannot tell which jobs of the sweep are still queued, so "
                            "nothing was submitted; try again when the controller answers")
    wanted = {f"{v}/seed{s}" for v, s in keys}
    out = {}
    for key, st in list(manifest["runs"].items()) + list(manifest.get("stage_jobs", {}).items()):
        if "/".join(key.split("/")[:2]) in wanted and st.get("executor", {}).get("slurm_job_id") in q:
            out[key] = st["executor"]
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
    if spec.gpus and ":" in device:
        raise ExecutorError(f"--gpus {','.join(spec.gpus)} with --device {device}: each job sees its own GPU(s) as "
                            "cuda; use --device cuda")

