"""``bench tune`` (honest threshold tuning), ``bench predict`` and ``bench submit`` end to end.

One small run (watershed, the fake adapter and its drop_half mode on 24 synthetic
128x128 images, about half of them for validation) is shared by the tests; tests that write
into a run work on their own copy of it.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bench.adapters import registry
from bench.cli import app
from bench.data import rle
from bench.data.errors import DataError
from bench.data.predictions import read_predictions, read_submission, write_predictions
from bench.data.sample import Instances
from bench.metrics.evaluator import evaluate_predictions
from bench.runner.run import run_benchmark
from bench import tune as T

FAKE = str(Path(__file__).parent / "plugins" / "fake_adapter.py")
MODELS = ["watershed", "fake", "fake:mode=drop_half"]
runner = CliRunner()


def _out(r) -> str:
    """stdout and stderr of a CliRunner result (click >= 8.2 keeps them apart)."""
    text = r.output
    try:
        text += r.stderr
    except (ValueError, AttributeError):
        pass
    return text


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from bench.data.synth import generate

    out = tmp_path_factory.mktemp("tps") / "synth"
    generate(out, n_images=24, size=(128, 128), seed=0)
    return out


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, synth) -> Path:
    mp = pytest.MonkeyPatch()
    mp.setenv("CELLBENCH_PLUGINS", FAKE)
    registry.load_plugins()
    tmp = tmp_path_factory.mktemp("tps_run")
    try:
        run_dir, outcomes = run_benchmark(MODELS, str(synth), "smoke", "cpu", 0, tmp / "run", val_fraction=0.5,
                                          results=tmp / "results", echo=lambda *_: None)
    finally:
        mp.undo()
    assert [o.state for o in outcomes] == ["done"] * 3, [o.detail for o in outcomes]
    return run_dir


@pytest.fixture()
def run_copy(base_run, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CELLBENCH_PLUGINS", FAKE)
    registry.load_plugins()
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst


def _snapshot(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------
# bench tune
# ---------------------------------------------------------------------------

def test_tune_three_numbers_written_and_reported(run_copy, tmp_path):
    before = _snapshot(run_copy)
    r = runner.invoke(app, ["tune", str(run_copy)])
    assert r.exit_code == 0, _out(r)
    assert "in-sample" in r.output and "optimistic" in r.output
    after = _snapshot(run_copy)
    new = set(after) - set(before)
    assert new == {f"models/{m}/tuning.json" for m in ("watershed", "fake", "fake--mode=drop_half")}
    assert all(after[k] == v for k, v in before.items())  # nothing else in the run was touched

    res = {}
    for label in ("watershed", "fake", "fake--mode=drop_half"):
        t = json.loads((run_copy / "models" / label / "tuning.json").read_text())
        m = json.loads((run_copy / "models" / label / "metrics.json").read_text())
        for key in ("untuned", "tuned_in_sample", "tuned_cv", "k", "seed", "thresholds", "class_source"):
            assert key in t
        assert t["untuned"] == pytest.approx(m["kaggle_map"], abs=1e-12)  # same numbers as the evaluator
        assert t["tuned_in_sample"] >= t["untuned"] - 1e-12
        assert 0.0 <= t["tuned_cv"] <= 1.0
        assert t["k"] == min(5, t["n_images"]) and t["seed"] == 0
        assert "all" in t["thresholds"]
        res[label] = t
    # class-agnostic model: one threshold set; the fake predicts classes (the gt's), so per predicted class
    assert res["watershed"]["class_source"] == "single" and set(res["watershed"]["thresholds"]) == {"all"}
    assert res["fake"]["class_source"] == "predicted"
    gt_types = {i: v for i, v in json.loads((run_copy / "models" / "fake" / "metrics.json").read_text())[
        "image_class"].items()}
    assert res["fake"]["image_class"] == gt_types
    assert set(res["fake"]["thresholds"]) == set(gt_types.values()) | {"all"}

    from bench.report.leaderboard import write_report

    write_report([run_copy], tmp_path / "report")
    md = (tmp_path / "report" / "leaderboard.md").read_text()
    assert "tuned in-sample (optimistic)" in md
    for t in res.values():
        assert f"{t['untuned']:.4f} / {t['tuned_in_sample']:.4f} / {t['tuned_cv']:.4f}" in md
    header, first = (tmp_path / "report" / "leaderboard.csv").read_text().splitlines()[:2]
    assert "tuned_in_sample" in header and "tuned_cv" in header


def test_tune_is_deterministic_per_seed(run_copy):
    a = T.tune_run(run_copy, ["watershed"], echo=lambda *_: None)["watershed"]
    b = T.tune_run(run_copy, ["watershed"], echo=lambda *_: None)["watershed"]
    assert a == b
    c = T.tune_run(run_copy, ["watershed"], seed=7, echo=lambda *_: None)["watershed"]
    assert c["seed"] == 7 and c["tuned_in_sample"] == a["tuned_in_sample"]  # in-sample does not depend on it
    assert c["folds"] != a["folds"]


def _junk(preds: dict[str, Instances], seed: int = 0) -> dict[str, Instances]:
    """Add low-scoring junk: small square blobs and a few large low-score blobs, at random places."""
    rng = np.random.default_rng(seed)
    out = {}
    for iid, p in preds.items():
        h, w = p.height, p.width
        counts, scores = list(p.counts), list(p.scores if p.scores is not None else np.ones(len(p)))
        for k in range(12):
            s = int(rng.integers(2, 5)) if k < 9 else int(rng.integers(8, 14))
            y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
            m = np.zeros((h, w), bool)
            m[y:y + s, x:x + s] = True
            counts.append(rle.encode_mask(m))
            scores.append(float(rng.uniform(0.02, 0.3)))
        cl = np.concatenate([p.classes, np.full(12, -1)])
        out[iid] = Instances(h, w, counts, cl, np.array(scores))
    return out


def test_junk_detections_gain_in_sample_and_cross_validated(base_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    src = run / "models" / "fake--mode=drop_half"
    junk_dir = run / "models" / "junk"
    shutil.copytree(src, junk_dir)
    (junk_dir / "tuning.json").unlink(missing_ok=True)
    preds, header = read_predictions(src / "predictions.jsonl.gz")
    junk = _junk(preds)
    write_predictions(junk_dir / "predictions.jsonl.gz", junk, header["classes"], {"model": "junk"})

    manifest = T.read_manifest(run)
    gt, classes = T.validation_ground_truth(run, manifest)
    plain = evaluate_predictions(gt, preds, classes, resolve_overlaps=True, n_resamples=10, with_coco=False)
    t = T.tune_run(run, ["junk"], echo=lambda *_: None)["junk"]
    assert t["untuned"] < plain["kaggle_map"] - 0.05  # the junk hurts
    assert t["tuned_in_sample"] > t["untuned"] + 0.05
    assert t["tuned_cv"] > t["untuned"] + 0.05
    assert t["tuned_cv"] != t["tuned_in_sample"]  # thresholds fitted without an image do not fit it as well
    assert all(v["score"] > 0.0 or v["min_area"] > 0 for v in t["thresholds"].values())

    # what tune reports in-sample is what applying its thresholds and scoring gives, exactly
    applied = {i: T.apply_tuning(p, t, classes)[0] for i, p in junk.items()}
    ev = evaluate_predictions(gt, applied, classes, resolve_overlaps=False, n_resamples=10, with_coco=False)
    assert ev["kaggle_map"] == pytest.approx(t["tuned_in_sample"], abs=1e-12)


def test_grid_scores_match_the_metric_and_cv_is_honest():
    """Grid scores equal the Kaggle metric on filtered predictions; CV < in-sample when images disagree."""
    from bench.metrics.kaggle import score_image

    rng = np.random.default_rng(1)
    h = w = 40

    def square(y, x, s):
        m = np.zeros((h, w), bool)
        m[y:y + s, x:x + s] = True
        return rle.encode_mask(m)

    tables, gts, preds = [], {}, {}
    for i in range(10):
        # a big cell, a small cell and a junk blob whose sizes and scores vary by image: which thresholds
        # are best depends on the images, so thresholds fitted on other images do worse than in-sample
        cs, js = int(rng.integers(3, 6)), int(rng.integers(3, 6))
        g = Instances(h, w, [square(20, 20, 10), square(2, 2, cs)], np.zeros(2))
        p = Instances(h, w, [square(20, 21, 10), square(2, 2, cs), square(33, 30, js)], np.full(3, -1),
                      np.array([float(rng.uniform(0.5, 1.0)), float(rng.uniform(0.1, 0.8)),
                                float(rng.uniform(0.1, 0.8))]))
        gts[f"im{i}"], preds[f"im{i}"] = (g, "x"), p
        tab = T.build_table(g, p, f"im{i}", "x", ["x"], "single")
        for thr in (0.0, 0.3, 0.55):
            for amin in (0, 10, 80):
                keep = (p.scores >= thr) & (p.areas >= amin)
                assert tab.score(thr, amin) == pytest.approx(score_image(g, p.subset(keep)).score, abs=1e-12)
        tables.append(tab)
    res = T.tune_tables(tables, "single", seed=0, k=3)
    assert res["tuned_in_sample"] >= res["untuned"]
    assert res["tuned_cv"] != res["tuned_in_sample"]
    # smallest threshold on ties: identical images, junk-free -> keep everything
    clean = [T.build_table(gts["im0"][0], preds["im0"].subset([0, 1]), f"c{i}", "x", ["x"], "single")
             for i in range(3)]
    assert T.tune_tables(clean, "single", k=3)["thresholds"]["all"] == {"score": 0.0, "min_area": 0}


def test_predicted_class_and_apply_tuning():
    h = w = 20
    m1 = np.zeros((h, w), bool)
    m1[:5, :5] = True
    m2 = np.zeros((h, w), bool)
    m2[10:12, 10:12] = True
    p = Instances.from_masks(np.stack([m1, m2]), classes=np.array([1, 0]), scores=np.array([0.4, 0.9]))
    assert T.predicted_class(p, ["a", "b"]) == "a"  # score-weighted majority
    assert T.predicted_class(Instances.from_masks(np.stack([m1]), scores=np.ones(1)), ["a", "b"]) is None
    tuning = {"class_source": "predicted", "thresholds": {"all": {"score": 0.0, "min_area": 0},
                                                          "a": {"score": 0.0, "min_area": 10}}}
    out, used = T.apply_tuning(p, tuning, ["a", "b"])
    assert used == "a" and len(out) == 1 and out.areas.tolist() == [25]
    tuning["thresholds"].pop("a")  # a class never seen in tuning falls back to "all"
    out, used = T.apply_tuning(p, tuning, ["a", "b"])
    assert used == "all" and len(out) == 2


def test_tune_errors_name_the_path(tmp_path):
    r = runner.invoke(app, ["tune", str(tmp_path)])
    assert r.exit_code == 2 and "manifest.json" in _out(r)


# ---------------------------------------------------------------------------
# bench predict / submit
# ---------------------------------------------------------------------------

@pytest.fixture()
def image_folder(synth, tmp_path) -> Path:
    """4 PNG and 2 TIF images from the synthetic set, and one corrupt PNG."""
    import tifffile

    from bench.data.io import read_image

    d = tmp_path / "images"
    d.mkdir()
    srcs = sorted((synth / "train").glob("*.png"))[:6]
    for k, p in enumerate(srcs):
        if k < 4:
            shutil.copy(p, d / p.name)
        else:
            tifffile.imwrite(d / f"{p.stem}.tif", read_image(p))
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return d


def test_predict_writes_outputs_and_handles_a_corrupt_image(run_copy, image_folder, tmp_path):
    from PIL import Image

    assert runner.invoke(app, ["tune", str(run_copy), "--models", "watershed"]).exit_code == 0
    out = tmp_path / "pred"
    args = ["predict", "--run", str(run_copy), "--model", "watershed", "--images", str(image_folder), "--out",
            str(out)]
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "broken.png" in _out(r) and "--skip-bad" in _out(r)

    r = runner.invoke(app, args + ["--skip-bad"])
    assert r.exit_code == 0, _out(r)
    assert "skipped" in _out(r) and "broken.png" in _out(r)
    preds, header = read_predictions(out / "predictions.jsonl.gz")
    ids = sorted(p.stem for p in image_folder.iterdir() if p.stem != "broken")
    assert sorted(preds) == ids and header["postprocess"] == "tuned" and header["thresholds"]
    assert any(str(image_folder / "broken.png") == s for s in header["skipped"])
    th = json.loads((run_copy / "models" / "watershed" / "tuning.json").read_text())["thresholds"]["all"]
    for iid, p in preds.items():
        lab = np.asarray(Image.open(out / "labels" / f"{iid}.png"))
        assert lab.dtype == np.uint16 and lab.shape == (p.height, p.width)
        assert int(lab.max()) == len(p) and len(np.unique(lab)) == len(p) + 1
        assert (p.scores >= th["score"]).all() and (p.areas >= th["min_area"]).all()
        ov = np.asarray(Image.open(out / "overlays" / f"{iid}.png"))
        assert ov.shape == (p.height, p.width, 3) and ov.dtype == np.uint8

    raw_out = tmp_path / "raw"
    r = runner.invoke(app, ["predict", "--run", str(run_copy), "--model", "watershed", "--images",
                            str(image_folder), "--out", str(raw_out), "--raw", "--skip-bad", "--label-format", "tif"])
    assert r.exit_code == 0, _out(r)
    raw, rh = read_predictions(raw_out / "predictions.jsonl.gz")
    assert rh["postprocess"] == "raw"
    assert sum(map(len, raw.values())) >= sum(map(len, preds.values()))
    assert sorted(p.stem for p in (raw_out / "labels").glob("*.tif")) == ids


def test_predict_unknown_model_or_missing_run(run_copy, image_folder, tmp_path):
    r = runner.invoke(app, ["predict", "--run", str(run_copy), "--model", "nope", "--images", str(image_folder),
                            "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "nope" in _out(r)
    r = runner.invoke(app, ["submit", "--run", str(tmp_path / "norun"), "--model", "watershed", "--images",
                            str(image_folder), "--out", str(tmp_path / "s.csv")])
    assert r.exit_code == 2 and "norun" in _out(r)


def test_submit_is_valid_and_scored_by_eval(run_copy, synth, tmp_path):
    assert runner.invoke(app, ["tune", str(run_copy), "--models", "watershed"]).exit_code == 0
    sub = tmp_path / "submission.csv"
    r = runner.invoke(app, ["submit", "--run", str(run_copy), "--model", "watershed", "--images",
                            str(synth / "train"), "--out", str(sub)])
    assert r.exit_code == 0, _out(r)
    rows = list(csv.reader(sub.open()))
    assert rows[0] == ["id", "predicted"]
    ids = [x[0] for x in rows[1:]]
    assert ids == sorted(ids) and set(ids) == {p.stem for p in (synth / "train").glob("*.png")}
    masks = 0
    for _, runs in (r for r in rows[1:] if r[1]):  # Kaggle RLE: 1-based (start, length) pairs, in order, inside
        v = np.array(runs.split(), dtype=np.int64)
        starts, lengths = v[0::2], v[1::2]
        assert v.size % 2 == 0 and starts.min() >= 1 and (lengths > 0).all()
        assert (starts[1:] >= starts[:-1] + lengths[:-1]).all() and starts[-1] + lengths[-1] - 1 <= 128 * 128
        masks += 1
    assert masks > 0

    res_json = tmp_path / "eval.json"
    r = runner.invoke(app, ["eval", "--gt", str(synth / "train.csv"), "--pred", str(sub), "--json", str(res_json)])
    assert r.exit_code == 0, _out(r)
    res = json.loads(res_json.read_text())
    assert res["n_images"] == 24 and res["missing_predictions"] == [] and 0 < res["kaggle_map"] <= 1

    # the same score as applying the model and its tuning in Python
    from bench.data.io import read_sartorius
    from bench.infer import infer_folder, list_images, load_model

    ds = read_sartorius(synth)
    lm = load_model(run_copy, "watershed", "cpu")
    inf = infer_folder(lm, list_images(synth / "train"), "tuned", progress=False)
    ref = evaluate_predictions({s.image_id: (s.instances, s.cell_type(ds.classes)) for s in ds}, inf.preds,
                               ds.classes, n_resamples=10, with_coco=False)
    assert res["kaggle_map"] == pytest.approx(ref["kaggle_map"], abs=1e-12)


def test_submit_empty_image_row_and_checked_before_written(run_copy, tmp_path, monkeypatch):
    from PIL import Image

    import bench.infer as infer

    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray(np.full((64, 80), 120, np.uint8)).save(d / "blank.png")
    rng = np.random.default_rng(0)
    cells = np.full((64, 80), 100, np.uint8)
    for y, x in rng.integers(8, 56, size=(6, 2)):
        cells[y - 5:y + 5, x - 5:x + 5] = 220
    Image.fromarray(cells).save(d / "cells.png")
    sub = tmp_path / "sub.csv"
    args = ["submit", "--run", str(run_copy), "--model", "watershed", "--images", str(d), "--out", str(sub)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, _out(r)
    rows = list(csv.reader(sub.open()))
    assert ["blank", ""] in rows and sum(x[0] == "cells" for x in rows) >= 1
    back = read_submission(sub, {"blank": (64, 80), "cells": (64, 80)})
    assert len(back["blank"]) == 0

    # a file that fails the check is never put at --out, and no temp file is left behind
    def bad(*a, **k):
        raise DataError(a[0], "rows are not sorted by id")

    monkeypatch.setattr(infer, "check_submission", bad)
    sub2 = tmp_path / "sub2.csv"
    r = runner.invoke(app, args[:-1] + [str(sub2)])
    assert r.exit_code == 2 and "not sorted" in _out(r)
    assert not sub2.exists() and sorted(os.listdir(tmp_path)) == sorted(["imgs", "run", "sub.csv"])


def test_check_submission_rejects_bad_files(tmp_path):
    from bench.infer import check_submission

    m = np.zeros((10, 10), bool)
    m[2:5, 2:5] = True
    p = Instances.from_masks(m[None], scores=np.ones(1))
    sizes = {"a": (10, 10), "b": (10, 10)}
    preds = {"a": p, "b": Instances.empty(10, 10)}
    enc = rle.kaggle_encode(p.counts[0], 10, 10)
    f = tmp_path / "s.csv"
    f.write_text(f"id,predicted\nb,\na,{enc}\n")
    with pytest.raises(DataError, match="not sorted"):
        check_submission(f, preds, sizes, [])
    f.write_text(f"id,predicted\na,{enc}\n")
    with pytest.raises(DataError, match="no row"):
        check_submission(f, preds, sizes, [])
    f.write_text(f"id,predicted\na,{enc}\na,{enc}\nb,\n")
    with pytest.raises(DataError, match="2 masks read back"):
        check_submission(f, preds, sizes, [])
    f.write_text(f"id,predicted\na,{enc}\nb,\n")
    assert check_submission(f, preds, sizes, []) == 2


def test_help_of_every_command():
    for cmd in ("tune", "predict", "submit"):
        r = runner.invoke(app, [cmd, "--help"])
        assert r.exit_code == 0 and "Usage" in r.output


def test_submit_on_real_sartorius_images(run_copy, shared, tmp_path):
    """The real images in ../shared (3 test images, 1 train image): a valid file, one row set per image."""
    srcs = [*sorted((shared / "sartorius_gallegi_t4e" / "demo_images").glob("*.png")),
            shared / "sartorius_dethub" / "0030fd0e6378.png"]
    srcs = [p for p in srcs if p.is_file()]
    if not srcs:
        pytest.skip("real Sartorius images not present")
    d = tmp_path / "real"
    d.mkdir()
    for p in srcs:
        shutil.copy(p, d / p.name)
    sub = tmp_path / "real.csv"
    r = runner.invoke(app, ["submit", "--run", str(run_copy), "--model", "watershed", "--images", str(d),
                            "--out", str(sub)])
    assert r.exit_code == 0, _out(r)
    rows = list(csv.reader(sub.open()))[1:]
    assert {x[0] for x in rows} == {p.stem for p in srcs}
    back = read_submission(sub, {p.stem: (520, 704) for p in srcs})
    from bench.metrics.matching import overlapping_pixels

    assert all(overlapping_pixels(b.counts) == 0 for b in back.values())
