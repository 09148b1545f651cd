"""``--executor slurm``: a sweep's (or run's) jobs as SLURM job arrays, submitted through submitit.

submitit writes the sbatch script (``SWEEP/slurm/``), pickles the call and runs it on the node;
this module adds what a benchmark needs around it: a clear error before anything is submitted
when there is no ``sbatch`` or sbatch rejects an option (its own message), a probe job that checks
the sweep folder is visible from the nodes, the job ids and log files in the sweep's state as
soon as they are known, and a watch on ``squeue`` (accounting may be off, so not ``sacct``) until
every job has left the queue: a job that ends without a state of its own (cancelled, timed out
too often, killed for memory) is reported as such, with the tail of its log. Jobs that wait for
nothing go as one array per set of resources (the model's, bench.executor.resources); a job that
waits for another (a fine-tune for its pretrain stage) is submitted with
``--dependency=afterok:<job id>``, and cancelled (reported failed, naming why) when that one
ends unfinished, since SLURM would hold it forever.

Requeue: the call is checkpointable (:class:`bench.executor.job.SweepJob`), so on the USR2 that
SLURM sends ``signal_delay_s`` before the time limit (or on preemption) submitit requeues it, and
the requeued job continues its run folders (finished stages kept).
"""

from __future__ import annotations

import getpass
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from bench.executor.options import SlurmOptions
from bench.executor.resources import Resources, given
from bench.executor.task import Task, order
from bench.store import SweepJobDir

POLL_S = 1.0
GONE_POLLS = 2          # a job absent from squeue this many polls in a row has ended


class ExecutorError(RuntimeError):
    """The executor cannot run the jobs as asked (no sbatch, an option SLURM rejects, an invisible folder)."""


def require_sbatch() -> None:
    """Before anything is submitted: SLURM's commands are here."""
    missing = [c for c in ("sbatch", "squeue", "scontrol") if shutil.which(c) is None]
    if missing:
        raise ExecutorError(f"--executor slurm: {', '.join(missing)} not on PATH (run bench on a SLURM login "
                            "node, or start a one-node cluster here with scripts/slurm-up.sh); nothing was submitted")


def queue() -> dict[str, tuple[str, str]] | None:
    """This user's jobs in the queue, array elements expanded: id -> (state, reason); None when squeue fails."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T|%r"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    jobs = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            jobs[parts[0]] = (parts[1], parts[2])
    return jobs


def ended_as(job_id: str) -> dict[str, str]:
    """How SLURM says a job ended (JobState, Reason, ExitCode) while the controller still remembers it."""
    try:
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    rec = {}
    for tok in out.stdout.split():
        k, _, v = tok.partition("=")
        if k in ("JobState", "Reason", "ExitCode", "RunTime", "TimeLimit"):
            rec[k] = v
    return rec


# SLURM's end states that say more than "failed"
WHY = {"TIMEOUT": "ran past its time limit", "OUT_OF_MEMORY": "killed for using more memory than asked (OOM)",
       "CANCELLED": "cancelled (scancel)", "PREEMPTED": "preempted", "NODE_FAIL": "its node failed",
       "BOOT_FAIL": "its node failed to boot", "DEADLINE": "ran past its deadline"}


class SlurmExecutor:
    """Submits a sweep's jobs as one array and watches them until each has left the queue."""

    def __init__(self, opts: SlurmOptions, name: str = "cellbench", echo=print):
        self.opts = opts
        self.name = name
        self.echo = echo

    def _submitit(self, folder: Path, probe: bool = False, res: Resources | None = None, gpus: int | None = None,
                  after: list[str] = ()):
        """submitit's executor for jobs of resources ``res`` (the model's, under the sweep file's and
        ``--slurm``'s, bench.executor.resources) with ``gpus`` GPUs (none on a CPU run), waiting for
        the SLURM jobs ``after`` (afterok)."""
        import submitit

        o = self.opts
        res = res or given(o)
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=o.max_requeue)
        threads = 1 if probe else (res.cpus or o.cpus)
        extra = dict(o.additional)
        if after:
            extra["dependency"] = "afterok:" + ":".join(after)
        params: dict[str, Any] = dict(
            job_name=f"{self.name}-probe" if probe else self.name, time=5 if probe else (res.time_min or o.time_min),
            cpus_per_task=threads, signal_delay_s=o.signal_delay_s, array_parallelism=o.max_parallel or 256,
            setup=[f"export OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} OPENBLAS_NUM_THREADS={threads}"],
            additional_parameters=extra)
        for key, value in (("partition", o.partition), ("account", o.account), ("qos", o.qos)):
            if value:
                params[key] = value
        gpus = o.gpus if gpus is None else gpus
        if gpus and not probe:
            params["gpus_per_node"] = gpus
        mem = res.mem_gb or o.mem_gb
        if mem and not probe:
            params["mem"] = f"{int(mem * 1024)}M"
        ex.update_parameters(**params)
        return ex

    def _submit(self, what: str, fn: Callable[[], Any]):
        """submitit's submission, sbatch's own error message kept when it refuses."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - submitit raises FailedJobError(stderr) or its causes
            msg = str(e).strip() or type(e).__name__
            raise ExecutorError(f"sbatch refused the {what}: {msg} (options: {self._describe()})") from None

    def _describe(self, res: Resources | None = None) -> str:
        o = self.opts.model_dump(exclude_defaults=True)
        o.update((res or Resources()).model_dump(exclude_none=True))
        return ", ".join(f"{k}={v}" for k, v in o.items()) or "defaults"

    def probe(self, slurm_dir: Path, marker: Path) -> None:
        """One short job on the cluster must see the sweep's (or run's) manifest, or nothing else is submitted."""
        from bench.executor.job import probe

        folder = marker.parent
        ex = self._submitit(slurm_dir / "probe", probe=True)
        job = self._submit("probe job", lambda: ex.submit(probe, str(marker.resolve())))
        self.echo(f"probe job {job.job_id}: can the nodes see {folder}?")
        gone = 0
        while not job.paths.result_pickle.exists() and gone < GONE_POLLS:
            time.sleep(POLL_S / 2)
            q = queue()
            gone = gone + 1 if q is not None and job.job_id not in q else 0
        try:
            res = job.result()
        except Exception as e:  # noqa: BLE001
            end = ended_as(job.job_id)
            raise ExecutorError(f"the probe job {job.job_id} failed ({end.get('JobState', 'no result')}): the "
                                f"folder {folder} is probably not on a file system the compute nodes "
                                f"see; put --out on a shared file system ({str(e).strip()[-300:]})") from None
        if not res.get("visible"):
            raise ExecutorError(f"{res.get('host')} cannot see {folder}: put the sweep or run (--out) on a file "
                                "system the compute nodes share with this one")

    def submit(self, slurm_dir: Path, tasks: list[Task], known: dict[str, str]) -> dict[str, dict]:
        """The tasks as few submissions as their resources allow: those that wait for nothing as one
        array per kind of job and resources, each other one on its own with ``--dependency=afterok``
        on the SLURM jobs it waits for (``known``: key -> job id, of this submission or queued
        earlier). Returns each task's job id and log files."""
        out: dict[str, dict] = {}
        ids = dict(known)

        def record(t: Task, j) -> None:
            ids[t.key] = j.job_id
            out[t.key] = {"executor": "slurm", "slurm_job_id": j.job_id, "stdout": str(j.paths.stdout),
                          "stderr": str(j.paths.stderr)}

        free = [t for t in tasks if not any(a in ids or a in {x.key for x in tasks} for a in t.after)]
        groups: dict[tuple, list[Task]] = {}
        for t in free:
            groups.setdefault((type(t.call).__name__, t.resources.key(), t.gpus), []).append(t)
        for group in groups.values():
            ex = self._submitit(slurm_dir, res=group[0].resources, gpus=group[0].gpus)
            cols = list(zip(*(t.args for t in group)))
            jobs = self._submit(f"job array of {len(group)} ({group[0].resources.describe()})",
                                lambda: ex.map_array(group[0].call, *cols))
            for t, j in zip(group, jobs):
                record(t, j)
        for t in tasks:  # dependencies come first (bench.executor.task.order)
            if t.key in out:
                continue
            after = [ids[a] for a in t.after if a in ids]
            ex = self._submitit(slurm_dir, res=t.resources, gpus=t.gpus, after=after)
            record(t, self._submit(f"job {t.what} (after {', '.join(after)})", lambda: ex.submit(t.call, *t.args)))
        return out

    def run(self, path: Path, slurm_dir: Path, marker: Path, tasks: list[Task],
            on_state: Callable[[str, dict], None], attach: dict[str, dict] | None = None,
            folders: dict[str, SweepJobDir] | None = None) -> None:
        """Submit ``tasks`` (after the probe) and watch them and the ``attach``-ed jobs still queued
        from an earlier submission (key -> executor info; ``folders``: their job folders) until every
        one has ended. A task whose dependency ended unfinished is cancelled and reported failed."""
        require_sbatch()
        tasks = order(tasks)
        watch = dict(attach or {})
        dirs = {**(folders or {}), **{t.key: t.folder for t in tasks}}
        deps = {t.key: t.after for t in tasks}
        names = {t.key: t.what for t in tasks}
        if tasks:
            if self.opts.probe:
                self.probe(slurm_dir, marker)
            submitted = self.submit(slurm_dir, tasks, {k: i["slurm_job_id"] for k, i in watch.items()})
            first = next(iter(submitted.values()))["slurm_job_id"].split("_")[0]
            self.echo(f"submitted {len(tasks)} job(s) (first: SLURM job {first}; {self._describe()}); logs in "
                      f"{slurm_dir}")
            for key, info in submitted.items():
                on_state(key, {"state": "pending", "executor": info})
            watch.update(submitted)
        for key, info in (attach or {}).items():
            self.echo(f"[{key}] still queued as SLURM job {info['slurm_job_id']}: watching it")
        try:
            self._watch(watch, dirs, deps, names, on_state)
        except KeyboardInterrupt:
            from bench.runner.run import RunInterrupted

            self.echo(f"stopped watching; the jobs keep running on the cluster: `bench status {path}` "
                      "shows them, `--resume` watches them again (scancel stops them)")
            raise RunInterrupted(signal.SIGINT, "the watch of the SLURM jobs") from None

    def _watch(self, watch: dict[str, dict], dirs: dict[str, SweepJobDir], deps: dict[str, tuple[str, ...]],
               names: dict[str, str], on_state: Callable[[str, dict], None]) -> None:
        seen: dict[str, str] = {}
        gone: dict[str, int] = {}
        warned = False
        while watch:
            time.sleep(POLL_S)
            q = queue()
            if q is None:
                if not warned:
                    self.echo("squeue does not answer: waiting (the jobs are unaffected)")
                    warned = True
                continue
            for key, info in list(watch.items()):
                if key not in watch:  # cancelled below with a dependency of it
                    continue
                jid = info["slurm_job_id"]
                if jid in q:
                    gone[key] = 0
                    state = q[jid][0].lower()
                    state = "running" if state in ("running", "completing") else "pending"
                    if seen.get(key) != state:
                        if state == "running":
                            self.echo(f"[{key}] running as SLURM job {jid}")
                        elif seen.get(key) == "running":  # back in the queue: submitit requeued it
                            self.echo(f"[{key}] requeued as SLURM job {jid} ({q[jid][1]}): "
                                      "it continues its unfinished stages when it runs again")
                        seen[key] = state
                        on_state(key, {"state": state, "executor": info})
                    continue
                gone[key] = gone.get(key, 0) + 1
                if gone[key] < GONE_POLLS:
                    continue
                del watch[key]
                state = self._ended(key, dirs[key], info)
                on_state(key, state)
                if state.get("state") != "done":
                    self._cancel_dependents(key, state, watch, dirs, deps, names, on_state)

    def _cancel_dependents(self, key: str, state: dict, watch: dict[str, dict], dirs: dict[str, SweepJobDir],
                           deps: dict[str, tuple[str, ...]], names: dict[str, str],
                           on_state: Callable[[str, dict], None]) -> None:
        """Jobs waiting (afterok) for one that ended unfinished would wait forever: cancelled, each
        reported failed naming the job it waited for (and so on down the chain)."""
        from bench.executor.task import Task, not_run

        for dep_key in [k for k, after in deps.items() if key in after and k in watch]:
            info = watch.pop(dep_key)
            subprocess.run(["scancel", info["slurm_job_id"]], capture_output=True, timeout=30)
            t = Task(dep_key, dirs[dep_key], [], None, (), what=names.get(dep_key, dep_key))
            st = not_run(t, names.get(key, key), state)
            self.echo(f"[{dep_key}] {st['detail']} (SLURM job {info['slurm_job_id']} cancelled)")
            on_state(dep_key, {**st, "executor": info})
            self._cancel_dependents(dep_key, st, watch, dirs, deps, names, on_state)

    def _ended(self, key: str, folder: SweepJobDir, info: dict) -> dict:
        """The job's own state, or what SLURM says ended it, with the tail of its log."""
        from bench.executor.status import read_json, tail

        jid = info["slurm_job_id"]
        state = read_json(folder.state)
        end = ended_as(jid)
        if state is None:
            slurm_state = end.get("JobState", "UNKNOWN")
            why = WHY.get(slurm_state, f"ended {slurm_state}")
            log = tail(Path(info.get("stdout", "")), 4) + "\n" + tail(Path(info.get("stderr", "")), 4)
            said = re.search(r"Job not requeued because: (.*)", tail(Path(info.get("stdout", "")), 50))
            if said:  # submitit's signal handler gave up: the time limit, not a crash
                why = f"reached its time limit and was not requeued ({said.group(1).strip().rstrip('.')})"
            state = {"key": key, "state": "failed",
                     "detail": f"SLURM job {jid} {why} before it recorded a state"
                               + (f" (reason {end['Reason']})" if end.get("Reason", "None") != "None" else "")
                               + (f"; log:\n{log.strip()}" if log.strip() else "")}
        state["executor"] = {**info, **state.get("executor", {}), "slurm_state": end.get("JobState")}
        self.echo(f"[{key}] {state['state']} (SLURM job {jid}, {end.get('JobState', '?')})"
                  + (f": {str(state.get('detail', ''))[:200]}" if state["state"] != "done" else ""))
        return state
