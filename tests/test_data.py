"""Readers, validation errors naming file and row, the split, stats, and the `bench data` commands."""

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from bench.cli import app
from bench.data.errors import DataError
from bench.data.io import load_dataset, read_coco, read_label_folder, read_sartorius
from bench.data.split import make_split
from bench.data.stats import check_dataset, dataset_stats

runner = CliRunner()


def _copy(src, tmp_path):
    dst = tmp_path / "ds"
    shutil.copytree(src, dst)
    return dst


def _rewrite_csv(path, fn):
    rows = list(csv.DictReader(open(path)))
    fields = list(rows[0].keys())
    rows = fn(rows)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def test_sartorius_reader_keeps_every_mask_and_metadata(tiny_synth):
    ds = read_sartorius(tiny_synth)
    n_rows = sum(1 for _ in open(tiny_synth / "train.csv")) - 1
    assert sum(len(s.instances) for s in ds) == n_rows
    s = ds.samples[0]
    assert s.image.shape == (128, 128) and s.image.dtype == np.uint8
    assert s.meta["sample_id"] and s.group == s.meta["sample_id"]
    assert s.cell_type(ds.classes) in ds.classes
    assert check_dataset(ds)["images"] == 12


def test_real_ground_truth_overlaps_are_kept(real_csv):
    ds = read_sartorius(real_csv, require_images=False)
    from bench.data import rle

    overl = total = 0
    for s in ds:
        pix = np.concatenate([rle.pixel_indices(c) for c in s.instances.counts])
        u = np.unique(pix).size
        overl += pix.size - u
        total += u
    assert 0.01 < overl / total < 0.05  # the real data: ~2.5% of annotated pixels


@pytest.mark.parametrize("mutate,problem,row", [
    (lambda rows: [dict(rows[0], annotation="1 2 3")] + rows[1:], "odd number", 2),
    (lambda rows: [dict(rows[0], cell_type="neuron")] + rows[1:], "unknown cell_type", 2),
    (lambda rows: [rows[0], dict(rows[1], id=rows[0]["id"], width="64")] + rows[2:], "differ from earlier rows", 3),
    (lambda rows: [dict(rows[0], annotation="")] + rows[1:], "empty annotation", 2),
    (lambda rows: [dict(rows[0], annotation="16380 100")] + rows[1:], "outside", 2),
    (lambda rows: [dict(rows[0], width="x")] + rows[1:], "not integers", 2),
])
def test_bad_csv_names_file_and_row(tiny_synth, tmp_path, mutate, problem, row):
    ds = _copy(tiny_synth, tmp_path)
    _rewrite_csv(ds / "train.csv", mutate)
    with pytest.raises(DataError) as e:
        read_sartorius(ds)
    assert f"train.csv:{row}" in str(e.value) and problem in str(e.value)
    r = runner.invoke(app, ["data", "check", str(ds)])
    assert r.exit_code == 2 and f"train.csv:{row}" in r.output


def test_missing_corrupt_and_wrong_size_images(tiny_synth, tmp_path):
    ds = _copy(tiny_synth, tmp_path)
    first = sorted((ds / "train").glob("*.png"))[0]
    first.write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image") as e:
        check_dataset(read_sartorius(ds))
    assert first.name in str(e.value)
    Image.fromarray(np.zeros((50, 60), np.uint8)).save(first)
    with pytest.raises(DataError, match="60x50"):
        check_dataset(read_sartorius(ds))
    first.unlink()
    with pytest.raises(DataError, match="missing"):
        read_sartorius(ds)
    r = runner.invoke(app, ["data", "check", str(ds)])
    assert r.exit_code == 2 and first.stem in r.output


def test_coco_reader_polygons_and_both_rle_kinds(tmp_path):
    from pycocotools import mask as mask_util

    from bench.data import rle

    m = np.zeros((20, 30), bool)
    m[5:10, 4:12] = True
    comp = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
    comp["counts"] = comp["counts"].decode()
    unc = {"size": [20, 30], "counts": rle.encode_mask(m).tolist()}
    poly = [[4, 5, 11.99, 5, 11.99, 9.99, 4, 9.99]]
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "A172_Phase_A7_1_00d00h00m_1.png")
    doc = {"images": [{"id": 7, "file_name": "A172_Phase_A7_1_00d00h00m_1.png", "height": 20, "width": 30}],
           "categories": [{"id": 1, "name": "cell"}],
           "annotations": [{"id": i, "image_id": 7, "category_id": 1, "segmentation": seg}
                           for i, seg in enumerate([comp, unc, poly], 1)]}
    (tmp_path / "ann.json").write_text(json.dumps(doc))
    ds = read_coco(tmp_path / "ann.json", image_dir=tmp_path)
    inst = ds.samples[0].instances
    assert len(inst) == 3
    np.testing.assert_array_equal(inst.counts[0], inst.counts[1])
    assert abs(int(inst.areas[2]) - 40) <= 12  # rasterised polygon ~ the box
    assert ds.samples[0].group == "A172_A7"  # LIVECell well, for the split
    doc["annotations"][1]["segmentation"] = {"size": [20, 31], "counts": unc["counts"]}
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"annotation #1 .*does not match"):
        read_coco(tmp_path / "bad.json", image_dir=tmp_path)


def test_label_folder_reader(tmp_path, shared):
    import tifffile

    src = shared / "stardist_dsb2018"
    if not (src / "mask2d.tif").is_file():
        pytest.skip("DSB2018 image not present")
    img, lab = tifffile.imread(src / "img2d.tif"), tifffile.imread(src / "mask2d.tif")
    tifffile.imwrite(tmp_path / "nuc.tif", img[:128, :128])
    tifffile.imwrite(tmp_path / "nuc_masks.tif", lab[:128, :128])
    ds = read_label_folder(tmp_path)
    s = ds.samples[0]
    assert len(s.instances) == len(set(np.unique(lab[:128, :128])) - {0})
    np.testing.assert_array_equal(s.instances.to_label_image() > 0, lab[:128, :128] > 0)
    assert load_dataset(tmp_path).samples[0].image_id == "nuc"


def test_split_is_deterministic_grouped_and_stratified(tiny_synth, tmp_path):
    from bench.data.synth import generate

    d = generate(tmp_path / "s40", n_images=40, size=(96, 96), seed=3)
    ds = read_sartorius(d)
    a, b = make_split(ds, 0.2, 0), make_split(ds, 0.2, 0)
    assert a == b and a["hash"] == b["hash"]
    assert make_split(ds, 0.2, 1)["hash"] != a["hash"]
    assert not set(a["train"]) & set(a["val"]) and len(a["train"]) + len(a["val"]) == 40
    group = {s.image_id: s.group for s in ds}
    assert not {group[i] for i in a["train"]} & {group[i] for i in a["val"]}
    types = {s.cell_type(ds.classes) for s in ds}
    assert {ds.by_id()[i].cell_type(ds.classes) for i in a["val"]} == types
    assert 0.1 < len(a["val"]) / 40 < 0.35
    r = runner.invoke(app, ["data", "split", str(d), "--val", "0.2", "--seed", "0"])
    assert r.exit_code == 0, r.output
    assert json.loads((d / "split.json").read_text())["hash"] == a["hash"]


def test_stats_and_synth_commands(tmp_path, real_csv):
    r = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "s"), "--images", "3", "--size", "96x80"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["data", "stats", str(tmp_path / "s")])
    assert r.exit_code == 0 and "| class |" in r.output and "128." in r.output
    rows = {x.cell_type: x for x in dataset_stats(read_sartorius(real_csv, require_images=False), with_images=False)}
    assert set(rows) == {"shsy5y", "astro", "cort"}
    assert 150 < rows["shsy5y"].area_p50 < 250 and 400 < rows["astro"].area_p50 < 700
    r = runner.invoke(app, ["data", "stats", str(real_csv)])
    assert r.exit_code == 0 and "n/a (no images)" in r.output


def test_every_command_has_help():
    for cmd in (["--help"], ["data", "--help"], ["data", "synth", "--help"], ["data", "check", "--help"],
                ["data", "stats", "--help"], ["data", "split", "--help"], ["eval", "--help"], ["run", "--help"],
                ["report", "--help"], ["models", "--help"]):
        r = runner.invoke(app, cmd)
        assert r.exit_code == 0 and "Usage" in r.output, cmd
