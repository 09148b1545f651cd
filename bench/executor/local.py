"""``--executor local``: N jobs at once on this machine, each its own process, cores and GPU(s).

Each job gets a disjoint set of cores (its affinity) and as many threads (``OMP_NUM_THREADS`` and
friends), so two jobs never fight over one core; with ``--gpus`` each job gets the GPUs it asks
for (``CUDA_VISIBLE_DEVICES``: the job sees them as ``cuda``; a job that needs none sees none).
What a job takes comes from its resources (:mod:`bench.executor.resources`): ``cpus`` cores (by
default an equal share, the cores divided by ``--jobs``), ``gpus`` GPUs, ``mem_gb`` of the
machine's memory; a job starts when at most ``--jobs`` run and what it asks is free, and when the
jobs it waits for (``after``: its pretrain stage) are done; if one of them failed it is not run
and is reported failed with the reason. A job is ``python -m bench.executor.job`` in its own
session: Ctrl-C / SIGTERM reaches every job's group (each forwards it to its worker, which
records itself interrupted) and a group still alive ``KILL_GRACE_S`` later is killed, as
``bench run`` does with one worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

from bench.adapters.registry import ConfigError
from bench.executor.task import Task, not_run, order
from bench.util import atomic_write_json

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


@dataclass
class Slot:
    """Where one job runs: its cores, its GPUs (None: the executor hands out no GPUs)."""

    index: int
    cores: list[int]
    gpus: list[str] | None = None

    def threads(self, environ: dict[str, str]) -> int:
        """One thread per core of the slot; never more than ``OMP_NUM_THREADS`` asks for."""
        n = len(set(self.cores))
        asked = environ.get("OMP_NUM_THREADS", "")
        return max(1, min(n, int(asked))) if asked.isdigit() and int(asked) > 0 else n

    def env(self, environ: dict[str, str]) -> dict[str, str]:
        env = dict(environ, PYTHONUNBUFFERED="1", CELLBENCH_JOB_SLOT=str(self.index))
        env.pop("CELLBENCH_PROGRESS_FD", None)
        n = str(self.threads(environ))
        env.update({k: n for k in THREAD_VARS})
        if self.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        return env

    def describe(self) -> str:
        cores = ",".join(map(str, sorted(set(self.cores))))
        return f"slot {self.index}: cores {cores}" + (f", GPU {','.join(self.gpus)}" if self.gpus else "")


def machine_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def machine_mem_gb() -> float | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return None


class Pool:
    """The cores, GPUs and memory the running jobs have taken. With more ``--jobs`` than cores the
    cores are listed round-robin until there is one per job (jobs then share cores, one thread each)."""

    def __init__(self, jobs: int, gpus: list[str], cores: list[int] | None = None, mem_gb: float | None = None):
        real = list(cores if cores is not None else machine_cores())
        self.cores = [real[i % len(real)] for i in range(max(len(real), jobs))]
        self.share = max(1, len(self.cores) // jobs)   # a job's cores when its resources do not say
        self.gpus = list(gpus)
        self.hand_out_gpus = bool(gpus)
        self.mem_gb = mem_gb
        self.free_cores = list(range(len(self.cores)))
        self.free_gpus = list(self.gpus)
        self.mem_used = 0.0
        self.next_index = 0

    def wants(self, task: Task) -> tuple[int, int, float]:
        """What ``task`` takes: cores (capped at the machine's), GPUs, memory."""
        cpus = min(task.resources.cpus or self.share, len(self.cores))
        return cpus, task.gpus if self.hand_out_gpus else 0, task.resources.mem_gb or 0.0

    def check(self, task: Task) -> None:
        """Refused before anything starts: what no free machine could ever give."""
        _, gpus, mem = self.wants(task)
        if gpus > len(self.gpus):
            raise ConfigError(f"{task.what} asks for {gpus} GPU(s) ({task.resources.describe()}) but --gpus gives "
                              f"{len(self.gpus)}")
        if self.mem_gb is not None and mem > self.mem_gb:
            raise ConfigError(f"{task.what} asks for mem_gb={mem:g} but this machine has {self.mem_gb:.1f} GB")

    def short_of(self, task: Task) -> str | None:
        """What ``task`` lacks to start now: ``"slot"`` (cores or GPUs), ``"memory"``, or None."""
        cpus, gpus, mem = self.wants(task)
        if len(self.free_cores) < cpus or len(self.free_gpus) < gpus:
            return "slot"
        if self.mem_gb is not None and mem and self.mem_used + mem > self.mem_gb:
            return "memory"
        return None

    def take(self, task: Task) -> Slot | None:
        if self.short_of(task):
            return None
        cpus, gpus, mem = self.wants(task)
        idx, self.free_cores = self.free_cores[:cpus], self.free_cores[cpus:]
        taken, self.free_gpus = self.free_gpus[:gpus], self.free_gpus[gpus:]
        self.mem_used += mem
        slot = Slot(self.next_index, [self.cores[i] for i in idx], taken if self.hand_out_gpus else None)
        slot._taken = (idx, mem)  # type: ignore[attr-defined]
        self.next_index += 1
        return slot

    def waits_for_memory(self, task: Task) -> str | None:
        """Why ``task`` cannot start now although cores and GPUs are free: the memory it asks is
        taken by running jobs (None: it is not memory). Said once, so a job that waits is not silent."""
        if self.short_of(task) == "memory":
            _, _, mem = self.wants(task)
            return (f"waits for memory: it asks mem_gb={mem:g} and the running jobs hold {self.mem_used:g} of "
                    f"this machine's {self.mem_gb:.1f} GB (resources: mem_gb, or --slurm mem_gb=..., changes it)")
        return None

    def give_back(self, slot: Slot) -> None:
        idx, mem = slot._taken  # type: ignore[attr-defined]
        self.free_cores = sorted(self.free_cores + idx)
        self.free_gpus = [g for g in self.gpus if g in self.free_gpus or g in (slot.gpus or [])]
        self.mem_used -= mem


# grace between forwarding SIGINT/SIGTERM to the jobs' groups and killing the groups
KILL_GRACE_S = 15.0


class LocalExecutor:
    """Runs tasks at most ``jobs`` at a time, each when its dependencies are done and what it asks
    is free; states go to ``on_state(key, state)`` as they come."""

    def __init__(self, jobs: int, gpus: list[str] | None = None, echo=print, cores: list[int] | None = None):
        self.jobs = jobs
        self.pool = Pool(jobs, list(gpus or []), cores, machine_mem_gb())
        self.echo = echo

    def run(self, tasks: list[Task], on_state: Callable[[str, dict], None]) -> None:
        from bench.runner.run import RunInterrupted, _killpg

        tasks = order(tasks)
        for t in tasks:
            self.pool.check(t)
        by_key = {t.key: t for t in tasks}
        pending = list(tasks)
        ended: dict[str, dict] = {}
        running: dict[int, tuple[Task, subprocess.Popen, float, Slot]] = {}
        interrupted: list[int] = []
        kill_at: float | None = None
        told: set[str] = set()   # tasks already said to wait for memory

        def forward(signum, _frame):
            nonlocal kill_at
            interrupted.append(signum)
            for _, proc, _, _ in running.values():
                _killpg(proc.pid, signum)
            kill_at = kill_at or time.monotonic() + KILL_GRACE_S

        in_main = threading.current_thread() is threading.main_thread()
        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
        try:
            while (pending and not interrupted) or running:
                for task in list(pending):
                    if interrupted:
                        break
                    deps = [a for a in task.after if a in by_key]
                    bad = next((a for a in deps if a in ended and ended[a].get("state") != "done"), None)
                    if bad is not None:  # its pretrain stage (or member) failed: never run
                        pending.remove(task)
                        ended[task.key] = state = not_run(task, by_key[bad], ended[bad])
                        self.echo(f"[{task.what}] {state['detail']}")
                        on_state(task.key, state)
                        continue
                    if any(a not in ended for a in deps) or len(running) >= self.jobs:
                        continue
                    slot = self.pool.take(task)
                    if slot is None:
                        reason = self.pool.waits_for_memory(task)
                        if reason and task.key not in told:
                            told.add(task.key)
                            self.echo(f"[{task.what}] {reason}")
                        continue
                    pending.remove(task)
                    proc = self._start(task, slot)
                    running[proc.pid] = (task, proc, time.perf_counter(), slot)
                    on_state(task.key, {"state": "running", "executor": {"executor": "local",
                                                                         "slot": slot.describe()}})
                for pid, (task, proc, t0, slot) in list(running.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    _killpg(proc.pid, signal.SIGKILL)  # anything the job left behind in its group
                    del running[pid]
                    self.pool.give_back(slot)
                    if interrupted:
                        ended[task.key] = {"state": "interrupted", "detail": "interrupted by "
                                           f"{signal.Signals(interrupted[0]).name}: --resume continues it"}
                    else:
                        ended[task.key] = self._finished(task, code, time.perf_counter() - t0)
                    on_state(task.key, ended[task.key])
                if kill_at is not None and time.monotonic() >= kill_at:
                    for _, proc, _, _ in running.values():
                        _killpg(proc.pid, signal.SIGKILL)
                time.sleep(0.2)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        if interrupted:
            raise RunInterrupted(interrupted[0], "the jobs")

    def _start(self, task: Task, slot: Slot) -> subprocess.Popen:
        jd = task.folder.mkdir()
        jd.state.unlink(missing_ok=True)  # a state file always belongs to the latest attempt
        log = open(jd.log, "ab")
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {task.key} {slot.describe()} =====\n".encode())
        log.flush()
        cores = sorted(set(slot.cores))
        self.echo(f"[{task.what}] started ({slot.describe()}, {slot.threads(dict(os.environ))} thread(s); "
                  f"log {jd.log})")
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "bench.executor.job", *task.argv],
                stdout=log, stderr=subprocess.STDOUT, env=slot.env(dict(os.environ)), start_new_session=True,
                preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if hasattr(os, "sched_setaffinity") else None)
        finally:
            log.close()

    def _finished(self, task: Task, code: int, took: float) -> dict:
        """The job's own state, or (it died before writing one) a failure naming how, with its log's tail."""
        from bench.executor.status import read_json, tail

        jd = task.folder
        state = read_json(jd.state)
        if state is None:
            how = f"killed by signal {-code}" + (" (out of memory?)" if -code == signal.SIGKILL else "") \
                if code < 0 else f"exit code {code}"
            state = {"key": task.key, "state": "failed",
                     "detail": f"job {how} before it recorded a state; log {jd.log}:\n{tail(jd.log)}"}
            atomic_write_json(jd.state, state)
        state.setdefault("executor", {})["seconds"] = round(took, 1)
        self.echo(f"[{task.what}] {state['state']} in {took:.0f} s"
                  + (f": {str(state.get('detail', ''))[:200]}" if state["state"] != "done" else ""))
        return state
