"""bench.store: the run folder's layout, its records and the one-writer lock."""

import json
import os
from pathlib import Path
import subprocess
import sys

import pytest

from bench.store import (FitDone, Job, Manifest, PredictDone, RunDir, RunLocked, Status,
                         latest_run)


def test_records_round_trip_and_keep_unknown_keys(tmp_path):
    m = Manifest(models=["fake", "watershed"], preset="smoke", seed=3, data="/d", device="cuda:1",
                 configs={"fake": {"iterations": 3}}, devices={"watershed": {"device": "cpu", "requested": "cuda:1"}},
                 classes=["a", "b"], extra={"written_by": "a newer cellbench"})
    run = RunDir(tmp_path / "run").mkdir()
    run.write_manifest(m)
    back = run.read_manifest()
    assert back == m
    on_disk = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert on_disk["device"] == "cuda:1" and on_disk["written_by"] == "a newer cellbench"
    assert "extra" not in on_disk  # unknown keys are written back at the top level, as they were

    md = run.model("fake").mkdir()
    job = Job(spec="fake:iterations=3", label="fake--iterations=3", config={"iterations": 3}, data="/d",
              device="cpu", seed=0, requested_device="cuda:1", fit="skip", resolve_overlaps=False)
    md.write_job(job)
    assert md.read_job() == job
    st = Status(state="failed", stage="fit", error="boom", device="cpu")
    md.write_status(st)
    assert md.read_status().error == "boom" and md.read_status().stage == "fit"
    md.update_status(state="done", error=None, stage=None)
    st2 = md.read_status()
    assert (st2.state, st2.error, st2.stage, st2.device) == ("done", None, None, "cpu")
    fd = FitDone(train_seconds=1.5, iterations=3, seconds_per_iteration=0.5, peak_rss_mb=100.0, device="cpu")
    md.write_fit_done(fd)
    assert md.read_fit_done() == fd
    pd = PredictDone(images=2, warmup_images=1, infer_ms_per_image=3.0, device="cpu")
    md.write_predict_done(pd)
    assert md.read_predict_done() == pd
    md.write_metrics({"kaggle_map": 0.5})
    assert md.has_metrics() and md.read_metrics() == {"kaggle_map": 0.5}
    md.write_config({"b": 1, "a": [1, 2]})
    assert md.read_config() == {"a": [1, 2], "b": 1}
    assert not any(p.name.endswith(".tmp") for p in md.path.iterdir())  # atomic writes leave no temp files


def test_an_older_manifest_reads(tmp_path):
    """Runs written before the store (no per-model devices, a dict on disk) still read."""
    (tmp_path / "manifest.json").write_text(json.dumps({
        "command": "bench run", "models": ["fake"], "preset": "smoke", "seed": 0, "device": "cpu", "data": "/d",
        "classes": ["a"], "split_hash": "abc", "models_state": {"fake": {"state": "done", "detail": ""}},
        "gpu": None}))
    m = RunDir(tmp_path).read_manifest()
    assert m.devices == {} and m.split_hash == "abc" and m.models_state["fake"]["state"] == "done"


def _committed_runs() -> list[Path]:
    """Run folders committed under results/ (not the git-ignored local results/runs, results/sweeps)."""
    results = Path(__file__).resolve().parents[1] / "results"
    local = (results / "runs", results / "sweeps", results / "cache")
    return sorted(p.parent for p in results.rglob("manifest.json")
                  if (p.parent / "models").is_dir() and not any(d in p.parents for d in local))


def _named_paths(md) -> set[Path]:
    """Every path the store names in a model folder (its Path-valued properties)."""
    props = [n for n, v in vars(type(md)).items() if isinstance(v, property)]
    return {p for p in (getattr(md, n) for n in props) if isinstance(p, Path)}


def test_run_folders_an_earlier_cellbench_wrote_read_through_the_store():
    """The committed run folders under results/ (written by earlier versions): every file in them is
    one the store names, and every record reads back."""
    runs = _committed_runs()
    if not runs:
        pytest.skip("no run folder committed under results/")
    for path in runs:
        run = RunDir(path)
        assert run.read_manifest().models and {p for p in path.iterdir()} <= {run.manifest_path, run.split,
                                                                              run.models_dir, run.lock_path,
                                                                              run.jobs_dir}
        assert run.models(), path
        for md in run.models():
            named = _named_paths(md)
            assert set(md.path.iterdir()) <= named, (md, set(md.path.iterdir()) - named)
            assert md.run.path == path and md.read_job().spec and md.read_status().state
            assert md.read_config() is not None
            if md.has_metrics():
                assert md.read_fit_done() is not None and md.read_predict_done().images > 0


def test_resolve_a_model_by_label_or_spec(tmp_path):
    from bench.data.errors import DataError

    run = RunDir(tmp_path)
    run.model("watershed--min_size=30").mkdir()
    assert run.resolve("watershed--min_size=30").label == "watershed--min_size=30"
    assert run.resolve("watershed:min_size=30").label == "watershed--min_size=30"
    with pytest.raises(DataError, match="watershed--min_size=30"):
        run.resolve("cellpose")


def test_latest_run(tmp_path):
    assert latest_run(tmp_path) is None
    for stamp in ("20260101-000000-aaaaaa", "20260102-000000-bbbbbb"):
        r = RunDir(tmp_path / "runs" / stamp).mkdir()
        r.write_manifest(Manifest(models=[], preset="smoke", seed=0, data="/d"))
    assert latest_run(tmp_path).path.name == "20260102-000000-bbbbbb"


def test_lock_refuses_a_second_writer_naming_pid_and_host(tmp_path):
    import platform

    run = RunDir(tmp_path)
    with run.lock():
        holder = json.loads(run.lock_path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == platform.node()
        with pytest.raises(RunLocked, match=f"pid {os.getpid()} on host {platform.node()}"):
            run.lock().acquire()  # another open file description: flock refuses it
    with run.lock():  # released on exit: free again
        pass


def test_lock_held_by_another_process_is_refused(tmp_path):
    code = ("import sys, time; from bench.store import RunDir; lk = RunDir(sys.argv[1]).lock().acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=f"pid {proc.pid} "):
            RunDir(tmp_path).lock().acquire()
    finally:
        proc.kill()
        proc.wait()
    with RunDir(tmp_path).lock() as lk:  # its holder died: the kernel dropped the flock, the lock is taken over
        assert lk.took_over["pid"] == proc.pid
        assert json.loads(RunDir(tmp_path).lock_path.read_text())["pid"] == os.getpid()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_stale_lock_of_a_dead_pid_on_this_host_is_taken_over(tmp_path):
    """Even where the flock itself is still held (a descriptor leaked to a dead process's survivors)."""
    import fcntl
    import platform

    run = RunDir(tmp_path)
    dead = _dead_pid()
    fd = os.open(run.lock_path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"pid": dead, "host": platform.node(), "since": "earlier"}).encode())
    try:
        with run.lock() as lk:
            assert lk.took_over["pid"] == dead
            assert json.loads(run.lock_path.read_text())["pid"] == os.getpid()
        # a dead pid of another host is not ours to judge: refused
        fd2 = os.open(run.lock_path, os.O_RDWR | os.O_CREAT)  # (the take-over made a new file)
        fcntl.flock(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(fd2, json.dumps({"pid": dead, "host": "elsewhere", "since": "earlier"}).encode(), 0)
        with pytest.raises(RunLocked, match="host elsewhere"):
            run.lock().acquire()
        os.close(fd2)
    finally:
        os.close(fd)


def test_a_corrupt_record_or_a_folder_without_a_run_is_a_data_error_naming_the_file(tmp_path):
    from bench.data.errors import DataError

    run = RunDir(tmp_path / "run").mkdir()
    with pytest.raises(DataError, match="not a run folder"):
        run.read_manifest()
    md = run.model("fake").mkdir()
    md.status.write_text("{half a rec")
    with pytest.raises(DataError, match=f"{md.status}.*not JSON"):
        md.read_status()
    md.fit_done.write_text("[1, 2]")
    with pytest.raises(DataError, match=f"{md.fit_done}.*not a JSON object"):
        md.read_fit_done()
    assert md.read_predict_done() is None and md.read_metrics() is None and md.read_tuning() is None


def test_update_status_keeps_what_it_does_not_change_and_unknown_keys(tmp_path):
    md = RunDir(tmp_path).model("m").mkdir()
    md.update_status(state="running", stage="fit", pid=123)  # pid: not a Status field
    md.update_status(stage="predict")
    st = md.read_status()
    assert (st.state, st.stage, st.extra["pid"]) == ("running", "predict", 123)
    assert json.loads(md.status.read_text())["pid"] == 123  # written back at the top level


def test_jsonl_logs_and_model_listing(tmp_path):
    run = RunDir(tmp_path)
    assert run.models() == [] and run.model("b").read_jsonl("train_log") == []
    for label in ("b", "a"):
        run.model(label).mkdir()
    assert run.labels() == ["a", "b"]
    md = run.model("a")
    md.train_log.write_text('{"step": 1}\n\n{"step": 2}\n')
    assert md.read_jsonl("train_log") == [{"step": 1}, {"step": 2}]


def test_model_label_is_folder_safe_and_independent_of_option_order():
    from bench.store import model_label

    assert model_label("cellpose:epochs=3,diam_mean=20") == model_label("cellpose:diam_mean=20,epochs=3")
    label = model_label("cellpose:weights=/a b/c.pt")
    assert "/" not in label and " " not in label and label.startswith("cellpose--")
    assert model_label("watershed") == "watershed"
