"""``bench status SWEEP_OR_RUN``: every job (a sweep's variant x seed, each of its pretrain stages, a run's
model) and its state.

States: ``pending`` (not started, or queued on SLURM), ``running`` (a live process holds its run
folder, or SLURM runs it: with the job id), ``done``, ``failed`` (with why and the last lines of its
log), ``interrupted`` / ``stopped`` (nobody runs it any more and it is unfinished: ``--resume``
continues it). Read only from the folders and, for SLURM jobs, ``squeue``: it never changes anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from bench.store import ModelDir, RunDir, RunLock, SweepDir, _host, _pid_alive

TAIL_LINES = 8


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def tail(path: Path, n: int = TAIL_LINES) -> str:
    """The last ``n`` non-empty lines of a log ('' when there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            lines = [x for x in f.read().decode(errors="replace").splitlines() if x.strip()]
    except (OSError, IsADirectoryError):
        return ""
    return "\n".join(lines[-n:])


def tail_of(text: str, n: int) -> str:
    return "\n".join(text.splitlines()[-n:])


def lock_live(lock: RunLock) -> bool:
    """Whether some process holds the lock now (its holder is written in the file while held)."""
    h = lock.holder()
    if not h.get("pid"):
        return False
    return not (h.get("host") == _host() and not _pid_alive(h["pid"]))


def run_done(run: RunDir) -> bool:
    """Every model of the run has its metrics: nothing of it is left to do."""
    if not run.exists():
        return False
    return all(run.model_for(spec).has_metrics() for spec in run.read_manifest().models)


@dataclass
class Row:
    key: str
    state: str
    job_id: str = ""
    detail: str = ""
    log: str = ""


def model_row(md: ModelDir, live: bool) -> Row:
    if md.has_metrics():
        m = md.read_metrics() or {}
        return Row(md.label, "done", detail=f"Kaggle mAP {m.get('kaggle_map', float('nan')):.4f}")
    st = md.read_status()
    if st is None:
        return Row(md.label, "pending")
    if st.state == "running":
        return Row(md.label, "running", detail=f"stage {st.stage}") if live else \
            Row(md.label, "stopped", detail=f"was in stage {st.stage}; nobody runs it now: --resume continues it",
                log=tail(md.log))
    return Row(md.label, st.state, detail=f"stage {st.stage}: {st.error or st.hint or ''}", log=tail(md.log))


def run_rows(run: RunDir) -> list[Row]:
    live = lock_live(run.lock())
    manifest = run.read_manifest()
    return [model_row(run.model_for(spec), live) for spec in manifest.models]


def sweep_rows(sweep: SweepDir) -> list[Row]:
    """One row per job of the sweep: each pretrain stage of a variant x seed (``v/seed<k>/pretrain<j>``),
    then its fine-tune (``v/seed<k>``), from their run folders, the sweep's state and (SLURM) the queue."""
    from bench.executor.slurm import queue

    manifest = sweep.read_manifest() or {}
    runs, stage_jobs = manifest.get("runs", {}), manifest.get("stage_jobs", {})
    q = None
    if any(r.get("executor", {}).get("executor") == "slurm" for r in [*runs.values(), *stage_jobs.values()]):
        q = queue()
    rows = []
    n_stages = {v: len(d.get("pretrain", [])) for v, d in manifest.get("config", {}).get("variants", {}).items()}
    for v in manifest.get("variants_run", []):
        for s in manifest.get("seeds", []):
            stage_rows = [_job_row(f"{v}/seed{s}/pretrain{j}", sweep.pretrain_run(v, s, j), sweep.stage_job(v, s, j),
                                   stage_jobs.get(f"{v}/seed{s}/pretrain{j}", {}), q) for j in range(n_stages.get(v, 0))]
            waits = next((f"waits for pretrain stage {j}" for j, r in enumerate(stage_rows) if r.state != "done"), "")
            rows += stage_rows
            rows.append(_job_row(f"{v}/seed{s}", sweep.run(v, s), sweep.job(v, s), runs.get(f"{v}/seed{s}", {}), q,
                                 waits))
    return rows


def _job_row(key: str, run: RunDir, job, info: dict, q: dict | None, waits: str = "") -> Row:
    """A job's row: ``run`` its run folder, ``job`` its job folder (its log), ``info`` its entry in the
    sweep's state; ``waits``: what it waits for (an unfinished pretrain stage), shown while pending."""
    ex = info.get("executor", {}) or {}
    jid = ex.get("slurm_job_id", "")
    if run_done(run):
        rows = run_rows(run)
        return Row(key, "done", jid, "; ".join(f"{r.key} {r.detail}" for r in rows))
    if jid and q is not None and jid in q:
        state, reason = q[jid]
        return Row(key, "running" if state in ("RUNNING", "COMPLETING") else "pending", jid,
                   f"SLURM {state}" + (f" ({reason})" if reason not in ("None", "") else ""))
    if run.exists() and lock_live(run.lock()):
        stage = next((r.detail for r in run_rows(run) if r.state == "running"), "")
        return Row(key, "running", jid, stage)
    state = info.get("state")
    gone = bool(jid) and q is not None  # its SLURM job has left the queue (checked above)
    if state in (None, "pending", "running") and not gone and not run.exists():
        why = "not started" if state is None else f"{state} when last seen"
        return Row(key, "pending", jid, f"{why}, {waits}" if waits else why)
    # unfinished and nobody runs it: why, from the sweep's state, else from its run
    detail = str(info.get("detail", "") or "")
    log, bad = "", []
    if run.exists():
        bad = [r for r in run_rows(run) if r.state != "done"]
        if bad:
            detail = detail or f"{bad[0].key}: {bad[0].state}, {bad[0].detail}"
            log = bad[0].log
    if ex.get("stdout"):  # SLURM: what the job itself said comes after the model's log
        log = "\n".join(t for t in (tail_of(log, 4), tail(Path(ex["stdout"]), 4), tail(Path(ex["stderr"]), 3)) if t)
    elif len(log.splitlines()) < 3:  # the model's log says little (killed early): the job's own log
        log = tail(job.log)
    if state in (None, "pending", "running"):  # no job said how it ended (--jobs 1): its run's model may
        state = bad[0].state if bad and bad[0].state == "failed" else "stopped"
    if ex.get("slurm_state") and ex["slurm_state"] not in ("COMPLETED", "None"):
        detail = f"SLURM {ex['slurm_state']}: {detail}"
    return Row(key, state, jid, detail.splitlines()[0] if detail else "", log)


def format_rows(rows: list[Row], what: str) -> str:
    width = max([len(r.key) for r in rows] + [len(what)])
    out = [f"{what:<{width}}  {'state':<11}  {'SLURM id':<10}  detail"]
    for r in rows:
        out.append(f"{r.key:<{width}}  {r.state:<11}  {r.job_id or '-':<10}  {r.detail[:160]}")
        if r.state not in ("done", "pending", "running") and r.log:
            out.extend(f"    | {line[:200]}" for line in r.log.splitlines())
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    out.append(", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return "\n".join(out)


def status_text(path: Path) -> str:
    """The table of ``bench status PATH`` (a sweep folder or a run folder)."""
    from bench.data.errors import DataError

    path = Path(path)
    if SweepDir(path).exists():
        rows = sweep_rows(SweepDir(path))
        return f"sweep {path}\n" + format_rows(rows, "run")
    if RunDir(path).exists():
        return f"run {path}\n" + format_rows(run_rows(RunDir(path)), "model")
    raise DataError(path, "neither a sweep folder (no sweep.json) nor a run folder (no manifest.json)")
