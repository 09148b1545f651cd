"""Issue 19, one row per bad input: each is refused early with the file (and entry) named, or,
where the input is merely unusual (BOM, CRLF, float labels with whole values), read correctly.

Every row builds its input from a 12-image 176x130 synthetic set (the issue's reproduction),
runs the reader/command and asserts the outcome. ``BAD_INPUT_CLASSES`` counts the rows.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from bench.data import rle
from bench.data.errors import DataError
from bench.data.io import read_coco, read_label_folder, read_label_image, read_sartorius
from bench.data.predictions import (load_any_predictions, read_coco_results, read_predictions, read_submission,
                                    write_predictions, write_submission)
from bench.data.sample import Instances

W, H = 176, 130


# ---------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from bench.data.synth import generate

    out = tmp_path_factory.mktemp("bad") / "synth"
    generate(out, n_images=12, size=(W, H), seed=0)
    return out


class Ctx:
    def __init__(self, synth: Path, tmp: Path):
        self.tmp = tmp
        self.ds = tmp / "ds"
        shutil.copytree(synth, self.ds)
        self.csv = self.ds / "train.csv"

    def rows(self) -> list[dict]:
        return list(csv.DictReader(open(self.csv)))

    def write_rows(self, rows: list[dict]) -> None:
        with open(self.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    def first_id(self) -> str:
        return self.rows()[0]["id"]

    def sizes(self) -> dict[str, tuple[int, int]]:
        return {s.image_id: (s.height, s.width) for s in read_sartorius(self.ds)}


def coco_doc() -> dict:
    """A minimal valid COCO instance file: one 176x130 image, one square cell (polygon) and one RLE."""
    m = np.zeros((H, W), bool)
    m[60:70, 100:120] = True
    return {"images": [{"id": 1, "file_name": "a.png", "height": H, "width": W}],
            "categories": [{"id": 1, "name": "cell"}],
            "annotations": [{"id": 10, "image_id": 1, "category_id": 1,
                             "segmentation": [[10, 10, 40, 10, 40, 40, 10, 40]]},
                            {"id": 11, "image_id": 1, "category_id": 1,
                             "segmentation": rle.to_coco_rle(rle.encode_mask(m), H, W)}]}


def write_json(path: Path, obj, bom: bool = False) -> Path:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + json.dumps(obj).encode())
    return path


def coco_with(ctx: Ctx, fn) -> Path:
    doc = coco_doc()
    fn(doc)
    return write_json(ctx.tmp / "coco.json", doc)


def raises(exc, patterns, fn, *args, **kw):
    """``fn`` raises ``exc`` whose message contains every pattern (file names, entry ids, problem)."""
    with pytest.raises(exc) as ei:
        fn(*args, **kw)
    msg = str(ei.value)
    for p in patterns:
        assert str(p) in msg, f"{p!r} not in {msg!r}"
    return ei.value


def cli(args, code=2, patterns=()):
    from typer.testing import CliRunner

    from bench.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == code, r.output
    assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit), r.exception
    for p in patterns:
        assert str(p) in r.output, f"{p!r} not in {r.output!r}"
    return r


def small_preds() -> dict[str, Instances]:
    m = np.zeros((H, W), bool)
    m[5:15, 5:25] = True
    m2 = np.zeros((H, W), bool)
    m2[50:60, 30:35] = True
    return {"img": Instances.from_masks(np.stack([m, m2]), classes=np.array([0, 1]), scores=np.array([0.9, 0.4]))}


def label_tif(ctx: Ctx, labels: np.ndarray, name="a") -> Path:
    folder = ctx.tmp / "labels"
    folder.mkdir(exist_ok=True)
    Image.fromarray(np.full(labels.shape[:2], 128, np.uint8)).save(folder / f"{name}.png")
    tifffile.imwrite(folder / f"{name}_masks.tif", labels)
    return folder


def many_labels() -> np.ndarray:
    """300 labels on a 176x130 image: 20 x 15 tiles of 8x8 px."""
    lab = np.zeros((H, W), np.float32)
    k = 0
    for y in range(15):
        for x in range(20):
            k += 1
            lab[y * 8 + 1:y * 8 + 7, x * 8 + 1:x * 8 + 7] = k
    return lab


# ---------------------------------------------------------------------------
# the rows
# ---------------------------------------------------------------------------

def float_label_tif_integral(ctx):
    folder = label_tif(ctx, many_labels())
    with pytest.warns(UserWarning, match="converted to integer labels"):
        ds = read_label_folder(folder)
    assert len(ds.samples[0].instances) == 300  # was rescaled to 0-255: 300 cells merged into 255


def float_label_tif_fractional(ctx):
    lab = many_labels()
    lab[3, 3] = 1.5
    folder = label_tif(ctx, lab)
    raises(DataError, ["a_masks.tif", "non-integer", "1.5"], read_label_folder, folder)


def float_label_tif_nan(ctx):
    lab = many_labels()
    lab[0, 0] = np.nan
    raises(DataError, ["a_masks.tif", "NaN"], read_label_folder, label_tif(ctx, lab))


def negative_labels(ctx):
    lab = many_labels().astype(np.int16)
    lab[0, 0] = -3
    raises(DataError, ["a_masks.tif", "negative"], read_label_folder, label_tif(ctx, lab))


def colour_label_image(ctx):
    lab = np.zeros((H, W, 3), np.uint8)
    lab[10:20, 10:20] = (1, 2, 3)
    raises(DataError, ["a_masks.tif", "single-channel"], read_label_folder, label_tif(ctx, lab))


def palette_label_png_keeps_indices(ctx):
    folder = ctx.tmp / "labels"
    folder.mkdir()
    Image.fromarray(np.full((H, W), 128, np.uint8)).save(folder / "a.png")
    lab = np.zeros((H, W), np.uint8)
    lab[5:10, 5:10], lab[20:30, 20:30] = 1, 7
    im = Image.fromarray(lab, mode="L").convert("P")
    im.save(folder / "a_masks.png")
    assert sorted(np.unique(read_label_image(folder / "a_masks.png")).tolist()) == [0, 1, 7]
    assert len(read_label_folder(folder).samples[0].instances) == 2


def eval_max_dets_zero(ctx):
    cli(["eval", "--gt", ctx.csv, "--pred", ctx.csv, "--max-dets", "0"], 2, ["--max-dets"])


def eval_max_dets_negative(ctx):
    cli(["eval", "--gt", ctx.csv, "--pred", ctx.csv, "--max-dets", "-5"], 2, ["--max-dets"])


def evaluator_max_dets_zero(ctx):
    from bench.metrics.evaluator import InstanceSegEvaluator, evaluate_predictions

    raises(ValueError, ["max_dets", ">= 1"], InstanceSegEvaluator, ["a"], max_dets=0)
    gt = {"img": (small_preds()["img"], "a")}
    raises(ValueError, ["max_dets"], evaluate_predictions, gt, small_preds(), ["a", "b"], max_dets=-5)


def _config_error(spec: str, patterns):
    from bench.adapters.registry import ConfigError, make_config, parse_spec

    name, opts = parse_spec(spec)
    raises(ConfigError, patterns, make_config, name, "smoke", opts)


def watershed_nan(ctx):
    _config_error("watershed:threshold_scale=.nan", ["threshold_scale", "NaN"])


def watershed_inf(ctx):
    _config_error("watershed:background_sigma=.inf", ["background_sigma", "infinite"])


def watershed_yes_for_int(ctx):
    _config_error("watershed:min_distance=yes", ["min_distance", "yes/no"])


def watershed_negative_sigma(ctx):
    _config_error("watershed:smooth_sigma=-1", ["smooth_sigma", "greater than or equal to 0"])


def _coco_error(ctx, mutate, patterns):
    path = coco_with(ctx, mutate)
    raises(DataError, [path, *patterns], read_coco, path, require_images=False)


def polygon_odd(ctx):
    _coco_error(ctx, lambda d: d["annotations"][0]["segmentation"][0].append(30),
                ["annotation #0 (id 10)", "odd number of coordinates (9)"])


def polygon_two_points(ctx):
    _coco_error(ctx, lambda d: d["annotations"][0].update(segmentation=[[10, 10, 40, 40]]),
                ["(id 10)", "2 point(s), at least 3"])


def polygon_outside(ctx):
    _coco_error(ctx, lambda d: d["annotations"][0].update(segmentation=[[150, 10, 190, 10, 190, 40, 150, 40]]),
                ["(id 10)", "outside the 176x130 image"])


def polygon_within_tolerance_ok(ctx):
    path = coco_with(ctx, lambda d: d["annotations"][0].update(segmentation=[[-0.5, 0, 176.8, 0, 176.8, 130.9,
                                                                              -0.5, 130.9]]))
    ds = read_coco(path, require_images=False)
    assert ds.samples[0].instances.areas[0] == W * H  # clipped to the image, not refused


def polygon_flat_list(ctx):
    _coco_error(ctx, lambda d: d["annotations"][0].update(segmentation=[10, 10, 40, 10, 40, 40]),
                ["(id 10)", "not a list of coordinates"])


def coco_image_without_id(ctx):
    _coco_error(ctx, lambda d: d["images"][0].pop("id"), ["image #0", "no 'id'"])


def coco_image_without_height(ctx):
    _coco_error(ctx, lambda d: d["images"][0].pop("height"), ["image #0 (id 1)", "no 'height'"])


def coco_image_height_string(ctx):
    _coco_error(ctx, lambda d: d["images"][0].update(height="130"), ["image #0 (id 1)", "height '130'"])


def coco_category_without_id(ctx):
    _coco_error(ctx, lambda d: d["categories"][0].pop("id"), ["category #0", "no 'id'"])


def coco_top_level_number(ctx):
    path = write_json(ctx.tmp / "five.json", 5)
    raises(DataError, [path, "top level is a int"], read_coco, path, require_images=False)


def coco_annotation_string(ctx):
    _coco_error(ctx, lambda d: d["annotations"].append("oops"), ["annotation #2", "is a str, not an object"])


def coco_rle_float_counts(ctx):
    def mutate(d):
        d["annotations"][1]["segmentation"] = {"size": [H, W], "counts": [100.5, 10, W * H - 110.5]}
    _coco_error(ctx, mutate, ["(id 11)", "integers"])


def coco_results_entry_not_object(ctx):
    path = write_json(ctx.tmp / "res.json", [{"image_id": "img", "segmentation": [[1, 1, 9, 1, 9, 9]],
                                               "score": 0.5, "category_id": 1}, 7])
    raises(DataError, [path, "result #1", "not an object"], read_coco_results, path, {"img": "img"},
           {"img": (H, W)})


def coco_results_nan_score(ctx):
    path = ctx.tmp / "res.json"
    path.write_text('[{"image_id": "img", "segmentation": [[1, 1, 9, 1, 9, 9]], "score": NaN, "category_id": 1}]')
    raises(DataError, [path, "result #0", "score"], read_coco_results, path, {"img": "img"}, {"img": (H, W)})


def truncated_jsonl_gz(ctx):
    path = ctx.tmp / "p.jsonl.gz"
    write_predictions(path, small_preds(), ["a", "b"])
    path.write_bytes(path.read_bytes()[:-9])
    raises(DataError, [path, "truncated"], read_predictions, path)
    cli(["eval", "--gt", ctx.csv, "--pred", path], 2, ["p.jsonl.gz", "truncated"])


def prediction_record_bad_fields(ctx):
    path = ctx.tmp / "p.jsonl"
    write_predictions(path, small_preds(), ["a", "b"])
    head, rec = path.read_text().splitlines()
    for mutate, problem in [(lambda r: r.pop("height"), "no 'height'"),
                            (lambda r: r.update(scores=[float("nan"), 1.0]), "NaN"),
                            (lambda r: r.update(classes=["a", "b"]), "'classes'"),
                            (lambda r: r.update(width=176.5), "height/width"),
                            (lambda r: r.update(counts="abc"), "'counts'")]:
        r = json.loads(rec)
        mutate(r)
        path.write_text(head + "\n" + json.dumps(r) + "\n")
        raises(DataError, [f"{path}:2", problem], read_predictions, path)
    path.write_text(head + "\n[1, 2]\n")
    raises(DataError, [f"{path}:2", "not an object"], read_predictions, path)


def submission_nan_score(ctx):
    path = ctx.tmp / "sub.csv"
    path.write_text("id,predicted,score,cell_type\nimg,1 5,nan,\n")
    raises(DataError, [f"{path}:2", "not a finite number"], read_submission, path, {"img": (H, W)})


def csv_with_bom_and_crlf(ctx):
    before = read_sartorius(ctx.ds)
    text = ctx.csv.read_text()
    ctx.csv.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    after = read_sartorius(ctx.ds)
    assert [s.image_id for s in after] == [s.image_id for s in before]
    assert all(len(a.instances) == len(b.instances) and
               all(np.array_equal(x, y) for x, y in zip(a.instances.counts, b.instances.counts))
               for a, b in zip(after, before))


def json_readers_with_bom(ctx):
    path = write_json(ctx.tmp / "bom.json", coco_doc(), bom=True)
    assert len(read_coco(path, require_images=False).samples[0].instances) == 2
    res = write_json(ctx.tmp / "res.json", [{"image_id": "img", "segmentation": [[1, 1, 9, 1, 9, 9]],
                                              "score": 0.5, "category_id": 1}], bom=True)
    assert len(load_any_predictions(res, {"img": (H, W)}, ["a"])["img"]) == 1
    pred = ctx.tmp / "p.jsonl"
    write_predictions(pred, small_preds(), ["a", "b"])
    pred.write_bytes(b"\xef\xbb\xbf" + pred.read_bytes().replace(b"\n", b"\r\n"))
    got = load_any_predictions(pred, {"img": (H, W)}, ["a", "b"])["img"]
    assert [rle.area(c) for c in got.counts] == [200, 50]


def submission_with_bom_and_crlf(ctx):
    path = ctx.tmp / "sub.csv"
    write_submission(path, small_preds())
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    got = read_submission(path, {"img": (H, W)})
    assert sorted(rle.area(c) for c in got["img"].counts) == [50, 200]


def split_with_bom(ctx):
    from bench.data.split import make_split, read_split, write_split

    ds = read_sartorius(ctx.ds)
    path = ctx.tmp / "split.json"
    write_split(make_split(ds, 0.2, 0), path)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert read_split(path, ds)["val"]
    path.write_text("[1, 2]")
    raises(DataError, [path, "not an object"], read_split, path, ds)


def width_180_for_176_image(ctx):
    from bench.preflight import preflight

    iid = ctx.first_id()
    ctx.write_rows([dict(r, width="180") if r["id"] == iid else r for r in ctx.rows()])
    ds = read_sartorius(ctx.ds)  # the annotations alone are consistent: only the image tells
    problems = preflight(ds, None, None)
    assert len(problems) == 1 and f"{iid}.png" in problems[0] and "176x130" in problems[0] \
        and "180x130" in problems[0], problems
    cli(["data", "check", ctx.ds], 2, [f"{iid}.png", "180x130"])


def corrupt_train_image_found_before_training(ctx):
    from bench.data.split import make_split
    from bench.preflight import PreflightError, require_preflight

    ds = read_sartorius(ctx.ds)
    split = make_split(ds, 0.2, 0)
    bad_train, bad_val = split["train"][0], split["val"][0]
    (ctx.ds / "train" / f"{bad_train}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (ctx.ds / "train" / f"{bad_val}.png").write_bytes(b"")
    err = raises(PreflightError, [f"{bad_train}.png", f"{bad_val}.png", "2 problems"], require_preflight,
                 ds, split, ctx.tmp / "runs" / "r1")
    assert len(err.problems) == 2 and not (ctx.tmp / "runs").exists()  # nothing written


def preflight_output_folder(ctx):
    from bench.preflight import preflight

    ds = read_sartorius(ctx.ds)
    blocker = ctx.tmp / "a_file"
    blocker.write_text("x")
    problems = preflight(ds, None, blocker / "runs" / "r1")
    assert len(problems) == 1 and "is a file, not a folder" in problems[0]
    problems = preflight(ds, None, ctx.tmp / "new" / "r1", min_free_mb=1e12)
    assert len(problems) == 1 and "MB free" in problems[0] and str(ctx.tmp / "new" / "r1") in problems[0]
    assert preflight(ds, None, ctx.tmp / "new" / "r1") == [] and not (ctx.tmp / "new").exists()


def stats_json_missing_folder(ctx):
    cli(["data", "stats", ctx.ds, "--json", ctx.tmp / "missing" / "x.json"], 2, ["missing", "does not exist"])


def synth_zero_images(ctx):
    cli(["data", "synth", "--out", ctx.tmp / "s", "--images", "0"], 2, ["--images"])
    assert not (ctx.tmp / "s").exists()


def tune_folds_below_two(ctx):
    for k in ("0", "1"):
        cli(["tune", ctx.tmp, "--folds", k], 2, ["--folds"])


def submit_out_is_a_folder(ctx):
    cli(["submit", "--run", ctx.tmp, "--model", "watershed", "--images", ctx.ds / "train", "--out", ctx.tmp], 2,
        ["is a folder"])


def kaggle_rle_overflowing_number(ctx):
    rows = ctx.rows()
    rows[0]["annotation"] = "9223372036854775800 9223372036854775800"
    ctx.write_rows(rows)
    raises(DataError, [f"{ctx.csv}:2", "outside"], read_sartorius, ctx.ds)
    rows[0]["annotation"] = "1 99999999999999999999999"
    ctx.write_rows(rows)
    raises(DataError, [f"{ctx.csv}:2"], read_sartorius, ctx.ds)


def csv_not_utf8(ctx):
    ctx.csv.write_bytes(ctx.csv.read_bytes() + b"\xff\xfe,broken\n")
    raises(DataError, [ctx.csv, "UTF-8"], read_sartorius, ctx.ds)


def atomic_write_disk_full(ctx):
    from bench import util

    target = ctx.tmp / "out" / "metrics.json"

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    mp = pytest.MonkeyPatch()
    mp.setattr(util.os, "fsync", full)
    try:
        raises(OSError, [target, "No space left"], util.atomic_write_json, target, {"a": 1})
    finally:
        mp.undo()
    assert list(target.parent.iterdir()) == []  # the temporary file is gone
    util.atomic_write_json(target, {"a": 1})     # and a later write works without cleanup
    assert json.loads(target.read_text()) == {"a": 1}


def atomic_write_onto_folder(ctx):
    from bench.util import atomic_write_text

    (ctx.tmp / "d").mkdir()
    raises(OSError, [ctx.tmp / "d", "folder"], atomic_write_text, ctx.tmp / "d", "x")
    assert list((ctx.tmp / "d").iterdir()) == [] and [p.name for p in ctx.tmp.iterdir() if p.name.startswith(".")] == []


def atomic_write_respects_umask(ctx):
    from bench.util import atomic_write_text

    for mask, mode in ((0o022, 0o644), (0o002, 0o664), (0o077, 0o600)):
        old = os.umask(mask)
        try:
            atomic_write_text(ctx.tmp / f"f{mask:o}.txt", "x")
        finally:
            os.umask(old)
        assert (ctx.tmp / f"f{mask:o}.txt").stat().st_mode & 0o777 == mode


ROWS = [
    float_label_tif_integral, float_label_tif_fractional, float_label_tif_nan, negative_labels, colour_label_image,
    palette_label_png_keeps_indices,
    eval_max_dets_zero, eval_max_dets_negative, evaluator_max_dets_zero,
    watershed_nan, watershed_inf, watershed_yes_for_int, watershed_negative_sigma,
    polygon_odd, polygon_two_points, polygon_outside, polygon_within_tolerance_ok, polygon_flat_list,
    coco_image_without_id, coco_image_without_height, coco_image_height_string, coco_category_without_id,
    coco_top_level_number, coco_annotation_string, coco_rle_float_counts,
    coco_results_entry_not_object, coco_results_nan_score,
    truncated_jsonl_gz, prediction_record_bad_fields, submission_nan_score,
    csv_with_bom_and_crlf, json_readers_with_bom, submission_with_bom_and_crlf, split_with_bom,
    width_180_for_176_image, corrupt_train_image_found_before_training, preflight_output_folder,
    stats_json_missing_folder, synth_zero_images, tune_folds_below_two, submit_out_is_a_folder,
    kaggle_rle_overflowing_number, csv_not_utf8,
    atomic_write_disk_full, atomic_write_onto_folder, atomic_write_respects_umask,
]
BAD_INPUT_CLASSES = len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=lambda f: f.__name__)
def test_bad_input(row, synth, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a row that warns must say so (pytest.warns)
        row(Ctx(synth, tmp_path))
