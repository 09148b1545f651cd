"""Shared fixtures: a tiny synthetic dataset and the real annotations in ../shared (skip when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.util import shared_data

# multi-threaded torch on a loaded 2-core box is ~10x slower than single-threaded (DEVELOPERS.md)
os.environ.setdefault("OMP_NUM_THREADS", "1")



@pytest.fixture(scope="session")
def shared() -> Path:
    d = shared_data()
    if d is None:
        pytest.skip("../shared/data is not present")
    return d


@pytest.fixture(scope="session")
def real_csv(shared) -> Path:
    p = shared / "sartorius_gallegi_t4e" / "derived" / "val_fold0_part1_56ids_sartorius_rle.csv"
    if not p.is_file():
        pytest.skip(f"{p} is not present")
    return p


@pytest.fixture(scope="session")
def real_json(shared) -> Path:
    p = shared / "sartorius_gallegi_t4e" / "data" / "val_fold0_split_part1.json"
    if not p.is_file():
        pytest.skip(f"{p} is not present")
    return p


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory) -> Path:
    """12 synthetic Sartorius-format images of 128x128 (seconds to make)."""
    from bench.data.synth import generate

    out = tmp_path_factory.mktemp("synth") / "tiny"
    generate(out, n_images=12, size=(128, 128), seed=0)
    return out



@pytest.fixture
def run_in_model_env():
    """``run(model, module, test_file, test_name)``: run one test in the interpreter of ``model``'s own
    environment (bench/envs.py), for frameworks that cannot share the main venv (StarDist's
    TensorFlow). Skips where ``module`` imports here (the test then ran in-process) or the
    environment is not set up."""
    import importlib.util
    import subprocess

    from bench import envs
    from bench.adapters.registry import get

    def run(model: str, module: str, test_file: str, test_name: str) -> None:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a dotted name whose parent package is absent
            found = False
        if found:
            pytest.skip(f"{module} is importable here: {test_name} ran in-process")
        cls = get(model)
        env = envs.of(cls)
        if not env.ready():
            pytest.skip(env.missing_hint())
        here = Path(test_file).resolve()
        r = subprocess.run([str(env.python()), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here),
                            "-k", test_name], cwd=here.parent.parent,
                           env=envs.worker_env(cls, dict(os.environ)), capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]

    return run


class BenchProcesses:
    """Real ``python -m bench ...`` processes, for what only a separate process shows (signals, the
    run lock); every one still running at the test's end is killed."""

    def __init__(self):
        self.procs: list = []

    def start(self, *args):
        import subprocess
        import sys

        proc = subprocess.Popen([sys.executable, "-m", "bench", *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        self.procs.append(proc)
        return proc

    @staticmethod
    def wait_until(proc, ready, timeout: float, poll: float = 0.1) -> None:
        """Until ``ready()``; fails with the process's output if it ends first, or if time runs out."""
        import time

        deadline = time.monotonic() + timeout
        while not ready():
            ended = proc.poll() is not None
            assert not ended and time.monotonic() < deadline, (proc.stdout.read() if ended else
                                                               f"not ready after {timeout} s")
            time.sleep(poll)

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def bench_processes():
    procs = BenchProcesses()
    yield procs
    procs.kill_all()
