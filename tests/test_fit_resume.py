"""Mid-training checkpoints (``checkpoint_every``) and resuming an interrupted fit.

The framework tests train the real torchvision, Detectron2 and MMDetection models for a few
iterations on tiny synthetic images: once in one go, once interrupted after a checkpoint and
started again in the same folders. The resumed fit must start at the checkpoint's iteration and
end with the very weights and predictions of the uninterrupted fit (CPU, one thread: all three
are deterministic there). The end-to-end test SIGTERMs a real ``bench run`` mid-fit and
continues it with ``--resume``.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from bench.adapters import registry
from bench.adapters.base import FitContext
from bench.adapters.registry import build, make_config
from bench.adapters.trainable import RESUME_STATE, FitResume

TINY = {
    "maskrcnn-tv": {"iterations": 4, "batch_size": 2, "min_size": 128, "max_size": 128, "log_every": 1,
                    "warmup_iters": 2, "lr_steps": [3], "box_score_thresh": 0.0, "detections_per_image": 50,
                    "rpn_post_nms_top_n_test": 100, "rpn_pre_nms_top_n_test": 200, "fpn_channels": 32},
    "maskrcnn": {"iterations": 4, "lr_steps": [3], "warmup_iters": 2, "log_every": 1, "min_size_train": [128],
                 "min_size_test": 128, "num_workers": 0, "score_thresh_test": 0.0},
    "cascade": {"depth": 18, "base_channels": 32, "fpn_channels": 32, "bbox_fc_channels": 64, "mask_convs": 1,
                "rpn_sample_num": 64, "rcnn_sample_num": 64, "rpn_train_nms_pre": 300,
                "rpn_train_max_per_img": 300, "rpn_nms_pre": 300, "rpn_max_per_img": 200, "max_per_img": 100,
                "score_thr": 0.0, "iterations": 4, "warmup_iters": 2, "lr_steps": [3], "batch_size": 2,
                "num_workers": 0, "log_every": 1},
}
EVERY, KILL_AT = 2, 3   # a checkpoint after iteration 2; the fit dies in iteration 3, before the next one


class Killed(Exception):
    """Stands for the SIGTERM / time limit / preemption that ends a fit between two checkpoints."""


# ---------------------------------------------------------------------------
# FitResume, no framework
# ---------------------------------------------------------------------------

def _write(tag: str):
    return lambda folder: (folder / "w.txt").write_text(tag)


def test_checkpoints_are_due_every_n_iterations_but_never_after_the_last(tmp_path):
    r = FitResume(tmp_path, 2, {})
    assert [k for k in range(1, 7) if r.due(k, 6)] == [2, 4]
    assert not FitResume(tmp_path, 0, {}).due(2, 6)       # 0: off
    assert not FitResume(None, 2, {}).due(2, 6)           # no folder given (an adapter called alone)


def test_only_the_latest_checkpoint_of_this_very_fit_is_resumed(tmp_path):
    fp = {"config": {"lr": 0.1}, "seed": 0}
    r = FitResume(tmp_path / "resume", 2, fp)
    assert r.find() is None and r.note == ""             # nothing there: a fresh fit, nothing said
    r.save(2, 1.5, _write("a"))
    r.save(4, 3.0, _write("b"))
    assert sorted(p.name for p in (tmp_path / "resume").iterdir()) == ["iter4", RESUME_STATE]  # one kept
    point = FitResume(tmp_path / "resume", 2, fp).find()
    assert (point.iteration, point.seconds) == (4, 3.0) and (point.folder / "w.txt").read_text() == "b"
    # a checkpoint interrupted while being written leaves the previous one readable
    (tmp_path / "resume" / "iter6.tmp").mkdir()
    assert FitResume(tmp_path / "resume", 2, fp).find().iteration == 4
    # another fit (here another lr) never continues from it: the folder is cleared, the reason given
    other = FitResume(tmp_path / "resume", 2, {**fp, "config": {"lr": 0.2}})
    assert other.find() is None and "another fit" in other.note
    assert not (tmp_path / "resume").exists()


def test_an_unreadable_state_file_means_starting_over(tmp_path):
    (tmp_path / "resume").mkdir()
    (tmp_path / "resume" / RESUME_STATE).write_text("{not json")
    r = FitResume(tmp_path / "resume", 2, {})
    assert r.find() is None and "unreadable" in r.note and not (tmp_path / "resume").exists()


def test_the_readme_table_says_what_each_adapter_does():
    """README's table of who resumes mid-training agrees with each adapter's declaration."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([\w-]+)` \| (mid-training|restarts the fit stage|no fit stage) \|", text, re.M))
    for name in registry.registered():
        cls = registry.get(name)
        if name.startswith("fake"):
            continue
        want = ("mid-training" if getattr(cls, "resumes_mid_training", False)
                else "no fit stage" if not cls.capabilities.trainable else "restarts the fit stage")
        assert rows.get(name) == want, name
        assert ("checkpoint_every" in cls.Config.model_fields) == getattr(cls, "resumes_mid_training", False), name


# ---------------------------------------------------------------------------
# the frameworks: interrupted + resumed == uninterrupted
# ---------------------------------------------------------------------------

def _skip_unless(name: str) -> None:
    ok = registry.get(name).available()
    if not ok.ok:
        pytest.skip(f"{name}: {ok.hint}")


def _fit(name, ds, workdir: Path, resume_dir: Path, kill_at: int | None = None):
    train, val = ds.samples[:6], ds.samples[6:8]
    cfg = make_config(name, "smoke", {**TINY[name], "checkpoint_every": EVERY})
    model, log = build(name, ds.classes, "smoke"), []

    def progress(done, total, info):
        if done == kill_at:
            raise Killed(f"killed in iteration {done}")

    ctx = FitContext(workdir, "cpu", 0, progress, log.append, resume_dir=resume_dir)
    model.fit(train, val, cfg, ctx)
    return model, log, ctx


@pytest.mark.slow
@pytest.mark.parametrize("name", ["maskrcnn-tv", pytest.param("maskrcnn", marks=pytest.mark.detectron2), "cascade"])
def test_an_interrupted_fit_resumes_at_its_checkpoint_and_ends_where_one_fit_ends(name, tiny_synth, tmp_path):
    import torch

    from bench.data.io import read_sartorius

    _skip_unless(name)
    ds = read_sartorius(tiny_synth)
    whole, whole_log, whole_ctx = _fit(name, ds, tmp_path / "a", tmp_path / "a-resume")
    assert whole_ctx.resumed_from == 0 and [r["step"] for r in whole_log] == [1, 2, 3, 4]
    assert not (tmp_path / "a-resume").exists() or not any((tmp_path / "a-resume").glob("iter4"))  # none after the last

    with pytest.raises(Killed):
        _fit(name, ds, tmp_path / "b", tmp_path / "b-resume", kill_at=KILL_AT)
    state = json.loads((tmp_path / "b-resume" / RESUME_STATE).read_text())
    assert state["iteration"] == EVERY and sorted(p.name for p in (tmp_path / "b-resume").iterdir()) == \
        [f"iter{EVERY}", RESUME_STATE]

    resumed, log, ctx = _fit(name, ds, tmp_path / "b", tmp_path / "b-resume")
    assert ctx.resumed_from == EVERY and [r["step"] for r in log] == [3, 4]  # iterations 1-2 not trained again
    # the same batches, losses, learning rates and final weights as the uninterrupted fit
    assert [(r["loss"], r["lr"]) for r in log] == [(r["loss"], r["lr"]) for r in whole_log[EVERY:]]
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, unequal[:5]
    val = ds.samples[6:8]
    for p, q in zip(whole.predict(val), resumed.predict(val)):
        assert len(p) == len(q) > 0
        np.testing.assert_array_equal(p.scores, q.scores)


# ---------------------------------------------------------------------------
# end to end: bench run SIGTERMed mid-fit, then --resume
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_a_sigtermed_bench_run_resumes_its_fit_mid_training(tiny_synth, tmp_path, bench_processes):
    import signal

    from bench.runner.run import run_benchmark
    from bench.store import RunDir

    _skip_unless("maskrcnn-tv")
    n = 16
    opts = {**TINY["maskrcnn-tv"], "iterations": n, "lr_steps": [12], "checkpoint_every": EVERY}
    spec = "maskrcnn-tv:" + ",".join(f"{k}={json.dumps(v).replace(' ', '')}" for k, v in opts.items())
    out = tmp_path / "run"
    proc = bench_processes.start("run", "--models", spec, "--data", tiny_synth, "--device", "cpu", "--out", out,
                                 "--preset", "smoke")
    bench_processes.wait_until(proc, lambda: any(out.glob(f"models/*/resume/{RESUME_STATE}")), timeout=300)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130, proc.stdout.read()
    md = RunDir(out).models()[0]
    assert not md.fit_done.is_file() and md.read_status().state == "interrupted"
    k = json.loads((md.resume / RESUME_STATE).read_text())["iteration"]
    assert EVERY <= k < n and k % EVERY == 0

    run_benchmark([spec], str(tiny_synth), "smoke", "cpu", 0, out, results=tmp_path / "results",
                  echo=lambda *_: None, resume=True)
    assert md.has_metrics()
    assert md.read_fit_done().extra["resumed_from_iteration"] == k
    assert f"resuming the fit from its checkpoint at iteration {k}" in md.log.read_text()
    # one fit's log: the interrupted attempt's records up to the checkpoint, then the resumed ones
    assert [r["step"] for r in md.read_jsonl("train_log")] == list(range(1, n + 1))
    assert not md.resume.exists()  # removed once fit.done.json is written
