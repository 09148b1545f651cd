"""Issue 14: DSB2018's native layout (stage1_train/<id>/images/<id>.png, masks/*.png).

The real six-id sample in ../shared must equal the COCO form of the same images mask for mask;
tiny folders written here cover reading, detection, RGBA images, overlaps and each bad input
(a DataError naming the file, and ``bench data check`` exiting 2 with the file named)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from bench.cli import app
from bench.data import rle
from bench.data.dsb import dsb_root, read_dsb_native
from bench.data.errors import DataError
from bench.data.io import load_dataset, read_coco
from bench.data.stats import check_dataset

H, W = 24, 32


def _disk(cy, cx, r, h=H, w=W):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def write_native(root: Path, ids=("a1", "b2"), rgba=True, overlap=True) -> dict[str, list[np.ndarray]]:
    """A DSB folder: two ids, RGBA images, binary 0/255 masks (two of them overlapping unless not)."""
    out = {}
    rng = np.random.default_rng(0)
    for k, iid in enumerate(ids):
        d = root / "stage1_train" / iid
        (d / "images").mkdir(parents=True)
        (d / "masks").mkdir()
        gray = rng.integers(0, 255, (H, W), dtype=np.uint8)
        if rgba:
            img = np.dstack([gray, gray, gray, np.full((H, W), 255, np.uint8)])
            Image.fromarray(img, "RGBA").save(d / "images" / f"{iid}.png")
        else:
            Image.fromarray(gray).save(d / "images" / f"{iid}.png")
        masks = [_disk(6, 6 + k, 4), _disk(8, 10 + k, 4) if overlap else _disk(17, 8 + k, 4), _disk(18, 24, 3)]
        for j, m in enumerate(masks):
            Image.fromarray(m.astype(np.uint8) * 255).save(d / "masks" / f"m{j}.png")
        out[iid] = masks
    return out


# ---------------------------------------------------------------------------
# tiny native folders written here
# ---------------------------------------------------------------------------

def test_reads_tiny_native_folder(tmp_path):
    masks = write_native(tmp_path)
    for where in (tmp_path, tmp_path / "stage1_train"):
        ds = load_dataset(where)
        assert [s.image_id for s in ds] == ["a1", "b2"]
        assert ds.classes == ["nucleus"]
        for s in ds:
            assert (s.height, s.width) == (H, W)
            got = [s.instances.dense(i) for i in range(len(s.instances))]
            assert all((g == m).all() for g, m in zip(got, masks[s.image_id], strict=True))
            assert (s.instances.classes == 0).all()
            img = s.image  # RGBA: the alpha is dropped, as the input policy does
            assert img.shape == (H, W, 3) and img.dtype == np.uint8
    ds = load_dataset(tmp_path)
    assert (ds.samples[0].instances.dense(0) & ds.samples[0].instances.dense(1)).any()  # overlap kept
    summary = check_dataset(ds)
    assert summary["images"] == 2 and summary["masks"] == 6 and summary["overlapping_pixel_fraction"] > 0


def test_detection_leaves_other_layouts_alone(tmp_path):
    assert dsb_root(tmp_path) is None
    (tmp_path / "x_masks.png").write_bytes(b"")
    assert dsb_root(tmp_path) is None
    write_native(tmp_path / "d")
    assert dsb_root(tmp_path / "d") == tmp_path / "d" / "stage1_train"


def test_grayscale_images_and_cli_check(tmp_path):
    write_native(tmp_path, rgba=False)
    r = CliRunner().invoke(app, ["data", "check", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "ok: 2 images, 6 masks" in r.output


def test_annotation_only_copy_takes_size_from_masks(tmp_path):
    write_native(tmp_path)
    (tmp_path / "stage1_train" / "a1" / "images" / "a1.png").unlink()
    ds = read_dsb_native(tmp_path, require_images=False)
    assert (ds.samples[0].height, ds.samples[0].width) == (H, W)


def _missing_image(root):
    (root / "stage1_train/a1/images/a1.png").unlink()
    return root / "stage1_train/a1/images/a1.png", "image of id a1 is missing"


def _missing_images_folder(root):
    import shutil

    shutil.rmtree(root / "stage1_train/b2/images")
    return root / "stage1_train/b2/images/b2.png", "image of id b2 is missing"


def _empty_mask(root):
    p = root / "stage1_train/b2/masks/m1.png"
    Image.fromarray(np.zeros((H, W), np.uint8)).save(p)
    return p, "empty (all background)"


def _mask_other_size(root):
    p = root / "stage1_train/a1/masks/m2.png"
    Image.fromarray(_disk(5, 5, 3, h=H + 1).astype(np.uint8) * 255).save(p)
    return p, f"is {W}x{H + 1} (WxH) but its image is {W}x{H}"


def _unreadable_mask(root):
    p = root / "stage1_train/a1/masks/m0.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return p, "cannot read image"


def _truncated_mask(root):
    p = root / "stage1_train/b2/masks/m0.png"
    p.write_bytes(p.read_bytes()[:40])
    return p, "cannot read image"


def _unreadable_image(root):
    p = root / "stage1_train/b2/images/b2.png"
    p.write_bytes(b"not a png at all")
    return p, "cannot read image"


def _non_binary_mask(root):
    p = root / "stage1_train/a1/masks/m1.png"
    m = _disk(8, 10, 4).astype(np.uint8) * 255
    m[8, 10] = 7
    Image.fromarray(m).save(p)
    return p, "not binary"


def _colour_mask(root):
    p = root / "stage1_train/a1/masks/m1.png"
    m = np.zeros((H, W, 3), np.uint8)
    m[_disk(8, 10, 4)] = [255, 0, 0]
    Image.fromarray(m, "RGB").save(p)
    return p, "colour image"


def _no_masks(root):
    for p in (root / "stage1_train/b2/masks").iterdir():
        p.unlink()
    return root / "stage1_train/b2/masks", "id b2 has no mask PNGs"


BAD = [_missing_image, _missing_images_folder, _empty_mask, _mask_other_size, _unreadable_mask, _truncated_mask,
       _unreadable_image, _non_binary_mask, _colour_mask, _no_masks]


@pytest.mark.parametrize("make_bad", BAD, ids=[f.__name__.strip("_") for f in BAD])
def test_bad_input_names_the_file(tmp_path, make_bad):
    write_native(tmp_path)
    path, problem = make_bad(tmp_path)
    with pytest.raises(DataError) as e:
        check_dataset(load_dataset(tmp_path))
    assert str(path) in str(e.value) and problem in str(e.value), str(e.value)
    r = CliRunner().invoke(app, ["data", "check", str(tmp_path)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert path.name in r.output and problem in r.output.replace("\n", " "), r.output


# ---------------------------------------------------------------------------
# the real sample in ../shared: equal to the COCO form, mask for mask
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def native_sample(shared) -> Path:
    p = shared / "dsb2018_native_sample"
    if not (p / "stage1_train").is_dir():
        pytest.skip(f"{p} is not present")
    return p


@pytest.fixture(scope="module")
def coco_of_sample(shared, native_sample, tmp_path_factory):
    """The shared COCO json cut down to the sample's six ids (reading all 532 images is slow)."""
    src = shared / "dsb2018" / "annotations.json"
    if not src.is_file():
        pytest.skip(f"{src} is not present")
    ids = {d.name for d in (native_sample / "stage1_train").iterdir() if d.is_dir()}
    data = json.loads(src.read_text())
    images = [im for im in data["images"] if Path(im["file_name"]).stem in ids]
    keep = {im["id"] for im in images}
    data = dict(data, images=images, annotations=[a for a in data["annotations"] if a["image_id"] in keep])
    out = tmp_path_factory.mktemp("dsb_coco") / "six.json"
    out.write_text(json.dumps(data))
    assert len(images) == len(ids) == 6
    return read_coco(out, image_dir=src.parent / "images"), {im["id"]: im for im in images}


def test_real_sample_checks(native_sample):
    r = CliRunner().invoke(app, ["data", "check", str(native_sample)])
    assert r.exit_code == 0, r.output
    assert "ok: 6 images" in r.output


def test_real_sample_equals_coco_form(native_sample, coco_of_sample):
    coco, entries = coco_of_sample
    native = load_dataset(native_sample).by_id()
    assert len(native) == 6
    modalities = set()
    for s in coco:
        stem = Path(s.meta["file_name"]).stem
        n = native[stem]
        assert (n.height, n.width) == (s.height, s.width)
        assert len(n.instances) == len(s.instances)
        as_set = lambda inst: {c.astype(np.int64).tobytes() for c in inst.counts}  # noqa: E731
        assert as_set(n.instances) == as_set(s.instances), stem
        assert n.instances.classes.tolist() == s.instances.classes.tolist()
        # pixels: the native RGBA minus alpha equals the compact image (grey kept as one channel)
        a, b = n.image, s.image
        if b.ndim == 2:
            assert a.ndim == 3 and (a == a[..., :1]).all()
            a = a[..., 0]
        assert np.array_equal(a, b), stem
        modalities.add(entries[int(s.image_id)]["modality"])
    assert {"fluorescence", "histology", "brightfield"} == modalities
    assert sum(rle.area(c) for s in native.values() for c in s.instances.counts) > 0


# ---------------------------------------------------------------------------
# bench eval: predictions keyed by file stem/name score against a COCO ground truth keyed by id
# ---------------------------------------------------------------------------

@pytest.fixture()
def coco_gt(tmp_path):
    """The tiny native set as COCO (integer ids 1, 2; file names '<dsb id>.png'), and its Dataset."""
    import shutil

    write_native(tmp_path / "native", overlap=False)
    ds = load_dataset(tmp_path / "native")
    (tmp_path / "coco" / "images").mkdir(parents=True)
    images, anns = [], []
    for k, s in enumerate(ds, start=1):
        shutil.copy(s.path, tmp_path / "coco" / "images" / f"{s.image_id}.png")
        images.append({"id": k, "file_name": f"{s.image_id}.png", "height": s.height, "width": s.width})
        for c in s.instances.counts:
            seg = rle.to_coco_rle(c, s.height, s.width)
            anns.append({"id": len(anns) + 1, "image_id": k, "category_id": 1, "segmentation": seg,
                         "area": rle.area(c), "iscrowd": 0})
    gt = tmp_path / "coco" / "annotations.json"
    gt.write_text(json.dumps({"images": images, "annotations": anns,
                              "categories": [{"id": 1, "name": "nucleus"}]}))
    return gt, ds


def _perfect(ds, key=lambda s: s.image_id):
    from bench.data.sample import Instances

    return {key(s): Instances(s.height, s.width, s.instances.counts, np.zeros(len(s.instances), np.int64),
                              np.ones(len(s.instances))) for s in ds}


def _eval(gt, pred, tmp_path):
    out = tmp_path / "scores.json"
    r = CliRunner().invoke(app, ["eval", "--gt", str(gt), "--pred", str(pred), "--json", str(out)])
    return r, (json.loads(out.read_text()) if out.is_file() else None)


def test_eval_matches_bench_predict_output_by_file_stem(coco_gt, tmp_path):
    from bench.data.predictions import write_predictions

    gt, ds = coco_gt
    pred = tmp_path / "preds" / "predictions.jsonl.gz"  # what `bench predict --images coco/images` writes
    pred.parent.mkdir()
    write_predictions(pred, _perfect(ds), ["nucleus"])
    r, res = _eval(gt, pred, tmp_path)
    assert r.exit_code == 0, r.output
    assert "matched to the ground truth by file stem" in r.output
    assert res["matched_by"] == "file stem" and res["kaggle_map"] == pytest.approx(1.0)
    assert res["missing_predictions"] == []


def test_eval_prefers_image_ids(coco_gt, tmp_path):
    from bench.data.predictions import write_predictions

    gt, ds = coco_gt
    pred = tmp_path / "p.jsonl"
    write_predictions(pred, {str(k): p for k, p in enumerate(_perfect(ds).values(), start=1)}, ["nucleus"])
    r, res = _eval(gt, pred, tmp_path)
    assert r.exit_code == 0, r.output
    assert res["matched_by"] == "image id" and res["kaggle_map"] == pytest.approx(1.0)


def test_eval_kaggle_csv_and_coco_results_by_file_name(coco_gt, tmp_path):
    from bench.data.predictions import write_submission

    gt, ds = coco_gt
    sub = tmp_path / "submission.csv"
    write_submission(sub, _perfect(ds))  # ids are the DSB ids = the file stems
    r, res = _eval(gt, sub, tmp_path)
    assert r.exit_code == 0, r.output
    assert res["matched_by"] == "file stem" and res["kaggle_map"] == pytest.approx(1.0)

    results = [{"image_id": f"{s.image_id}.png", "category_id": 1, "score": 1.0,
                "segmentation": rle.to_coco_rle(c, s.height, s.width)} for s in ds for c in s.instances.counts]
    res_json = tmp_path / "results.json"
    res_json.write_text(json.dumps(results))
    r, res = _eval(gt, res_json, tmp_path)
    assert r.exit_code == 0, r.output
    assert res["matched_by"] == "file name" and res["kaggle_map"] == pytest.approx(1.0)


def test_eval_unmatched_ids_still_an_error(coco_gt, tmp_path):
    from bench.data.predictions import write_predictions

    gt, ds = coco_gt
    preds = _perfect(ds)
    preds["nowhere"] = next(iter(preds.values()))
    pred = tmp_path / "p.jsonl"
    write_predictions(pred, preds, ["nucleus"])
    r, _ = _eval(gt, pred, tmp_path)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "not in the ground truth" in r.output and "nowhere" in r.output


def test_ambiguous_stems_are_not_matched():
    from bench.data.predictions import gt_aliases, match_ids
    from bench.data.sample import Instances, Sample

    e = Instances.empty(4, 4, with_scores=False)
    samples = [Sample("1", e, None, {"file_name": "a/x.png"}), Sample("2", e, None, {"file_name": "b/x.tif"}),
               Sample("3", e, None, {"file_name": "y.png"})]
    al = gt_aliases(samples)
    assert match_ids(["y"], al) == ("file stem", {"y": "3"})
    assert match_ids(["x.png", "y.png"], al)[0] == "file name"
    with pytest.raises(DataError, match="not in the ground truth"):
        match_ids(["x"], al)  # two images have the stem x: never guessed
