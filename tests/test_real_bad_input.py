"""Issue 14's remaining bad inputs: RGBA images with an unusual alpha, label images with gaps in
their ids, and ``bench run --skip-bad`` (unreadable images reported, skipped and listed in the
manifest; without it the run is refused naming every file)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from bench.cli import app
from bench.data.errors import DataError
from bench.data.io import read_image, read_label_folder

FAKE = str(Path(__file__).parent / "plugins" / "fake_adapter.py")


def _rgba(path: Path, alpha: np.ndarray, grey: np.ndarray | None = None) -> np.ndarray:
    h, w = alpha.shape
    g = np.random.default_rng(0).integers(0, 255, (h, w), dtype=np.uint8) if grey is None else grey
    img = np.dstack([g, g, g, alpha]).astype(np.uint8)
    Image.fromarray(img, "RGBA").save(path)
    return g


def test_opaque_rgba_is_read_silently(tmp_path):
    g = _rgba(tmp_path / "a.png", np.full((8, 10), 255, np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = read_image(tmp_path / "a.png")
    assert img.shape == (8, 10, 3) and (img[..., 0] == g).all()


def test_unusual_alpha_warns_naming_the_file_and_keeps_the_colours(tmp_path):
    alpha = np.full((8, 10), 255, np.uint8)
    alpha[:4] = 0  # half transparent
    g = _rgba(tmp_path / "half.png", alpha)
    with pytest.warns(UserWarning, match=r"half\.png: RGBA image with an unusual alpha channel \(0\.\.255, 50\.0%"):
        img = read_image(tmp_path / "half.png")
    assert (img[..., 1] == g).all()  # used as stored, not composited onto black
    _rgba(tmp_path / "dim.png", np.full((8, 10), 128, np.uint8))
    with pytest.warns(UserWarning, match=r"dim\.png: .*128\.\.128, 100\.0%"):
        read_image(tmp_path / "dim.png")


def test_picture_in_the_alpha_channel_is_an_error(tmp_path):
    alpha = np.random.default_rng(1).integers(0, 255, (8, 10)).astype(np.uint8)
    _rgba(tmp_path / "alpha_only.png", alpha, grey=np.zeros((8, 10), np.uint8))
    with pytest.raises(DataError, match=r"alpha_only\.png: RGBA image with blank colour channels .* alpha"):
        read_image(tmp_path / "alpha_only.png")


def test_label_image_with_gaps_is_accepted_and_reported_by_check(tmp_path):
    lab = np.zeros((16, 16), np.uint16)
    lab[2:5, 2:5], lab[8:12, 8:12], lab[12:15, 1:4] = 1, 7, 3  # ids 1, 3, 7: 2, 4, 5, 6 unused
    Image.fromarray(lab).save(tmp_path / "x_masks.png")
    Image.fromarray(np.full((16, 16), 100, np.uint8)).save(tmp_path / "x.png")
    ds = read_label_folder(tmp_path)
    inst = ds.samples[0].instances
    assert len(inst) == 3 and sorted(inst.areas.tolist()) == [9, 9, 16]
    assert ds.samples[0].meta["label_gaps"] == {"max_label": 7, "cells": 3}
    r = CliRunner().invoke(app, ["data", "check", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "1 label image(s) have gaps in their ids (accepted" in r.output and "x_masks.png" in r.output


@pytest.fixture()
def damaged(tmp_path, tiny_synth):
    """The tiny synthetic set with three training images damaged: one truncated, one deleted and
    one of another size."""
    import shutil

    from bench.data.io import load_dataset
    from bench.data.split import make_split

    data = tmp_path / "data"
    shutil.copytree(tiny_synth, data)
    train = make_split(load_dataset(data), 0.2, 0)["train"]
    pngs = [data / "train" / f"{i}.png" for i in train[:3]]
    pngs[0].write_bytes(pngs[0].read_bytes()[:100])
    pngs[1].unlink()
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(pngs[2])
    return data, [p.stem for p in pngs[:3]]


def test_skip_bad_runs_on_the_rest_and_lists_what_it_skipped(tmp_path, damaged, monkeypatch):
    from bench.adapters import registry

    monkeypatch.setenv("CELLBENCH_PLUGINS", FAKE)
    registry.load_plugins()
    data, bad = damaged
    r = CliRunner().invoke(app, ["run", "--models", "fake", "--data", str(data), "--out", str(tmp_path / "refused"),
                                 "--device", "cpu"])
    assert r.exit_code == 2 and not (tmp_path / "refused").exists()
    assert bad[1] in r.output and "is missing" in r.output  # the reader stops at the missing image, named
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["run", "--models", "fake", "--data", str(data), "--out", str(out),
                                 "--device", "cpu", "--skip-bad"])
    assert r.exit_code == 0, r.output
    assert r.output.count("skipped (--skip-bad)") == 3
    manifest = json.loads((out / "manifest.json").read_text())
    skipped = {d["id"]: d["problem"] for d in manifest["skipped_images"]}
    assert set(skipped) == set(bad)
    assert "missing" in skipped[bad[1]] and "cannot read image" in skipped[bad[0]]
    assert "7x9" in skipped[bad[2]] or "9x7" in skipped[bad[2]]
    split = json.loads((out / "split.json").read_text())
    assert not set(bad) & set(split["train"] + split["val"]) and len(split["train"] + split["val"]) == 9
    assert manifest["split_hash"] == split["hash"] and manifest["n_train"] + manifest["n_val"] == 9
    metrics = json.loads((out / "models" / "fake" / "metrics.json").read_text())
    assert metrics["n_images"] == len(split["val"]) and metrics["kaggle_map"] == pytest.approx(1.0)


def test_predict_on_real_uint16_tiff_and_rgba_png_scores_against_its_ground_truth(tmp_path, shared):
    """``bench predict`` on real images (usiigaci's uint16 phase-contrast TIFFs, a DSB2018 RGBA PNG)
    reads them through the same reader and input policy as ``bench run``: its masks for the
    validation image equal the run's own predictions, its uint16 label TIFFs and overlays are
    written, and its output scores against the folder's ground truth (matched by id)."""
    import shutil

    import tifffile

    from bench.data.predictions import read_predictions
    from bench.runner.run import run_benchmark

    usi, dsb = shared / "usiigaci_phase", shared / "dsb2018_native_sample" / "stage1_train"
    if not usi.is_dir() or not dsb.is_dir():
        pytest.skip("no usiigaci_phase / dsb2018_native_sample in ../shared/data")
    data = tmp_path / "usi"
    data.mkdir()
    for stem in ("set01", "set02", "set03"):
        for suffix in (".tif", "_masks.png"):
            shutil.copy(usi / f"{stem}{suffix}", data / f"{stem}{suffix}")
    assert tifffile.imread(data / "set01.tif").dtype == np.uint16
    run_dir, out = run_benchmark(["watershed"], str(data), "smoke", "cpu", 0, tmp_path / "run",
                                 results=tmp_path / "results", echo=lambda *_: None)
    assert out[0].state == "done"
    run_preds, _ = read_predictions(run_dir / "models" / "watershed" / "predictions.jsonl.gz")

    images = tmp_path / "images"
    shutil.copytree(data, images, ignore=shutil.ignore_patterns("*_masks.png"))
    pred_out = tmp_path / "pred"
    r = CliRunner().invoke(app, ["predict", "--run", str(run_dir), "--model", "watershed", "--images", str(images),
                                 "--out", str(pred_out), "--raw", "--label-format", "tif", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    preds, _ = read_predictions(pred_out / "predictions.jsonl.gz")
    assert sorted(preds) == ["set01", "set02", "set03"]
    for iid, p in run_preds.items():  # the validation image: the same masks both ways
        assert [c.tolist() for c in preds[iid].counts] == [c.tolist() for c in p.counts]
    for iid, p in preds.items():
        lab = tifffile.imread(pred_out / "labels" / f"{iid}.tif")
        assert lab.dtype == np.uint16 and lab.shape == (1022, 1024) == (p.height, p.width)
        assert len(np.unique(lab)) - 1 == len(p) > 0
        ov = np.asarray(Image.open(pred_out / "overlays" / f"{iid}.png"))
        assert ov.shape == (1022, 1024, 3) and ov.dtype == np.uint8
    r = CliRunner().invoke(app, ["eval", "--gt", str(data), "--pred", str(pred_out / "predictions.jsonl.gz")])
    assert r.exit_code == 0, r.output
    assert "matched to the ground truth by image id" in r.output and "images: 3" in r.output

    png = tmp_path / "png"  # a real DSB2018 PNG (RGBA, opaque alpha: read silently)
    png.mkdir()
    first = sorted(dsb.iterdir())[0]
    shutil.copy(first / "images" / f"{first.name}.png", png / f"{first.name}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        r = CliRunner().invoke(app, ["predict", "--run", str(run_dir), "--model", "watershed", "--images",
                                     str(png), "--out", str(tmp_path / "pred_png"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    lab = np.asarray(Image.open(tmp_path / "pred_png" / "labels" / f"{first.name}.png"))
    assert lab.dtype == np.uint16 and lab.max() > 0


def test_skip_bad_leaves_out_dsb_ids_with_an_empty_mask_or_a_missing_image(tmp_path, monkeypatch):
    from test_dsb_native import write_native

    from bench.adapters import registry

    monkeypatch.setenv("CELLBENCH_PLUGINS", FAKE)
    registry.load_plugins()
    ids = tuple(f"id{k}" for k in range(8))
    write_native(tmp_path / "dsb", ids=ids, overlap=False)
    root = tmp_path / "dsb" / "stage1_train"
    empty = root / "id2" / "masks" / "m1.png"
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(empty)
    (root / "id5" / "images" / "id5.png").unlink()
    args = ["run", "--models", "fake", "--data", str(tmp_path / "dsb"), "--device", "cpu"]
    r = CliRunner().invoke(app, args + ["--out", str(tmp_path / "refused")])
    assert r.exit_code == 2 and "m1.png" in r.output and "empty" in r.output
    r = CliRunner().invoke(app, args + ["--out", str(tmp_path / "run"), "--skip-bad"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    skipped = {d["id"]: d["problem"] for d in manifest["skipped_images"]}
    assert set(skipped) == {"id2", "id5"}
    assert str(empty) in skipped["id2"] and "empty" in skipped["id2"] and "missing" in skipped["id5"]
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert sorted(split["train"] + split["val"]) == [i for i in ids if i not in ("id2", "id5")]
    assert {d["id"] for d in split["skipped"]} == {"id2", "id5"}
    assert json.loads((tmp_path / "run" / "models" / "fake" / "metrics.json").read_text())["kaggle_map"] == 1.0
