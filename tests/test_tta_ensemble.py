"""TTA (bench/tta.py), mask fusion (bench/fusion.py) and ensembles (bench/ensemble.py, bench sweep)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.adapters import registry
from bench.adapters.base import Capabilities
from bench.adapters.registry import ConfigError
from bench.data import rle
from bench.data.errors import DataError
from bench.data.sample import Instances
from bench.fusion import fuse_sets
from bench.tta import Aug, check_supported, invert, parse_tta, transform_image

PLUGINS = Path(__file__).parent / "plugins"


def _box(h, w, y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _inst(masks, scores, classes) -> Instances:
    return Instances.from_masks(np.stack(masks), np.asarray(classes), np.asarray(scores, float))


def _masks(inst: Instances) -> list[np.ndarray]:
    return [inst.dense(i) for i in range(len(inst))]


# ---------------------------------------------------------------------------
# fusion: two fake models whose fused answer is known by construction
# ---------------------------------------------------------------------------

H = W = 20
X, X2 = _box(H, W, 2, 8, 2, 8), _box(H, W, 2, 8, 3, 9)      # the same cell, shifted by a column (IoU 30/42)
Y, Z = _box(H, W, 12, 18, 12, 18), _box(H, W, 2, 6, 14, 18)  # one cell only A sees, one only B sees
A = _inst([X, Y], [0.9, 0.8], [0, 1])
B = _inst([X2, Z], [0.7, 0.6], [2, 1])
WTS = [0.6, 0.4]


def test_score_average_by_construction():
    out = fuse_sets([A, B], WTS, "score-average")
    # X cluster: pixels with >= half the present weight (1.0): A's (0.6) yes, B's alone (0.4) no
    assert len(out) == 3
    np.testing.assert_allclose(out.scores, [0.6 * 0.9 + 0.4 * 0.7, 0.6 * 0.8, 0.4 * 0.6])
    assert [(m == e).all() for m, e in zip(_masks(out), [X, Y, Z])] == [True, True, True]
    assert out.classes.tolist() == [0, 1, 1]   # X: A's class outvotes B's (0.54 vs 0.28)


def test_mask_vote_by_construction():
    out = fuse_sets([A, B], WTS, "mask-vote")
    # Z is drawn by 0.4 of the total weight only: gone; Y by 0.6: kept with A's score
    assert len(out) == 2
    np.testing.assert_allclose(out.scores, [0.82, 0.8])
    assert (out.dense(0) == X).all() and (out.dense(1) == Y).all()


def test_wbf_masks_by_construction():
    out = fuse_sets([A, B], WTS, "wbf-masks")
    np.testing.assert_allclose(out.scores, [0.82, 0.8 * 0.5, 0.6 * 0.5])
    assert [(m == e).all() for m, e in zip(_masks(out), [X, Y, Z])] == [True, True, True]
    union = fuse_sets([A, B], [0.5, 0.5], "score-average")   # equal weights: >= half of 2 votes = the union
    assert (union.dense(0) == (X | X2)).all()


def test_fusing_a_set_with_itself_returns_it():
    for method in ("score-average", "mask-vote", "wbf-masks"):
        for sets in ([A], [A, A, A]):
            out = fuse_sets(sets, None, method)
            assert len(out) == len(A)
            np.testing.assert_allclose(out.scores, A.scores)
            assert all((m == e).all() for m, e in zip(_masks(out), [X, Y]))


def test_fusion_refuses_bad_input():
    with pytest.raises(ValueError, match="1 weight.*for 2"):
        fuse_sets([A, B], [1.0])
    with pytest.raises(ValueError, match="sum to 0"):
        fuse_sets([A, B], [0, 0])
    with pytest.raises(ValueError, match="unknown fusion method"):
        fuse_sets([A, B], None, "nms")
    with pytest.raises(ValueError, match="different image sizes"):
        fuse_sets([A, Instances.empty(10, 10)])


# ---------------------------------------------------------------------------
# TTA: grammar, capability, inverse transforms
# ---------------------------------------------------------------------------

def test_tta_grammar_and_capability_refusal():
    assert [a.name for a in parse_tta("flip")] == ["identity", "hflip", "vflip", "hvflip"]
    assert [a.name for a in parse_tta("flip+scale")] == ["identity", "hflip", "vflip", "hvflip", "scale0.8",
                                                        "scale1.25"]
    assert [a.name for a in parse_tta("none")] == ["identity"]
    with pytest.raises(ValueError, match="unknown part 'rot90'"):
        parse_tta("flip+rot90")
    with pytest.raises(ValueError, match="outside"):
        parse_tta("scale9")
    # refused before anything trains, naming what the adapter supports and why
    with pytest.raises(ConfigError, match=r"needs scale.*min_size.*supports: flip"):
        registry.make_config("maskrcnn-tv", "smoke", {"tta": "flip+scale"})
    with pytest.raises(ConfigError, match="unknown part"):
        registry.make_config("watershed", "smoke", {"tta": "rot90"})
    assert registry.make_config("watershed", "smoke", {"tta": "FLIP+scale"}).tta == "flip+scale"
    with pytest.raises(ValueError, match="no TTA"):
        check_supported("x", Capabilities(predicts_classes=False, overlapping_masks=False, tta=()), "hflip")
    # Cellpose's own flips are native_tta; an older run's `tta: true` still means them
    cp = registry.get("cellpose").Config(tta=True)
    assert cp.native_tta is True and cp.tta == "none"


def test_run_refuses_tta_an_adapter_cannot_invert(tmp_path, tiny_synth, monkeypatch):
    from bench.runner.run import run_benchmark

    monkeypatch.setenv("CELLBENCH_PLUGINS", str(PLUGINS / "fake_tta.py"))
    registry.load_plugins()
    with pytest.raises(ConfigError, match="fake-noinvert.*cropped frame"):
        run_benchmark(["fake-noinvert:tta=flip"], str(tiny_synth), "smoke", "cpu", 0, tmp_path / "run",
                      results=tmp_path / "results", echo=lambda *_: None)
    assert not (tmp_path / "run").exists()


def test_flip_inverse_is_exact_and_scale_inverse_close():
    rng = np.random.default_rng(0)
    h, w = 37, 53
    masks = [_box(h, w, *sorted(rng.integers(0, h, 2) + [0, 3]), *sorted(rng.integers(0, w, 2) + [0, 4]))
             for _ in range(5)]
    inst = _inst(masks, np.ones(5), np.zeros(5))
    for aug, f in ((Aug(True, False), lambda m: m[:, ::-1]), (Aug(False, True), lambda m: m[::-1]),
                   (Aug(True, True), lambda m: m[::-1, ::-1])):
        pred_on_flipped = _inst([f(m) for m in masks], np.ones(5), np.zeros(5))
        back = invert(pred_on_flipped, aug, h, w)
        assert all((b == m).all() for b, m in zip(_masks(back), masks))
    from skimage.transform import resize

    big = _box(60, 80, 10, 40, 20, 70)
    for s in (0.8, 1.25):
        small = resize(big.astype(float), (round(60 * s), round(80 * s)), order=1) >= 0.5
        back = invert(_inst([small], [1.0], [0]), Aug(scale=s), 60, 80).dense(0)
        iou = (back & big).sum() / (back | big).sum()
        assert iou > 0.95
    img = (np.arange(60 * 80) % 251).astype(np.uint8).reshape(60, 80)
    assert transform_image(img, Aug(scale=1.25)).shape == (75, 100)
    assert transform_image(img, Aug(scale=1.25)).dtype == np.uint8


# ---------------------------------------------------------------------------
# TTA end to end on a real adapter (watershed, through the runner)
# ---------------------------------------------------------------------------

def test_tta_end_to_end_on_watershed(tmp_path, tiny_synth):
    from bench.data.predictions import read_predictions
    from bench.runner.run import run_benchmark
    from bench.tta import read_raw_outputs

    run_dir, out = run_benchmark(["watershed", "watershed:tta=flip"], str(tiny_synth), "smoke", "cpu", 0,
                                 tmp_path / "run", results=tmp_path / "results", echo=lambda *_: None)
    assert [o.state for o in out] == ["done", "done"]
    plain_dir, tta_dir = run_dir / "models" / "watershed", run_dir / "models" / "watershed--tta=flip"
    plain, _ = read_predictions(plain_dir / "predictions.jsonl.gz")
    raw, header = read_raw_outputs(tta_dir / "raw_outputs.jsonl.gz")
    assert set(raw) == set(plain)
    for iid, passes in raw.items():
        assert list(passes) == ["identity", "hflip", "vflip", "hvflip"]
        # the identity pass is the model without TTA, mask for mask
        assert [c.tolist() for c in passes["identity"].counts] == [c.tolist() for c in plain[iid].counts]
    merged, _ = read_predictions(tta_dir / "predictions.jsonl.gz")
    for p in merged.values():     # watershed declares non-overlapping masks: the merge keeps that promise
        lab = np.zeros(p.height * p.width, int)
        for c in p.counts:
            lab[rle.pixel_indices(c)] += 1
        assert lab.max() <= 1
    t = json.loads((tta_dir / "metrics.json").read_text())["timings"]
    assert t["tta"] == "flip" and len(t["tta_passes"]) == 4
    assert t["tta_factor"] > 1.5 and t["infer_ms_per_image"] > t["tta_identity_ms_per_image"]


# ---------------------------------------------------------------------------
# bench ensemble on a run (fake models whose predictions are known)
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake_run_once(tmp_path_factory, tiny_synth):
    """One run of two fake models (perfect, and half the cells), shared: each test fuses a copy."""
    from bench.runner.run import run_benchmark

    tmp = tmp_path_factory.mktemp("fake_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CELLBENCH_PLUGINS", str(PLUGINS / "fake_adapter.py"))
        registry.load_plugins()
        run_dir, out = run_benchmark(["fake", "fake:mode=drop_half"], str(tiny_synth), "smoke", "cpu", 0,
                                     tmp / "run", results=tmp / "results", echo=lambda *_: None)
    assert [o.state for o in out] == ["done", "done"]
    return run_dir


@pytest.fixture
def fake_run(fake_run_once, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("CELLBENCH_PLUGINS", str(PLUGINS / "fake_adapter.py"))
    return Path(shutil.copytree(fake_run_once, tmp_path / "run"))


def test_ensemble_of_two_fakes_is_a_leaderboard_row(fake_run, tmp_path):
    from bench.ensemble import build_ensemble
    from bench.report.leaderboard import aggregate, load_runs

    # perfect + half: mask-vote with weights 1:0 is the perfect model; equal weights keep only what
    # both saw (the half), at the mean score
    res = build_ensemble(fake_run, ["fake", "fake--mode=drop_half"], "ens-first", "mask-vote", [1, 0], tune=False,
                         echo=lambda *_: None)
    assert res["kaggle_map"] == pytest.approx(1.0)
    half = json.loads((fake_run / "models" / "fake--mode=drop_half" / "metrics.json").read_text())
    res2 = build_ensemble(fake_run, ["fake", "fake--mode=drop_half"], "ens-vote", "mask-vote", None, tune=False,
                          echo=lambda *_: None)
    # equal weights: >= half of the total weight, so each member's cells survive (0.5 each) ...
    assert res2["kaggle_map"] == pytest.approx(1.0)
    res3 = build_ensemble(fake_run, ["fake", "fake--mode=drop_half"], "ens-vote-heavy", "mask-vote", [0.4, 0.6],
                          tune=False, echo=lambda *_: None)
    # ... and with the weight on the half model, the cells only the perfect model saw (0.4) are dropped
    assert res3["kaggle_map"] == pytest.approx(half["kaggle_map"], abs=0.01)
    assert set(res["paired_vs_members"]) == {"fake", "fake--mode=drop_half"}
    assert res["paired_vs_members"]["fake--mode=drop_half"]["verdict"] == "better"
    t = res["timings"]
    member_ms = sum(json.loads((fake_run / "models" / m / "metrics.json").read_text())["timings"]
                    ["infer_ms_per_image"] for m in ("fake", "fake--mode=drop_half"))
    assert t["infer_ms_per_image"] == pytest.approx(member_ms + t["fusion_ms_per_image"])
    rows = {r["model"]: r for r in aggregate(load_runs([fake_run]))}
    assert rows["ens-first"]["state"] == "done" and rows["ens-first"]["framework"].startswith("cellbench ensemble")


def test_ensemble_tuning_is_cross_validated(fake_run):
    from bench.ensemble import build_ensemble

    res = build_ensemble(fake_run, ["fake", "fake--mode=drop_half"], "ens-cv", "score-average", None, tune=True,
                         k=3, echo=lambda *_: None)
    t = res["tuning"]
    assert t["tuned_in_sample"] >= t["untuned"] - 1e-12
    assert res["kaggle_map"] == pytest.approx(t["tuned_cv"])   # the leaderboard number is the CV one
    rec = json.loads((fake_run / "models" / "ens-cv" / "ensemble.json").read_text())
    folds = rec["tuning"]["folds"]
    assert len(folds) == min(3, len(res["per_image"]))
    assert sorted(i for f in folds for i in f["images"]) == sorted(res["per_image"])


def test_ensemble_refuses_bad_input(fake_run, tmp_path, tiny_synth):
    from bench.ensemble import build_ensemble, parse_weights
    from bench.runner.run import run_benchmark

    quiet = dict(echo=lambda *_: None)
    with pytest.raises(ValueError, match="3 weight.*2 model"):
        parse_weights("1,2,3", 2)
    with pytest.raises(ValueError, match="1 weight.*for 2"):
        build_ensemble(fake_run, ["fake", "fake--mode=drop_half"], "e", weights=[1.0], **quiet)
    with pytest.raises(ValueError, match="at least 2"):
        build_ensemble(fake_run, ["fake"], "e", **quiet)
    with pytest.raises(DataError, match="no model 'nope'"):
        build_ensemble(fake_run, ["fake", "nope"], "e", **quiet)
    with pytest.raises(ValueError, match="--method"):
        build_ensemble(fake_run, ["fake", "fake--mode=drop_half"], "e", method="nms", **quiet)
    # a model of another split (other validation fraction): refused, naming both split hashes
    other, _ = run_benchmark(["fake"], str(tiny_synth), "smoke", "cpu", 5, tmp_path / "other", val_fraction=0.5,
                             results=tmp_path / "results", **quiet)
    h1 = json.loads((fake_run / "manifest.json").read_text())["split_hash"]
    h2 = json.loads((other / "manifest.json").read_text())["split_hash"]
    assert h1 != h2
    with pytest.raises(DataError, match=f"split {h2}.*split {h1}"):
        build_ensemble(fake_run, ["fake", str(other / "models" / "fake")], "e", **quiet)
    # a model without cached outputs: says how to get them
    (fake_run / "models" / "fake--mode=drop_half" / "predictions.jsonl.gz").unlink()
    with pytest.raises(DataError, match="no cached outputs.*--resume"):
        build_ensemble(fake_run, ["fake", "fake--mode=drop_half"], "e", **quiet)
    assert not (fake_run / "models" / "e").exists()


# ---------------------------------------------------------------------------
# sweeps: tta as an option, ensemble as a variant kind
# ---------------------------------------------------------------------------

def test_sweep_with_tta_option_and_ensemble_variant(tmp_path, tiny_synth):
    from bench.report.sweep_report import load_sweep_results, summarise
    from bench.sweep import load_sweep, run_sweep

    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"""
name: tta-ens
base: {{model: watershed, preset: smoke, data: {tiny_synth}}}
variants:
  base: {{}}
  tta-flip: {{options: {{tta: flip}}}}
  otsu-low: {{options: {{threshold_scale: 0.8}}}}
  ens: {{ensemble: {{members: [base, otsu-low], method: score-average, tune: false}}}}
""")
    out, states = run_sweep(cfg, out=tmp_path / "sweep", results=tmp_path / "results", echo=lambda *_: None,
                            variants=["ens", "tta-flip"])
    assert {k: v["state"] for k, v in states.items()} == {
        "tta-flip/seed0": "done", "base/seed0": "done", "otsu-low/seed0": "done", "ens/seed0": "done"}
    manifest, recs = load_sweep_results(out)
    rows = {r["variant"]: r for r in summarise(manifest, recs, n_resamples=200)}
    assert rows["ens"]["model"] == "ensemble(base+otsu-low)" and rows["ens"]["verdict"]
    assert rows["tta-flip"]["kaggle_map"] is not None
    bad = tmp_path / "bad.yaml"
    bad.write_text(cfg.read_text().replace("members: [base, otsu-low]", "members: [base, nope]"))
    with pytest.raises(ConfigError, match="member 'nope'"):
        load_sweep(bad)
    bad.write_text(cfg.read_text().replace("tune: false", "tune: false, weights: [1]"))
    with pytest.raises(ConfigError, match="1 weight"):
        load_sweep(bad)


def test_shipped_tta_ensemble_sweep_validates():
    from bench.sweep import load_sweep, validate_plan, with_members

    path = Path(__file__).parent.parent / "configs" / "experiments" / "tta-ensemble-smoke.yaml"
    cfg = load_sweep(path)
    chosen = with_members(cfg, ["ens-cellpose-maskrcnn", "cascade-tta-flip"])
    assert chosen[-1] == "ens-cellpose-maskrcnn" and {"cellpose", "maskrcnn-tv"} <= set(chosen)
    validate_plan(cfg, path, chosen, None, {})


def test_resuming_a_run_recorded_before_the_tta_option(tmp_path, tiny_synth):
    """A run whose manifest predates ``tta`` (and Cellpose's ``tta: bool``) resumes: an option added
    since takes its default, a renamed one its new name; a real change is still refused."""
    from bench.runner.run import _as_now, run_benchmark

    assert _as_now("cellpose", {"tta": True})["native_tta"] is True
    quiet = dict(results=tmp_path / "results", echo=lambda *_: None)
    run_dir, _ = run_benchmark(["watershed"], str(tiny_synth), "smoke", "cpu", 0, tmp_path / "run", **quiet)
    m = json.loads((run_dir / "manifest.json").read_text())
    del m["configs"]["watershed"]["tta"]
    (run_dir / "manifest.json").write_text(json.dumps(m))
    _, out = run_benchmark(["watershed"], str(tiny_synth), "smoke", "cpu", 0, run_dir, resume=True, **quiet)
    assert [o.state for o in out] == ["done"]
    m["configs"]["watershed"]["threshold_scale"] = 2.0
    (run_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="threshold_scale"):
        run_benchmark(["watershed"], str(tiny_synth), "smoke", "cpu", 0, run_dir, resume=True, **quiet)
