"""Which Python environment each model's worker runs in.

Most models share the project's ``.venv``. A framework whose pins conflict with it gets its
own virtual environment beside it, built by its own make target, and the runner starts that
model's worker with that environment's interpreter (the runner already runs one process per
model, so nothing else changes). StarDist is the case here: it runs on TensorFlow 2.15 (the
last TensorFlow with Keras 2 built in, which StarDist 0.9 and CSBDeep are written against),
and TensorFlow 2.15 needs ``numpy<2`` and ``protobuf<5`` where the main environment has
numpy 2.0 (torch 2.13, mmcv, Cellpose) and protobuf 7.

An adapter declares ``environment = "stardist"`` (default ``"main"``). The interpreter of an
environment is ``<project>/<folder>/bin/python``; ``CELLBENCH_ENV_<NAME>`` (e.g.
``CELLBENCH_ENV_STARDIST=/opt/sd/bin/python``) points elsewhere. The main environment is
whatever interpreter runs ``bench`` itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

MAIN = "main"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Environment:
    name: str
    folder: str    # relative to the project root
    setup: str     # the one command that creates it

    @property
    def variable(self) -> str:
        return f"CELLBENCH_ENV_{self.name.upper().replace('-', '_')}"

    def python(self) -> Path:
        """The interpreter this environment's workers run with (which may not exist yet)."""
        if self.name == MAIN:
            return Path(sys.executable)
        given = os.environ.get(self.variable)
        if given:
            return Path(given).expanduser()
        return PROJECT_ROOT / self.folder / "bin" / "python"

    def ready(self) -> bool:
        p = self.python()
        return p.is_file() and os.access(p, os.X_OK)

    def missing_hint(self) -> str:
        return (f"its environment {self.folder} is not set up ({self.python()} does not exist): "
                f"run `{self.setup}` (or set {self.variable} to a python that has it)")


ENVIRONMENTS: dict[str, Environment] = {
    MAIN: Environment(MAIN, ".venv", "make setup"),
    "stardist": Environment("stardist", ".venv-stardist", "make setup-stardist"),
}


def of(adapter_cls) -> Environment:
    """The environment an adapter class declares (``environment``; the main one by default)."""
    name = getattr(adapter_cls, "environment", MAIN)
    if name not in ENVIRONMENTS:
        raise ValueError(f"{adapter_cls.__name__} declares environment {name!r}; known: {', '.join(ENVIRONMENTS)}")
    return ENVIRONMENTS[name]


def worker_command(adapter_cls, model_dir: Path) -> list[str]:
    """The command line of a model's worker: its environment's interpreter."""
    return [str(of(adapter_cls).python()), "-m", "bench.runner.worker", str(model_dir)]


def worker_env(adapter_cls, env: dict[str, str]) -> dict[str, str]:
    """The worker's environment variables: another environment's interpreter must import this very
    cellbench (the checkout the runner runs), so the project root goes first on its PYTHONPATH."""
    if of(adapter_cls).name == MAIN:
        return env
    path = [str(PROJECT_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**env, "PYTHONPATH": os.pathsep.join(dict.fromkeys(path))}


def availability(adapter_cls) -> dict:
    """``available()`` of an adapter, asked in its own environment: {ok, version, hint, environment, ready}.

    For the main environment this is a plain call; for another one it runs this module in that
    environment's interpreter (seconds: it imports the framework there)."""
    env = of(adapter_cls)
    out = {"environment": env.folder, "ready": env.ready()}
    if env.name == MAIN:
        a = adapter_cls.available()
        return {**out, "ok": a.ok, "version": a.version, "hint": a.hint}
    if not out["ready"]:
        return {**out, "ok": False, "version": None, "hint": env.missing_hint()}
    try:
        r = subprocess.run([str(env.python()), "-m", "bench.envs", adapter_cls.name], capture_output=True, text=True,
                           timeout=300, env=worker_env(adapter_cls, dict(os.environ)))
        found = json.loads(r.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as e:
        return {**out, "ok": False, "version": None,
                "hint": f"{env.python()} could not report on {adapter_cls.name} ({type(e).__name__}: {e}); "
                        f"rerun `{env.setup}`"}
    return {**out, **found}


def _probe(name: str) -> None:
    """Run inside an environment: print the adapter's availability there as one JSON line."""
    from bench.adapters import registry

    a = registry.get(name).available()
    print(json.dumps({"ok": a.ok, "version": a.version, "hint": a.hint}))


if __name__ == "__main__":
    _probe(sys.argv[1])
