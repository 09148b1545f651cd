"""Issue 14: per-image attributes (DSB2018's modality, LIVECell's cell line, Sartorius' cell type)
as ``--breakdown ATTR`` of ``bench eval`` and ``bench report``, and the split stratified by them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.data import rle
from bench.data.attributes import attribute_values, available_attributes, default_stratify, livecell_cell_line
from bench.data.errors import DataError
from bench.data.io import load_dataset
from bench.data.split import make_split

H, W = 20, 24


def _disk(cy, cx, r):
    yy, xx = np.mgrid[:H, :W]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def write_coco(folder: Path, modalities: list[str | None]) -> Path:
    """A COCO json (annotations only) with a ``modality`` field per image (None: field absent);
    image k holds k % 3 + 1 disks."""
    images, anns = [], []
    for k, mod in enumerate(modalities, start=1):
        im = {"id": k, "file_name": f"img{k}.png", "height": H, "width": W}
        if mod is not None:
            im["modality"] = mod
        images.append(im)
        for j in range(k % 3 + 1):
            c = rle.encode_mask(_disk(5 + 5 * j, 6 + 4 * j, 3))
            anns.append({"id": len(anns) + 1, "image_id": k, "category_id": 1, "iscrowd": 0,
                         "segmentation": rle.to_coco_rle(c, H, W), "area": rle.area(c)})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "nucleus"}]}))
    return path


MODS = ["fluorescence"] * 14 + ["histology"] * 5 + ["brightfield"] * 3


def write_coco_with_images(folder: Path) -> Path:
    from PIL import Image

    gt = write_coco(folder, MODS)
    (folder / "images").mkdir()
    for k in range(1, len(MODS) + 1):
        Image.fromarray(np.full((H, W), 40 * (k % 5), np.uint8)).save(folder / "images" / f"img{k}.png")
    return gt


def test_coco_image_fields_become_attributes_and_missing_ones_are_named(tmp_path):
    ds = load_dataset(write_coco(tmp_path / "a", MODS), require_images=False)
    assert available_attributes(ds) == ["cell_type", "modality"]
    vals = attribute_values(ds, "modality")
    assert vals["1"] == "fluorescence" and vals["22"] == "brightfield"
    assert default_stratify(ds) == "modality"
    with pytest.raises(DataError, match=r"have no attribute 'cell_line'.*cell_type, modality"):
        attribute_values(ds, "cell_line")
    ds = load_dataset(write_coco(tmp_path / "b", MODS[:-1] + [None]), require_images=False)
    assert available_attributes(ds) == ["cell_type"] and default_stratify(ds) == "cell_type"
    with pytest.raises(DataError, match=r"1 of 22 images have no attribute 'modality' \(e.g. image 22\)"):
        attribute_values(ds, "modality")


def test_livecell_cell_line_from_the_file_name():
    assert livecell_cell_line("A172_Phase_A7_1_00d00h00m_1.tif") == "A172"
    assert livecell_cell_line("SH-SY5Y_Phase_B4_2_01d12h00m_3.png") == "SH-SY5Y"
    assert livecell_cell_line("set01.tif") is None


def test_split_is_stratified_by_modality(tmp_path):
    ds = load_dataset(write_coco(tmp_path, MODS), require_images=False)
    split = make_split(ds, 0.2, 0)
    assert split["stratified_by"] == "modality"
    mod = attribute_values(ds, "modality")
    val = [mod[i] for i in split["val"]]
    # each modality gets its ~20% (3 of 14, 1 of 5, 1 of 3: every stratum with >= 2 images is in val)
    assert {m: val.count(m) for m in set(MODS)} == {"fluorescence": 3, "histology": 1, "brightfield": 1}
    assert split["strata"]["brightfield"] == {"train": 2, "val": 1}
    assert make_split(ds, 0.2, 0)["hash"] == split["hash"]
    # asked for explicitly, the old stratification (one class 'nucleus') gives another split
    old = make_split(ds, 0.2, 0, stratify="cell_type")
    assert old["stratified_by"] == "cell_type" and old["hash"] != split["hash"]


def test_datasets_without_attributes_keep_their_split(tiny_synth):
    ds = load_dataset(tiny_synth)
    split = make_split(ds, 0.2, 0)
    assert split["stratified_by"] == "cell_type"
    assert split["hash"] == make_split(ds, 0.2, 0, stratify="cell_type")["hash"]


def test_usiigaci_split_hash_is_the_published_one(shared):
    """README's usiigaci run (made before attributes existed) recorded split 0f4e397a850dcef9."""
    path = shared / "usiigaci_phase"
    if not path.is_dir():
        pytest.skip("no ../shared/data/usiigaci_phase")
    assert make_split(load_dataset(path, require_images=False), 0.2, 0)["hash"] == "0f4e397a850dcef9"


def test_eval_breakdown_by_modality(tmp_path):
    """Perfect predictions on fluorescence images, none elsewhere: 1 and 0 per group, with counts."""
    from bench.data.predictions import write_predictions
    from bench.data.sample import Instances

    gt = write_coco(tmp_path, MODS)
    ds = load_dataset(gt, require_images=False)
    mod = attribute_values(ds, "modality")
    preds = {s.image_id: (Instances(H, W, s.instances.counts, np.zeros(len(s.instances), np.int64),
                                    np.ones(len(s.instances))) if mod[s.image_id] == "fluorescence"
                          else Instances.empty(H, W)) for s in ds}
    pred = tmp_path / "p.jsonl.gz"
    write_predictions(pred, preds, ["nucleus"])
    out = tmp_path / "scores.json"
    r = CliRunner().invoke(app, ["eval", "--gt", str(gt), "--pred", str(pred), "--json", str(out),
                                 "--breakdown", "modality"])
    assert r.exit_code == 0, r.output
    assert "fluorescence" in r.output and "histology" in r.output
    bd = json.loads(out.read_text())["breakdown"]
    assert bd["attribute"] == "modality"
    g = bd["groups"]
    assert list(g) == ["brightfield", "fluorescence", "histology"]
    assert g["fluorescence"]["kaggle_map"] == 1.0 and g["fluorescence"]["kaggle_map_ci95"] == [1.0, 1.0]
    assert g["histology"]["kaggle_map"] == 0.0 and g["histology"]["coco_AP"] == 0.0
    assert g["fluorescence"]["coco_AP"] == pytest.approx(1.0)
    n_gt = {v: sum(len(s.instances) for s in ds if mod[s.image_id] == v) for v in set(MODS)}
    for v in set(MODS):
        assert g[v]["n_images"] == MODS.count(v) and g[v]["n_gt"] == n_gt[v]
        assert g[v]["fn50"] == (0 if v == "fluorescence" else n_gt[v])
    assert g["fluorescence"]["tp50"] == g["fluorescence"]["n_pred"] == n_gt["fluorescence"]
    r = CliRunner().invoke(app, ["eval", "--gt", str(gt), "--pred", str(pred), "--breakdown", "plate"])
    assert r.exit_code == 2 and "no attribute 'plate'" in r.output


def test_report_breakdown_equals_the_evaluators_per_class(tmp_path, tiny_synth, monkeypatch):
    """Grouping metrics.json's per-image scores by cell type (breakdown_report) must give the
    evaluator's own per-class numbers, computed independently in the worker."""
    from bench.adapters import registry
    from bench.report.leaderboard import write_report
    from bench.runner.run import run_benchmark

    monkeypatch.setenv("CELLBENCH_PLUGINS", str(Path(__file__).parent / "plugins" / "fake_adapter.py"))
    registry.load_plugins()
    run_dir, _ = run_benchmark(["fake:mode=drop_half"], str(tiny_synth), "smoke", "cpu", 0, tmp_path / "run",
                               results=tmp_path / "results", echo=lambda *_: None)
    paths = write_report([run_dir], tmp_path / "report", breakdown="cell_type")
    assert {"breakdown_cell_type.csv", "breakdown_cell_type.png"} <= {p.name for p in paths}
    metrics = json.loads((run_dir / "models" / "fake--mode=drop_half" / "metrics.json").read_text())
    rows = list(csv.DictReader((tmp_path / "report" / "breakdown_cell_type.csv").open()))
    assert {r["value"] for r in rows} == set(metrics["per_class"])
    for r in rows:
        assert float(r["kaggle_map"]) == pytest.approx(metrics["per_class"][r["value"]])
        assert int(r["n_images"]) == metrics["per_class_n_images"][r["value"]]
        assert [float(r["ci_lo"]), float(r["ci_hi"])] == pytest.approx(metrics["per_class_ci95"][r["value"]])
    md = (tmp_path / "report" / "leaderboard.md").read_text()
    assert "Kaggle mAP by cell_type" in md and "breakdown_cell_type.png" in md
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["split_stratified_by"] == "cell_type"  # Manifest keeps extra keys at the top level
    paths = write_report([run_dir], tmp_path / "report3", breakdown="auto")  # cell type: the columns show it
    assert not any(p.name.startswith("breakdown_") for p in paths)


def test_report_breakdown_auto_follows_the_split(tmp_path, monkeypatch):
    """``--breakdown auto`` breaks a modality-stratified run down by modality, and adds nothing
    where the split is stratified by cell type (the per-class columns show that already)."""
    from bench.adapters import registry
    from bench.report.leaderboard import write_report
    from bench.runner.run import run_benchmark

    monkeypatch.setenv("CELLBENCH_PLUGINS", str(Path(__file__).parent / "plugins" / "fake_adapter.py"))
    registry.load_plugins()
    gt = write_coco_with_images(tmp_path / "data")
    run_dir, _ = run_benchmark(["fake:mode=drop_half"], str(gt), "smoke", "cpu", 0, tmp_path / "run",
                               results=tmp_path / "results", echo=lambda *_: None)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["split_stratified_by"] == "modality" and "split_note" in manifest
    paths = write_report([run_dir], tmp_path / "report", breakdown="auto")
    assert "breakdown_modality.csv" in {p.name for p in paths}
    rows = list(csv.DictReader((tmp_path / "report" / "breakdown_modality.csv").open()))
    assert sorted(r["value"] for r in rows) == ["brightfield", "fluorescence", "histology"]
    assert sum(int(r["n_images"]) for r in rows) == manifest["n_val"]
    assert "Kaggle mAP by modality" in (tmp_path / "report" / "leaderboard.md").read_text()
    paths = write_report([run_dir], tmp_path / "report2", breakdown="cell_type")
    assert "breakdown_cell_type.csv" in {p.name for p in paths}


def test_models_of_two_runs_on_one_split_are_paired(tmp_path, monkeypatch):
    """Two runs of the same split (same hash: same validation images) pair image by image in the
    leaderboard's paired test; runs of different splits do not."""
    from bench.adapters import registry
    from bench.report.leaderboard import aggregate, load_runs
    from bench.runner.run import run_benchmark

    monkeypatch.setenv("CELLBENCH_PLUGINS", str(Path(__file__).parent / "plugins" / "fake_adapter.py"))
    registry.load_plugins()
    gt = write_coco_with_images(tmp_path / "data")
    runs = [run_benchmark([m], str(gt), "smoke", "cpu", seed, tmp_path / name, results=tmp_path / "r",
                          echo=lambda *_: None)[0]
            for m, name, seed in (("fake", "a", 0), ("fake:mode=drop_half", "b", 0), ("fake:mode=drop_half", "c", 1))]
    hashes = [json.loads((r / "manifest.json").read_text())["split_hash"] for r in runs]
    assert hashes[0] == hashes[1] != hashes[2]
    rows = {r["model"]: r for r in aggregate(load_runs(runs[:2]))}
    assert rows["fake"]["vs_best"] == "best" and "paired" in rows["fake--mode=drop_half"]
    assert rows["fake--mode=drop_half"]["paired"]["diff"] < 0  # it dropped cells: paired on the same images
    rows = {r["model"]: r for r in aggregate(load_runs([runs[0], runs[2]]))}
    assert rows["fake--mode=drop_half"]["vs_best"] == "n/a (no common run)"  # another split
