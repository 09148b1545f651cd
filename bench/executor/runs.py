"""``bench run --jobs N`` / ``--gpus`` / ``--executor slurm``: a run's models as executor jobs.

``bench run`` plans every model (config, device) and writes the run's manifest as always; then,
instead of one worker after the other, each model is a job: locally N at once (each its own
cores, threads and GPU), or SLURM jobs (one array per set of resources). A job runs exactly what
the serial runner runs for the model (``bench.runner.run._run_model`` on the same model folder,
``python -m bench.executor.job model RUN LABEL``), so the folders and results are the same; its
bookkeeping goes to ``RUN/jobs/<label>/`` (request, state, the job's own log). Resources come from
each model's ``resources:`` (its preset's), under ``--slurm KEY=VALUE``.
"""

from __future__ import annotations

from typing import Any

from bench.adapters import registry
from bench.adapters.registry import ConfigError
from bench.executor.options import ExecutorSpec
from bench.executor.resources import job_gpus, job_resources
from bench.executor.task import Task
from bench.store import Manifest, RunDir, model_label
from bench.util import atomic_write_json


def model_tasks(spec: ExecutorSpec, run: RunDir, manifest: Manifest, specs: list[str], plans: dict,
                data: str, seed: int, timeout_s: float | None, config_root=None) -> list[Task]:
    """One task per unfinished model, its request written (what ``_run_model`` is called with)."""
    from bench.executor.job import ModelJob

    tasks = []
    path = str(run.path.resolve())
    for s in specs:
        label = model_label(s)
        if run.model(label).has_metrics():
            continue
        name = registry.parse_spec(s)[0]
        plan = plans[s]
        res = job_resources(name, manifest.preset, spec.slurm, config_root)
        try:
            gpus = job_gpus(res, plan.device, registry.get(name).capabilities.devices)
        except ValueError as e:
            raise ConfigError(f"{label}: {e}") from None
        jd = run.job(label).mkdir()
        atomic_write_json(jd.request, {"spec": s, "config": manifest.configs[s], "data": data,
                                       "plan": plan.to_dict(), "seed": seed, "timeout_s": timeout_s,
                                       "train_on": manifest.train_on})
        tasks.append(Task(label, jd, ["model", path, label], ModelJob(), (path, label), res, gpus, (), label))
    return tasks


def run_model_jobs(spec: ExecutorSpec, run: RunDir, manifest: Manifest, specs: list[str], plans: dict,
                   data: str, seed: int, echo, timeout_s: float | None) -> list:
    """Every model of the run through the executor; one :class:`ModelOutcome` per spec, in order."""
    from bench.runner.run import ModelOutcome

    tasks = model_tasks(spec, run, manifest, specs, plans, data, seed, timeout_s)
    states: dict[str, dict[str, Any]] = {}

    def on_state(key: str, state: dict) -> None:
        states[key] = state
        if state.get("state") in ("running", "pending"):
            manifest.models_state[key] = {"state": state["state"], "executor": state.get("executor", {}),
                                          "device": plans[next(s for s in specs if model_label(s) == key)].device}
        else:
            manifest.models_state[key] = {"state": state["state"], "detail": str(state.get("detail", ""))[:2000],
                                          "device": state.get("device", ""), "executor": state.get("executor", {})}
        run.write_manifest(manifest)

    if spec.name == "slurm":
        from bench.executor.slurm import SlurmExecutor

        attach = _queued(manifest, [t.key for t in tasks])
        tasks = [t for t in tasks if t.key not in attach]
        SlurmExecutor(spec.slurm, name=f"cellbench-run-{run.path.name}", echo=echo).run(
            run.path, run.slurm_dir, run.manifest_path, tasks, on_state, attach=attach,
            folders={k: run.job(k) for k in attach})
    else:
        from bench.executor.local import LocalExecutor

        LocalExecutor(spec.jobs, spec.gpus, echo).run(tasks, on_state)
    out = []
    for s in specs:
        label = model_label(s)
        md = run.model(label)
        if label not in states and md.has_metrics():  # finished earlier
            echo(f"[{label}] finished earlier: skipped")
            m = md.read_metrics()
            out.append(ModelOutcome(label, "done", "", m, m.get("device") or plans[s].device))
            continue
        st = states.get(label, {"state": "failed", "detail": "the job ended without a state"})
        m = md.read_metrics() if st["state"] == "done" else {}
        out.append(ModelOutcome(label, st["state"], str(st.get("detail", "")), m or {},
                                st.get("device") or plans[s].device))
    return out


def _queued(manifest: Manifest, labels: list[str]) -> dict[str, dict]:
    """Models whose SLURM job of an earlier ``bench run`` (its state in the manifest) is still queued:
    watched again, never submitted twice."""
    from bench.executor.slurm import ExecutorError, queue, require_sbatch

    require_sbatch()
    q = queue()
    if q is None:
        raise ExecutorError("squeue does not answer: cannot tell which models' jobs are still queued, so nothing "
                            "was submitted; try again when the controller answers")
    out = {}
    for label in labels:
        ex = manifest.models_state.get(label, {}).get("executor", {})
        if ex.get("slurm_job_id") in q:
            out[label] = ex
    return out
