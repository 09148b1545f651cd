"""``--executor slurm``: a sweep's jobs as one SLURM job array, submitted through submitit.

submitit writes the sbatch script (``SWEEP/slurm/``), pickles the call and runs it on the node;
this module adds what a benchmark needs around it: a clear error before anything is submitted
when there is no ``sbatch`` or sbatch rejects an option (its own message), a probe job that checks
the sweep folder is visible from the nodes, the job ids and log files in the sweep's state as
soon as they are known, and a watch on ``squeue`` (accounting may be off, so not ``sacct``) until
every job has left the queue: a job that ends without a state of its own (cancelled, timed out
too often, killed for memory) is reported as such, with the tail of its log.

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
from bench.store import SweepDir

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

    def _submitit(self, folder: Path, probe: bool = False):
        import submitit

        o = self.opts
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=o.max_requeue)
        threads = 1 if probe else o.cpus
        params: dict[str, Any] = dict(
            job_name=f"{self.name}-probe" if probe else self.name, time=5 if probe else o.time_min,
            cpus_per_task=threads, signal_delay_s=o.signal_delay_s, array_parallelism=o.max_parallel or 256,
            setup=[f"export OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} OPENBLAS_NUM_THREADS={threads}"],
            additional_parameters=dict(o.additional))
        for key, value in (("partition", o.partition), ("account", o.account), ("qos", o.qos)):
            if value:
                params[key] = value
        if o.gpus and not probe:
            params["gpus_per_node"] = o.gpus
        if o.mem_gb and not probe:
            params["mem"] = f"{int(o.mem_gb * 1024)}M"
        ex.update_parameters(**params)
        return ex

    def _submit(self, what: str, fn: Callable[[], Any]):
        """submitit's submission, sbatch's own error message kept when it refuses."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - submitit raises FailedJobError(stderr) or its causes
            msg = str(e).strip() or type(e).__name__
            raise ExecutorError(f"sbatch refused the {what}: {msg} (options: {self._describe()})") from None

    def _describe(self) -> str:
        o = self.opts.model_dump(exclude_defaults=True)
        return ", ".join(f"{k}={v}" for k, v in o.items()) or "defaults"

    def probe(self, sweep: SweepDir) -> None:
        """One short job on the cluster must see the sweep folder, or nothing else is submitted."""
        from bench.executor.job import probe

        ex = self._submitit(sweep.slurm_dir / "probe", probe=True)
        job = self._submit("probe job", lambda: ex.submit(probe, str(sweep.path.resolve())))
        self.echo(f"probe job {job.job_id}: can the nodes see {sweep.path}?")
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
                                f"sweep folder {sweep.path} is probably not on a file system the compute nodes "
                                f"see; put --out on a shared file system ({str(e).strip()[-300:]})") from None
        if not res.get("visible"):
            raise ExecutorError(f"{res.get('host')} cannot see {sweep.path}: put the sweep (--out) on a file "
                                "system the compute nodes share with this one")

    def submit(self, sweep: SweepDir, keys: list[tuple[str, int]]) -> dict[tuple[str, int], dict]:
        """One array of ``keys``; returns each key's job id and log files."""
        from bench.executor.job import SweepJob

        ex = self._submitit(sweep.slurm_dir)
        args = [str(sweep.path.resolve())] * len(keys), [v for v, _ in keys], [s for _, s in keys]
        jobs = self._submit(f"job array of {len(keys)}", lambda: ex.map_array(SweepJob(), *args))
        return {k: {"executor": "slurm", "slurm_job_id": j.job_id, "stdout": str(j.paths.stdout),
                    "stderr": str(j.paths.stderr)} for k, j in zip(keys, jobs)}

    def run(self, sweep: SweepDir, keys: list[tuple[str, int]], on_state: Callable[[str, int, dict], None],
            attach: dict[tuple[str, int], dict] | None = None) -> None:
        """Submit ``keys`` (after the probe) and watch them and the ``attach``-ed jobs still queued
        from an earlier submission until every one has ended."""
        require_sbatch()
        watch = dict(attach or {})
        if keys:
            if self.opts.probe:
                self.probe(sweep)
            submitted = self.submit(sweep, keys)
            first = next(iter(submitted.values()))["slurm_job_id"].split("_")[0]
            self.echo(f"submitted {len(keys)} job(s) as SLURM array {first} ({self._describe()}); logs in "
                      f"{sweep.slurm_dir}")
            for (v, s), info in submitted.items():
                on_state(v, s, {"state": "pending", "executor": info})
            watch.update(submitted)
        for (v, s), info in (attach or {}).items():
            self.echo(f"[{v} seed {s}] still queued as SLURM job {info['slurm_job_id']}: watching it")
        try:
            self._watch(sweep, watch, on_state)
        except KeyboardInterrupt:
            from bench.runner.run import RunInterrupted

            self.echo(f"stopped watching; the jobs keep running on the cluster: `bench status {sweep.path}` "
                      "shows them, `bench sweep ... --resume` watches them again (scancel stops them)")
            raise RunInterrupted(signal.SIGINT, "the watch of the SLURM jobs") from None

    def _watch(self, sweep: SweepDir, watch: dict[tuple[str, int], dict],
               on_state: Callable[[str, int, dict], None]) -> None:
        seen: dict[tuple[str, int], str] = {}
        gone: dict[tuple[str, int], int] = {}
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
                jid = info["slurm_job_id"]
                if jid in q:
                    gone[key] = 0
                    state = q[jid][0].lower()
                    state = "running" if state in ("running", "completing") else "pending"
                    if seen.get(key) != state:
                        if state == "running":
                            self.echo(f"[{key[0]} seed {key[1]}] running as SLURM job {jid}")
                        elif seen.get(key) == "running":  # back in the queue: submitit requeued it
                            self.echo(f"[{key[0]} seed {key[1]}] requeued as SLURM job {jid} ({q[jid][1]}): "
                                      "it continues its unfinished stages when it runs again")
                        seen[key] = state
                        on_state(*key, {"state": state, "executor": info})
                    continue
                gone[key] = gone.get(key, 0) + 1
                if gone[key] < GONE_POLLS:
                    continue
                del watch[key]
                on_state(*key, self._ended(sweep, key, info))

    def _ended(self, sweep: SweepDir, key: tuple[str, int], info: dict) -> dict:
        """The job's own state, or what SLURM says ended it, with the tail of its log."""
        from bench.executor.status import read_json, tail

        v, s = key
        jid = info["slurm_job_id"]
        state = read_json(sweep.job(v, s).state)
        end = ended_as(jid)
        if state is None:
            slurm_state = end.get("JobState", "UNKNOWN")
            why = WHY.get(slurm_state, f"ended {slurm_state}")
            log = tail(Path(info.get("stdout", "")), 4) + "\n" + tail(Path(info.get("stderr", "")), 4)
            said = re.search(r"Job not requeued because: (.*)", tail(Path(info.get("stdout", "")), 50))
            if said:  # submitit's signal handler gave up: the time limit, not a crash
                why = f"reached its time limit and was not requeued ({said.group(1).strip().rstrip('.')})"
            state = {"variant": v, "seed": s, "state": "failed",
                     "detail": f"SLURM job {jid} {why} before it recorded a state"
                               + (f" (reason {end['Reason']})" if end.get("Reason", "None") != "None" else "")
                               + (f"; log:\n{log.strip()}" if log.strip() else "")}
        state["executor"] = {**info, **state.get("executor", {}), "slurm_state": end.get("JobState")}
        self.echo(f"[{v} seed {s}] {state['state']} (SLURM job {jid}, {end.get('JobState', '?')})"
                  + (f": {str(state.get('detail', ''))[:200]}" if state["state"] != "done" else ""))
        return state
