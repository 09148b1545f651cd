"""``--executor local``: N jobs at once on this machine, each its own process, cores and GPU.

Each slot gets a disjoint set of cores (its affinity) and as many threads (``OMP_NUM_THREADS``
and friends), so two jobs never fight over one core; with ``--gpus`` each slot gets one GPU
(``CUDA_VISIBLE_DEVICES``: the job sees it as ``cuda``). A job is ``python -m
bench.executor.job`` in its own session: Ctrl-C / SIGTERM reaches every job's group (each
forwards it to its worker, which records itself interrupted) and a group still alive
``KILL_GRACE_S`` later is killed, as ``bench run`` does with one worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from bench.store import SweepDir
from bench.util import atomic_write_json

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


@dataclass
class Slot:
    """One place a job runs: its cores, its thread count, its GPU (None: CPU only)."""

    index: int
    cores: list[int]
    gpu: str | None = None

    def threads(self, environ: dict[str, str]) -> int:
        """One thread per core of the slot; never more than ``OMP_NUM_THREADS`` asks for."""
        asked = environ.get("OMP_NUM_THREADS", "")
        return max(1, min(len(self.cores), int(asked))) if asked.isdigit() and int(asked) > 0 else len(self.cores)

    def env(self, environ: dict[str, str]) -> dict[str, str]:
        env = dict(environ, PYTHONUNBUFFERED="1", CELLBENCH_JOB_SLOT=str(self.index))
        env.pop("CELLBENCH_PROGRESS_FD", None)
        n = str(self.threads(environ))
        env.update({k: n for k in THREAD_VARS})
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu
        return env

    def describe(self) -> str:
        cores = ",".join(map(str, self.cores))
        return f"slot {self.index}: cores {cores}" + (f", GPU {self.gpu}" if self.gpu is not None else "")


def make_slots(jobs: int, gpus: list[str], cores: list[int] | None = None) -> list[Slot]:
    """``jobs`` slots dividing the cores evenly (left-over cores go to the first slots); with more
    jobs than cores, slots share cores round-robin, one thread each."""
    if cores is None:
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    slots = []
    if jobs <= len(cores):
        size, extra = divmod(len(cores), jobs)
        start = 0
        for i in range(jobs):
            n = size + (1 if i < extra else 0)
            slots.append(Slot(i, cores[start:start + n]))
            start += n
    else:
        slots = [Slot(i, [cores[i % len(cores)]]) for i in range(jobs)]
    for s in slots:
        s.gpu = gpus[s.index] if gpus else None
    return slots


# grace between forwarding SIGINT/SIGTERM to the jobs' groups and killing the groups
KILL_GRACE_S = 15.0


class LocalExecutor:
    """Runs the jobs of a sweep ``jobs`` at a time; states go to ``on_state`` as they come."""

    def __init__(self, jobs: int, gpus: list[str] | None = None, echo=print):
        self.slots = make_slots(jobs, list(gpus or []))
        self.echo = echo

    def run(self, sweep: SweepDir, keys: list[tuple[str, int]], on_state: Callable[[str, int, dict], None]) -> None:
        from bench.runner.run import RunInterrupted, _killpg

        pending = deque(keys)
        free = list(self.slots)
        running: dict[int, tuple[str, int, subprocess.Popen, float, Slot]] = {}
        interrupted: list[int] = []
        kill_at: float | None = None

        def forward(signum, _frame):
            nonlocal kill_at
            interrupted.append(signum)
            for _, _, proc, _, _ in running.values():
                _killpg(proc.pid, signum)
            kill_at = kill_at or time.monotonic() + KILL_GRACE_S

        in_main = threading.current_thread() is threading.main_thread()
        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
        try:
            while pending or running:
                while pending and free and not interrupted:
                    variant, seed = pending.popleft()
                    slot = free.pop(0)
                    proc = self._start(sweep, variant, seed, slot)
                    running[proc.pid] = (variant, seed, proc, time.perf_counter(), slot)
                    on_state(variant, seed, {"state": "running", "executor": {"executor": "local",
                                                                              "slot": slot.describe()}})
                for pid, (variant, seed, proc, t0, slot) in list(running.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    _killpg(proc.pid, signal.SIGKILL)  # anything the job left behind in its group
                    del running[pid]
                    free.append(slot)
                    free.sort(key=lambda s: s.index)
                    if interrupted:
                        on_state(variant, seed, {"state": "interrupted", "detail": "interrupted by "
                                                 f"{signal.Signals(interrupted[0]).name}: --resume continues it"})
                    else:
                        on_state(variant, seed, self._finished(sweep, variant, seed, code, time.perf_counter() - t0))
                if kill_at is not None and time.monotonic() >= kill_at:
                    for _, _, proc, _, _ in running.values():
                        _killpg(proc.pid, signal.SIGKILL)
                time.sleep(0.2)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        if interrupted:
            raise RunInterrupted(interrupted[0], "the sweep's jobs")

    def _start(self, sweep: SweepDir, variant: str, seed: int, slot: Slot) -> subprocess.Popen:
        jd = sweep.job(variant, seed).mkdir()
        log = open(jd.log, "ab")
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {variant}/seed{seed} {slot.describe()} =====\n"
                  .encode())
        log.flush()
        cores = slot.cores
        self.echo(f"[{variant} seed {seed}] started ({slot.describe()}, {slot.threads(dict(os.environ))} "
                  f"thread(s); log {jd.log})")
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "bench.executor.job", str(sweep.path), variant, str(seed)],
                stdout=log, stderr=subprocess.STDOUT, env=slot.env(dict(os.environ)), start_new_session=True,
                preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if hasattr(os, "sched_setaffinity") else None)
        finally:
            log.close()

    def _finished(self, sweep: SweepDir, variant: str, seed: int, code: int, took: float) -> dict:
        """The job's own state, or (it died before writing one) a failure naming how, with its log's tail."""
        from bench.executor.status import read_json, tail

        jd = sweep.job(variant, seed)
        state = read_json(jd.state)
        if state is None:
            how = f"killed by signal {-code}" + (" (out of memory?)" if -code == signal.SIGKILL else "") \
                if code < 0 else f"exit code {code}"
            state = {"variant": variant, "seed": seed, "state": "failed",
                     "detail": f"job {how} before it recorded a state; log {jd.log}:\n{tail(jd.log)}"}
            atomic_write_json(jd.state, state)
        state.setdefault("executor", {})["seconds"] = round(took, 1)
        self.echo(f"[{variant} seed {seed}] {state['state']} in {took:.0f} s"
                  + (f": {str(state.get('detail', ''))[:200]}" if state["state"] != "done" else ""))
        return state
