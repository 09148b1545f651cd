"""One environment per conflicting framework: the runner starts each model's worker with its environment's
interpreter, and a missing environment is said (with how to build it) before anything trains."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from bench import envs
from bench.adapters import registry
from bench.runner.run import run_benchmark

PLUGINS = os.pathsep.join(str(Path(__file__).parent / "plugins" / f) for f in ("fake_adapter.py",
                                                                               "fake_env_adapter.py"))


@pytest.fixture(autouse=True)
def plugins(monkeypatch):
    monkeypatch.setenv("CELLBENCH_PLUGINS", PLUGINS)
    registry.load_plugins()


def test_declared_environments():
    assert envs.of(registry.get("fake")).name == envs.MAIN
    assert envs.of(registry.get("fake")).python() == Path(sys.executable)
    assert envs.of(registry.get("stardist")).folder == ".venv-stardist"
    assert envs.of(registry.get("yolo-seg")).name == envs.MAIN  # shares the main environment

    class Odd:
        environment = "nowhere"
    with pytest.raises(ValueError, match="Odd declares environment 'nowhere'"):
        envs.of(Odd)


def test_missing_environment_is_said_with_its_setup_command(monkeypatch, tmp_path):
    monkeypatch.setenv("CELLBENCH_ENV_STARDIST", str(tmp_path / "none" / "python"))
    a = envs.availability(registry.get("fake-env"))
    assert not a["ok"] and not a["ready"] and a["environment"] == ".venv-stardist"
    assert "make setup-stardist" in a["hint"] and str(tmp_path / "none" / "python") in a["hint"]


def test_runner_refuses_a_model_whose_environment_is_missing_before_training(monkeypatch, tmp_path, tiny_synth):
    monkeypatch.setenv("CELLBENCH_ENV_STARDIST", str(tmp_path / "none" / "python"))
    said = []
    run_dir, out = run_benchmark(["fake-env", "fake"], str(tiny_synth), "smoke", "cpu", 0, tmp_path / "run",
                                 results=tmp_path / "results", echo=said.append)
    assert [(o.label, o.state) for o in out] == [("fake-env", "not installed"), ("fake", "done")]
    assert "make setup-stardist" in out[0].detail
    first_start = next(i for i, s in enumerate(said) if "starting" in s)
    assert any("make setup-stardist" in s for s in said[:first_start])  # said before anything trains
    md = run_dir / "models" / "fake-env"
    assert json.loads((md / "status.json").read_text())["state"] == "not installed"
    assert not (md / "fit.done.json").exists() and not (md / "log.txt").exists()


def test_worker_runs_with_its_environments_interpreter(monkeypatch, tmp_path, tiny_synth):
    record = tmp_path / "called.txt"
    wrapper = tmp_path / "env" / "bin" / "python"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {record}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CELLBENCH_ENV_STARDIST", str(wrapper))
    run_dir, out = run_benchmark(["fake-env", "fake"], str(tiny_synth), "smoke", "cpu", 0, tmp_path / "run",
                                 results=tmp_path / "results", echo=lambda *_: None)
    assert [o.state for o in out] == ["done", "done"]
    calls = record.read_text().splitlines()
    assert calls == [f"-m bench.runner.worker {run_dir / 'models' / 'fake-env'}"]  # only fake-env's worker
    assert envs.availability(registry.get("fake-env"))["ok"]  # asked in that interpreter too
