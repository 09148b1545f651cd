"""Sweeps: variants x seeds through the runner on one split, resume, the report's CIs and verdicts.

The machinery is tested with the fake adapter (its scores are known); the study's own smoke
sweep file runs for real on torchvision's Mask R-CNN in the last test.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from bench.adapters import registry
from bench.adapters.registry import ConfigError
from bench.metrics.bootstrap import bootstrap_ci, paired_seeds_images, seeds_images_ci
from bench.report.sweep_report import load_sweep_results, summarise, write_sweep_report
from bench.sweep import load_sweep, parse_sets, run_sweep

FAKE = str(Path(__file__).parent / "plugins" / "fake_adapter.py")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fake_plugin(monkeypatch):
    monkeypatch.setenv("CELLBENCH_PLUGINS", FAKE)
    registry.load_plugins()


def _sweep_file(tmp_path: Path, **changes) -> Path:
    doc = {
        "name": "fake-study", "description": "fake", "study_source": "nowhere",
        "base": {"model": "fake", "preset": "smoke", "options": {"iterations": 4}},
        "seeds": [0, 1], "reference": "base",
        "variants": {
            "base": {"study": {"value": 0.27}},
            "half": {"options": {"mode": "drop_half"}, "study": {"value": 0.25, "reference": 0.27}},
            "curve": {"options": {"eval_every": 2}},
            "broken": {"options": {"mode": "crash_fit"}},
            "retrain": {"pretrain": [{"data": "split:train+val"}], "options": {"iterations": 2}},
        },
    }
    doc.update(changes)
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def _counts(d: Path) -> int:
    return int((d / "fit.count").read_text()) if (d / "fit.count").is_file() else 0


def test_sweep_runs_every_variant_and_seed_on_one_split(tmp_path, tiny_synth):
    counter = tmp_path / "count"
    counter.mkdir()
    cfg = _sweep_file(tmp_path)
    sweep, states = run_sweep(cfg, data=str(tiny_synth), out=tmp_path / "sw", results=tmp_path / "results",
                              sets={"counter_dir": str(counter)}, echo=lambda *_: None)
    assert set(states) == {f"{v}/seed{s}" for v in ("base", "half", "curve", "broken", "retrain") for s in (0, 1)}
    assert states["broken/seed0"]["state"] == "failed" and states["base/seed1"]["state"] == "done"
    manifest = json.loads((sweep / "sweep.json").read_text())
    for key in ("config", "config_hash", "seeds", "split_hash", "packages", "git_commit", "device", "runs"):
        assert key in manifest
    # every run (stages included) on the sweep's one split, the stage trained on train + val
    split = json.loads((sweep / "split.json").read_text())
    for run_manifest in sweep.glob("runs/*/seed*/manifest.json"):
        assert json.loads(run_manifest.read_text())["split_hash"] == split["hash"]
    stage = json.loads((sweep / "runs/retrain/seed0-pretrain0/manifest.json").read_text())
    assert stage["train_on"] == "train+val"
    log = (sweep / "runs/retrain/seed0/models/fake/train_log.jsonl").read_text().splitlines()
    first = json.loads(log[0])
    assert first["started_from"].endswith("seed0-pretrain0/models/fake/checkpoint/fake.json")
    assert first["n_train"] == len(split["train"])
    stage_log = [json.loads(x) for x in (sweep / "runs/retrain/seed0-pretrain0/models/fake/train_log.jsonl")
                 .read_text().splitlines()]
    assert "started_from" not in stage_log[0]
    # the stage trains with the base options (4 iterations), the variant's own fit with its options (2)
    assert [r["step"] for r in stage_log] == [1, 2, 3, 4]
    assert [json.loads(x).get("step") for x in log[1:]] == [1, 2]
    assert _counts(counter) == 2 * 5 + 2  # 5 variants x 2 seeds + 2 stages
    curve = [json.loads(x) for x in (sweep / "runs/curve/seed0/models/fake/val_curve.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve] == [2, 4] and curve[-1]["kaggle_map"] == pytest.approx(1.0)

    # the report: one row per variant, CIs over seeds x images, verdicts against the base
    manifest, recs = load_sweep_results(sweep)
    rows = {r["variant"]: r for r in summarise(manifest, recs, n_resamples=300)}
    assert rows["base"]["verdict"] == "reference" and rows["base"]["kaggle_map"] == pytest.approx(1.0)
    assert rows["half"]["verdict"] == "worse" and rows["half"]["p_better"] == 0.0
    assert rows["half"]["ci95"][0] <= rows["half"]["kaggle_map"] <= rows["half"]["ci95"][1] < 1.0
    assert rows["curve"]["verdict"] == "not distinguishable" and rows["curve"]["curve"][-1][0] == 4
    assert rows["retrain"]["verdict"].endswith("(in-sample)")
    assert rows["broken"]["state"] == "failed" and "kaggle_map" not in rows["broken"]
    assert rows["half"]["study_value"] == 0.25 and rows["half"]["study_reference"] == 0.27
    paths = write_sweep_report(sweep)
    md = (sweep / "report" / "sweep.md").read_text()
    assert "| half | fake | 2 |" in md and "worse" in md and "0.2500 (vs 0.2700)" in md and "theirs" in md
    table = list(csv.DictReader(open(sweep / "report" / "sweep.csv")))
    assert [r["variant"] for r in table] == ["base", "half", "curve", "broken", "retrain"]
    assert {p.name for p in paths} >= {"sweep_variants.png", "sweep_val_curves.png", "sweep_speed_accuracy.png"}


def test_resume_redoes_nothing_finished_and_adds_seeds(tmp_path, tiny_synth):
    counter = tmp_path / "count"
    counter.mkdir()
    cfg = _sweep_file(tmp_path, seeds=[0], variants={"base": {}, "half": {"options": {"mode": "drop_half"}}})
    kw = dict(data=str(tiny_synth), out=tmp_path / "sw", results=tmp_path / "results",
              sets={"counter_dir": str(counter)}, echo=lambda *_: None)
    run_sweep(cfg, **kw)
    assert _counts(counter) == 2
    with pytest.raises(FileExistsError, match="--resume"):
        run_sweep(cfg, **kw)
    _, states = run_sweep(cfg, resume=True, **kw)
    assert _counts(counter) == 2 and all(s["state"] == "done" for s in states.values())
    _, states = run_sweep(cfg, seeds=[1], resume=True, **kw)  # a seed added: only its runs train
    assert _counts(counter) == 4 and set(states) == {f"{v}/seed{s}" for v in ("base", "half") for s in (0, 1)}
    # a seed added in the file, --set not repeated (the sweep's own is kept): only the new seed trains
    more = _sweep_file(tmp_path, seeds=[0, 2], variants={"base": {}, "half": {"options": {"mode": "drop_half"}}})
    _, states = run_sweep(more, resume=True, **{k: v for k, v in kw.items() if k != "sets"})
    assert _counts(counter) == 6 and {k.split("/")[1] for k in states} == {"seed0", "seed1", "seed2"}
    with pytest.raises(ValueError, match="--data"):
        run_sweep(cfg, resume=True, **{**kw, "data": str(tmp_path)})
    changed = _sweep_file(tmp_path, seeds=[0], variants={"base": {}, "half": {"options": {"mode": "ok"}}})
    with pytest.raises(ValueError, match="changed"):
        run_sweep(changed, resume=True, **kw)


@pytest.mark.parametrize("change, message", [
    ({"variants": {"base": {"options": {"no_such_key": 1}}}}, "variant base.*no_such_key"),
    ({"reference": "nope"}, "reference variant 'nope'"),
    ({"variants": {"base": {"model": "nosuchmodel"}}}, "unknown model 'nosuchmodel'"),
    ({"variants": {"bad/name": {}}}, "folder-safe"),
    ({"name": "../up"}, "folder-safe"),
    ({"seeds": [0, 0]}, "seeds repeat"),
    ({"variants": {"base": {"pretrain": [{"data": "split:train+val", "options": {"mode": "nope"}}]}}}, "mode"),
    ({"variants": {"base": {"pretrain": [{"data": "builtin:nope"}]}}}, "unknown built-in dataset"),
    ({"variants": {"base": {"pretrain": [{"data": "/no/such/livecell.json"}]}}}, "neither a dataset path"),
])
def test_bad_sweep_files_fail_before_training_naming_the_file(tmp_path, change, message):
    cfg = _sweep_file(tmp_path, **change)
    with pytest.raises(ConfigError, match=message) as e:
        run_sweep(cfg, out=tmp_path / "sw", results=tmp_path / "results", echo=lambda *_: None)
    assert str(cfg) in str(e.value)
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize("name", ["study.yaml", "study-smoke.yaml"])
def test_shipped_study_sweeps_validate(name):
    """Every variant of the shipped sweeps builds its model config (a typo would fail here, not on a GPU)."""
    from bench.sweep import validate_plan

    path = REPO / "configs" / "experiments" / name
    cfg = load_sweep(path)
    validate_plan(cfg, path, list(cfg.variants), None, {})
    assert cfg.reference in cfg.variants


def test_the_smoke_study_quotes_the_studys_figures_unchanged():
    """study-smoke.yaml runs the study's variants at CPU scale; the figures it quotes are the study's."""
    def figures(name):
        cfg = load_sweep(REPO / "configs" / "experiments" / name)
        return sorted((x.study.value, x.study.reference or 0.0) for x in cfg.variants.values() if x.study)

    full, smoke = figures("study.yaml"), figures("study-smoke.yaml")
    assert full and smoke == full


def test_unknown_variant_and_set_key_are_errors(tmp_path):
    cfg = _sweep_file(tmp_path)
    with pytest.raises(ConfigError, match="nope"):
        run_sweep(cfg, variants=["nope"], out=tmp_path / "sw", echo=lambda *_: None)
    with pytest.raises(ConfigError, match="fake has no option 'lr'"):  # --set: every model must have the key
        run_sweep(cfg, sets=parse_sets(["lr=0.1"]), out=tmp_path / "sw", echo=lambda *_: None)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_sets(["lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_sweep(tmp_path / "missing.yaml")


def test_seeds_and_images_bootstrap():
    rng = np.random.default_rng(0)
    one = rng.uniform(0, 1, (1, 40))
    assert seeds_images_ci(one, 500) == pytest.approx(bootstrap_ci(one[0], 500))
    # seed-to-seed spread widens the interval beyond the image spread alone
    spread = one + np.array([[-0.1], [0.0], [0.1]])
    lo, hi = seeds_images_ci(spread, 500)
    lo1, hi1 = seeds_images_ci(spread[1:2], 500)
    assert hi - lo > hi1 - lo1
    same = paired_seeds_images(one, one, 500)
    assert same.diff == 0 and same.verdict == "not distinguishable" and same.p_a_better == 0.5  # ties: half
    better = paired_seeds_images(one + 0.05, one, 500)
    assert better.verdict == "better" and better.p_a_better == 1.0
    with pytest.raises(ValueError, match="same images"):
        paired_seeds_images(one, one[:, :10])


@pytest.mark.slow
def test_study_smoke_sweep_runs_end_to_end_on_a_tiny_subset(tmp_path, tiny_synth, monkeypatch):
    """The shipped study-smoke.yaml, two variants (and a LIVECell stand-in pretraining), one seed,
    real torchvision Mask R-CNN training, through the CLI; the report shows CIs and verdicts."""
    from typer.testing import CliRunner

    from bench.cli import app

    monkeypatch.chdir(tmp_path)  # results/cache (the LIVECell stand-in) lands in tmp
    sets = ["iterations=6", "eval_every=3", "min_size=128", "max_size=128", "min_size_train=[112,128]",
            "warmup_iters=2", "lr_steps=[5]", "box_score_thresh=0.0", "detections_per_image=50"]
    args = ["sweep", str(REPO / "configs/experiments/study-smoke.yaml"), "--variants",
            "base,adam-lower-lr,pretrain-livecell", "--seeds", "0", "--data", str(tiny_synth), "--device", "cpu",
            "--out", str(tmp_path / "sw")] + [x for s in sets for x in ("--set", s)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    md = (tmp_path / "sw" / "report" / "sweep.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"base", "adam-lower-lr", "pretrain-livecell"}
    assert "reference" in rows["base"] and "0.2725" in rows["base"]
    for v in ("adam-lower-lr", "pretrain-livecell"):
        assert any(w in rows[v] for w in ("better", "worse", "not distinguishable")), rows[v]
        assert "[" in rows[v]  # the CI
    stage = tmp_path / "sw/runs/pretrain-livecell/seed0-pretrain0/manifest.json"
    assert json.loads(stage.read_text())["dataset"] == "livecell_like"
    curve = (tmp_path / "sw/runs/base/seed0/models/maskrcnn-tv/val_curve.jsonl").read_text().splitlines()
    assert [json.loads(c)["step"] for c in curve] == [3, 6]
    assert (tmp_path / "sw" / "report" / "sweep_val_curves.png").is_file()


def test_resumed_run_refuses_a_changed_config(tmp_path, tiny_synth):
    from bench.runner.run import run_benchmark

    kw = dict(out=tmp_path / "run", results=tmp_path / "results", echo=lambda *_: None)
    run_benchmark(["fake"], str(tiny_synth), "smoke", "cpu", 0, overrides={"fake": {"iterations": 3}}, **kw)
    run_benchmark(["fake"], str(tiny_synth), "smoke", "cpu", 0, resume=True, overrides={"fake": {"iterations": 3}},
                  **kw)
    with pytest.raises(ValueError, match="another config.*iterations"):
        run_benchmark(["fake"], str(tiny_synth), "smoke", "cpu", 0, resume=True,
                      overrides={"fake": {"iterations": 5}}, **kw)
