"""What an executor runs: tasks, each one job with its folder, resources and dependencies.

A task is one job: a sweep's variant x seed (its own fit), one pretrain stage of it, or one
model of ``bench run``. ``after`` names the tasks it waits for (a fine-tune waits for its last
pretrain stage, an ensemble for its members): locally it starts when they are done, on SLURM it
is submitted with ``--dependency=afterok:<their job ids>``; when one of them did not finish, the
task is not run and is reported failed, naming which and why. Every executor runs the same code
for a task (``python -m bench.executor.job ARGV`` locally, ``call(*args)`` on a SLURM node).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from bench.executor.resources import Resources
from bench.store import SweepJobDir
from bench.util import atomic_write_json


@dataclass
class Task:
    key: str                         # unique in one submission: "tv/seed0", "tv/seed0/pretrain0", "maskrcnn-tv"
    folder: SweepJobDir              # request.json, state.json, log.txt
    argv: list[str]                  # local: python -m bench.executor.job ARGV
    call: Callable[..., Any]         # SLURM: what submitit runs on the node ...
    args: tuple                      # ... with these arguments
    resources: Resources = field(default_factory=Resources)
    gpus: int = 0                    # GPUs it takes (bench.executor.resources.job_gpus)
    after: tuple[str, ...] = ()      # keys of the tasks it waits for
    what: str = ""                   # for messages: "pretrain stage 0 of tv/seed0"

    def __post_init__(self) -> None:
        self.what = self.what or self.key


def not_run(task: Task, dep: Task | str, dep_state: dict) -> dict:
    """The state of a task whose dependency did not finish (written to its folder, so that
    ``bench status`` and the sweep's state say why it never ran)."""
    name = dep.what if isinstance(dep, Task) else dep
    why = str(dep_state.get("detail", "") or "").splitlines()
    state = {"state": "failed", "skipped": True,
             "detail": f"not run: {name} did not finish ({dep_state.get('state', '?')}"
                       + (f": {why[0][:300]}" if why else "") + ")"}
    task.folder.mkdir()
    atomic_write_json(task.folder.state, {**state, "key": task.key})
    return state


def order(tasks: list[Task]) -> list[Task]:
    """Dependencies first (stable otherwise); a cycle or an unknown dependency is a bug here."""
    keys = {t.key for t in tasks}
    done: set[str] = set()
    out: list[Task] = []
    left = list(tasks)
    while left:
        ready = [t for t in left if all(a in done or a not in keys for a in t.after)]
        if not ready:
            raise RuntimeError(f"tasks wait for each other: {[t.key for t in left]}")
        for t in ready:
            out.append(t)
            done.add(t.key)
        left = [t for t in left if t.key not in done]
    return out
