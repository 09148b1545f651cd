"""Executors (bench.executor): --jobs N on this machine, the job's records, bench status, bad input.

The fake adapter (tests/plugins) keeps these fast; the SLURM executor has its own tests
(test_slurm.py) against a real one-node cluster.
"""

import json
import os
import gzip
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bench.adapters import registry
from bench.adapters.registry import ConfigError
from bench.executor import ExecutorError, ExecutorSpec, parse_slurm_options
from bench.executor.local import Pool
from bench.executor.resources import Resources
from bench.executor.task import Task
from bench.executor.status import status_text
from bench.store import RunLocked, SweepDir
from bench.sweep import run_sweep

FAKE = str(Path(__file__).parent / "plugins" / "fake_adapter.py")


@pytest.fixture(autouse=True)
def fake_plugin(monkeypatch):
    monkeypatch.setenv("CELLBENCH_PLUGINS", FAKE)
    registry.load_plugins()


def sweep_file(tmp_path: Path, variants: dict, seeds=(0, 1), base_options=None, **extra) -> Path:
    doc = {"name": "exec-test", "base": {"model": "fake", "preset": "smoke", "options": base_options or {}},
           "seeds": list(seeds), "reference": next(iter(variants)), "variants": variants, **extra}
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def predictions(sweep: Path) -> dict[str, list]:
    """Every run's predictions, decoded: run folder -> records (masks as RLE counts)."""
    out = {}
    for p in sorted(sweep.glob("runs/*/*/models/*/predictions.jsonl.gz")):
        with gzip.open(p, "rt") as f:
            recs = [json.loads(x) for x in f if x.strip()]
        out[str(p.relative_to(sweep))] = [r for r in recs if "image_id" in r or "masks" in r or "instances" in r]
    return out


def _task(key: str, tmp_path: Path, gpus: int = 0, **res) -> Task:
    from bench.store import SweepJobDir

    return Task(key, SweepJobDir(tmp_path / key), [], None, (), Resources(**res), gpus)


def test_slots_divide_the_cores_and_give_each_job_its_gpu(tmp_path):
    pool = Pool(2, [], cores=[0, 1, 2, 3, 4])
    a, b = pool.take(_task("a", tmp_path)), pool.take(_task("b", tmp_path))
    assert [a.cores, b.cores] == [[0, 1], [2, 3]] and pool.take(_task("c", tmp_path)) is None
    assert b.env({})["OMP_NUM_THREADS"] == "2"
    assert a.env({"OMP_NUM_THREADS": "1"})["OMP_NUM_THREADS"] == "1"  # never more than asked
    pool.give_back(a)
    big = pool.take(_task("big", tmp_path, cpus=3))  # its resources ask for 3 cores: 3 are free now
    assert big.cores == [0, 1, 4] and big.env({})["OMP_NUM_THREADS"] == "3"
    three = Pool(3, [], cores=[0, 1])
    assert [three.take(_task(k, tmp_path)).cores for k in "abc"] == [[0], [1], [0]]
    gpu = Pool(2, ["0", "3"], cores=[0, 1, 2, 3])
    one, two = gpu.take(_task("a", tmp_path, gpus=1)), gpu.take(_task("b", tmp_path, gpus=1))
    assert [s.env({})["CUDA_VISIBLE_DEVICES"] for s in (one, two)] == ["0", "3"]
    assert gpu.take(_task("c", tmp_path, gpus=1)) is None  # no GPU left (cores would be)
    gpu.give_back(one)
    assert gpu.take(_task("cpu-only", tmp_path, gpus=0)).env({})["CUDA_VISIBLE_DEVICES"] == ""  # sees no GPU
    with pytest.raises(ConfigError, match="asks for 2 GPU"):
        Pool(1, ["0"], cores=[0]).check(_task("two", tmp_path, gpus=2))
    with pytest.raises(ConfigError, match="mem_gb=64 but this machine has 8.0 GB"):
        Pool(1, [], cores=[0], mem_gb=8).check(_task("fat", tmp_path, mem_gb=64))
    mem = Pool(2, [], cores=[0, 1], mem_gb=8)
    assert mem.take(_task("a", tmp_path, mem_gb=5)) and mem.take(_task("b", tmp_path, mem_gb=5)) is None
    # the second one waits for memory, not for a core, and is told so
    assert "mem_gb=5 and the running jobs hold 5 of this machine's 8.0 GB" in mem.waits_for_memory(
        _task("b", tmp_path, mem_gb=5))
    assert mem.waits_for_memory(_task("c", tmp_path, mem_gb=2)) is None


def test_local_parallel_runs_what_serial_runs(tmp_path, tiny_synth):
    counter = tmp_path / "count"
    counter.mkdir()
    cfg = sweep_file(tmp_path, {"half": {"options": {"mode": "drop_half"}},
                                "retrain": {"pretrain": [{"data": "split:train+val"}]}},
                     seeds=[0], base_options={"iterations": 2})
    quiet = lambda *_: None  # noqa: E731
    serial, s_states = run_sweep(cfg, data=str(tiny_synth), out=tmp_path / "serial", results=tmp_path / "r",
                                 echo=quiet)
    par, p_states = run_sweep(cfg, data=str(tiny_synth), out=tmp_path / "par", results=tmp_path / "r",
                              sets={"counter_dir": str(counter)}, echo=quiet, executor=ExecutorSpec(jobs=2))
    assert {k: v["state"] for k, v in p_states.items()} == {k: "done" for k in s_states}
    assert predictions(par) == predictions(serial) and len(predictions(par)) == 2 + 1  # runs + stage
    assert all(recs for recs in predictions(par).values())
    # each job recorded where it ran: its own core, one thread; the sweep's state names the slot
    cores = set()
    for key, st in p_states.items():
        rec = json.loads((par / st["run_dir"] / "executor.json").read_text())
        assert rec["executor"] == "local" and rec["omp_num_threads"] == "1" and len(rec["cores"]) == 1
        cores.add(rec["cores"][0])
        assert st["executor"]["slot"].startswith("slot ") and st["model"] == "fake"
    cores.add(json.loads((par / "runs/retrain/seed0-pretrain0/executor.json").read_text())["cores"][0])
    assert len(cores) == min(2, os.cpu_count())  # two jobs at once (the stage and half), one core each
    # the pretrain stage was a job of its own, finished before its fine-tune started
    stage = json.loads((par / "runs/retrain/seed0-pretrain0/executor.json").read_text())
    fine = json.loads((par / "runs/retrain/seed0/executor.json").read_text())
    assert stage["pid"] != fine["pid"] and stage["started"] <= fine["started"]
    assert (par / "jobs/retrain/seed0-pretrain0/log.txt").read_text().count("pretrain stage 0") >= 1
    assert (par / "jobs/half/seed0/log.txt").read_text().count("job half/seed0") == 1
    fits = int((counter / "fit.count").read_text())
    assert fits == 3
    # --resume: nothing left to do, nothing run again
    run_sweep(cfg, out=par, resume=True, results=tmp_path / "r", sets={"counter_dir": str(counter)}, echo=quiet,
              executor=ExecutorSpec(jobs=2))
    assert int((counter / "fit.count").read_text()) == fits
    text = status_text(par)
    assert text.count(" done ") == 3 and "3 done" in text  # the two runs and the stage's own job
    assert any(line.startswith("retrain/seed0/pretrain0 ") and " done " in line for line in text.splitlines())
    run_text = status_text(par / "runs/half/seed0")  # a run folder: one row per model
    assert "fake" in run_text and "Kaggle mAP 0.6667" in run_text and "1 done" in run_text


def test_a_killed_job_is_failed_with_its_log_and_resume_redoes_only_it(tmp_path, tiny_synth):
    counter, other = tmp_path / "count", tmp_path / "other"
    counter.mkdir()
    other.mkdir()
    cfg = sweep_file(tmp_path, {"base": {"options": {"counter_dir": str(other)}},
                                "dies": {"options": {"mode": "kill_fit_once", "counter_dir": str(counter)}}},
                     seeds=[0])
    out, states = run_sweep(cfg, data=str(tiny_synth), out=tmp_path / "sw", results=tmp_path / "r",
                            echo=lambda *_: None, executor=ExecutorSpec(jobs=2))
    assert states["base/seed0"]["state"] == "done"
    assert states["dies/seed0"]["state"] == "failed" and "killed by signal 9" in states["dies/seed0"]["detail"]
    text = status_text(out)
    assert "dies/seed0" in text and "failed" in text and "    | " in text  # the last lines of its log
    result = CliRunner().invoke(__import__("bench.cli", fromlist=["app"]).app, ["status", str(out)])
    assert result.exit_code == 0 and "killed by signal 9" in result.output
    assert int((counter / "fit.count").read_text()) == 1
    _, states = run_sweep(cfg, out=out, resume=True, results=tmp_path / "r", echo=lambda *_: None,
                          executor=ExecutorSpec(jobs=2))
    assert states["dies/seed0"]["state"] == "done"
    # only the killed one ran again
    assert int((counter / "fit.count").read_text()) == 2 and int((other / "fit.count").read_text()) == 1


def test_bad_executor_input_is_refused_before_anything_runs(tmp_path, tiny_synth, monkeypatch):
    with pytest.raises(ConfigError, match="unknown executor 'dask'"):
        ExecutorSpec(name="dask")
    with pytest.raises(ConfigError, match="each job gets its own GPU"):
        ExecutorSpec(jobs=3, gpus=["0", "1"])
    with pytest.raises(ConfigError, match="--slurm: time_min"):
        parse_slurm_options({}, ["time_min=soon"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_slurm_options({}, ["partition"])
    # the sweep file's slurm: section is checked with the rest of the file
    bad = sweep_file(tmp_path, {"base": {}}, slurm={"partiton": "gpu"})
    with pytest.raises(ConfigError, match="slurm.partiton"):
        run_sweep(bad, data=str(tiny_synth), out=tmp_path / "bad", echo=lambda *_: None)
    cfg = sweep_file(tmp_path, {"base": {}}, seeds=[0])
    with pytest.raises(ExecutorError, match="--gpus 0 but the sweep runs on cpu"):
        run_sweep(cfg, data=str(tiny_synth), out=tmp_path / "g", device="cpu", echo=lambda *_: None,
                  executor=ExecutorSpec(gpus=["0"]))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ExecutorError, match="sbatch, squeue, scontrol not on PATH.*nothing was submitted"):
        run_sweep(cfg, data=str(tiny_synth), out=tmp_path / "s", echo=lambda *_: None,
                  executor=ExecutorSpec(name="slurm"))
    assert not (tmp_path / "s").exists() and not (tmp_path / "g").exists()


def test_two_sweeps_on_one_folder_are_refused(tmp_path, tiny_synth):
    cfg = sweep_file(tmp_path, {"base": {}}, seeds=[0])
    out = tmp_path / "sw"
    run_sweep(cfg, data=str(tiny_synth), out=out, results=tmp_path / "r", echo=lambda *_: None)
    with SweepDir(out).lock():  # another bench sweep holds it
        with pytest.raises(RunLocked, match="another bench sweep"):
            run_sweep(cfg, out=out, resume=True, results=tmp_path / "r", echo=lambda *_: None,
                      executor=ExecutorSpec(jobs=2))
        with pytest.raises(RunLocked, match="another bench sweep"):  # --jobs 1 too
            run_sweep(cfg, out=out, resume=True, results=tmp_path / "r", echo=lambda *_: None)
