"""Property-based tests (hypothesis) for the RLE codecs and every reader (issue 19).

For each codec/reader: random *valid* inputs round-trip exactly; random *corruptions* give a
:class:`DataError` (``ValueError`` for the bare codecs) naming the file, never another
exception and never a silent acceptance. Where a corruption is not guaranteed to make the
input invalid (a random character changed), the property is weaker but still strict about
the failure mode: DataError, or an accepted result that is internally consistent and, where
an independent reference decoder exists, equal to what the reference reads.

Example counts are kept modest (the CI machine has 2 shared cores).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bench.data import rle
from bench.data.errors import DataError
from bench.data.io import read_coco, read_label_image, read_sartorius, write_sartorius_csv
from bench.data.predictions import (read_coco_results, read_predictions, read_submission, write_predictions,
                                    write_submission)
from bench.data.sample import Dataset, Instances, Sample

# CELLBENCH_FUZZ_EXAMPLES=2000 for a long random hunt; by default a fixed, modest set of examples
_LONG = os.environ.get("CELLBENCH_FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(_LONG or 60), deadline=None, derandomize=not _LONG, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
CLASSES = ["shsy5y", "astro", "cort"]


# ---------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------

@st.composite
def masks(draw, min_side=1, max_side=12, nonempty=False):
    h, w = draw(st.integers(min_side, max_side)), draw(st.integers(min_side, max_side))
    m = draw(arrays(bool, (h, w)))
    if nonempty and not m.any():
        m[draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))] = True
    return m


@st.composite
def image_instances(draw, h=None, w=None, max_masks=4, nonempty=True, scores=False):
    h = h or draw(st.integers(2, 12))
    w = w or draw(st.integers(2, 12))
    n = draw(st.integers(0 if not nonempty else 1, max_masks))
    ms = []
    for _ in range(n):
        m = draw(arrays(bool, (h, w)))
        if nonempty and not m.any():
            m[draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))] = True
        ms.append(m)
    counts = [rle.encode_mask(m) for m in ms]
    cls = np.array(draw(st.lists(st.integers(-1 if scores else 0, 2), min_size=n, max_size=n)), dtype=np.int64)
    sc = None
    if scores:
        sc = np.array(draw(st.lists(st.floats(0, 1, allow_nan=False), min_size=n, max_size=n)))
    return Instances(h, w, counts, cls, sc)


@st.composite
def datasets(draw, max_images=3):
    n = draw(st.integers(1, max_images))
    samples = []
    for k in range(n):
        inst = draw(image_instances())
        ct = CLASSES[draw(st.integers(0, 2))]
        inst = Instances(inst.height, inst.width, inst.counts, np.full(len(inst), CLASSES.index(ct)))
        samples.append(Sample(f"img{k}", inst, None, {"cell_type": ct}))
    return Dataset("fuzz", CLASSES, samples)


@st.composite
def prediction_sets(draw, nonempty=False, max_images=3):
    n = draw(st.integers(1, max_images))
    return {f"im{k}": draw(image_instances(nonempty=nonempty, scores=True)) for k in range(n)}


def same_instances(a: Instances, b: Instances, scores=True) -> bool:
    return ((a.height, a.width) == (b.height, b.width) and len(a) == len(b)
            and all(np.array_equal(x.astype(np.int64), y.astype(np.int64)) for x, y in zip(a.counts, b.counts))
            and np.array_equal(a.classes, b.classes)
            and (not scores or np.allclose(a.scores, b.scores, atol=1e-6)))


def consistent(inst: Instances) -> bool:
    """What any accepted reader output must satisfy: every mask covers exactly the image."""
    return all(int(np.asarray(c, np.int64).sum()) == inst.height * inst.width for c in inst.counts) \
        and len(inst.classes) == len(inst)


_BASE: list[Path] = []


@pytest.fixture(autouse=True, scope="module")
def _fuzz_files():
    """Every example's files live under one folder, removed when the module is done."""
    _BASE.append(Path(tempfile.mkdtemp(prefix="cellbench-fuzz-")))
    yield
    shutil.rmtree(_BASE.pop(), ignore_errors=True)


def tmpdir() -> Path:
    return Path(tempfile.mkdtemp(dir=_BASE[-1]))


# ---------------------------------------------------------------------------
# 1. COCO counts: dense <-> counts <-> compressed string, against pycocotools
# ---------------------------------------------------------------------------

@FUZZ
@given(masks())
def test_coco_counts_round_trip(m):
    from pycocotools import mask as mask_util

    h, w = m.shape
    c = rle.encode_mask(m)
    assert int(c.astype(np.int64).sum()) == h * w
    assert np.array_equal(rle.decode_mask(c, h, w), m)
    s = rle.counts_to_string(c)
    assert s == mask_util.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode()
    assert np.array_equal(rle.string_to_counts(s), c)
    assert np.array_equal(rle.from_coco_segmentation({"size": [h, w], "counts": s}, h, w), c)
    assert np.array_equal(rle.from_coco_segmentation({"size": [h, w], "counts": c.tolist()}, h, w), c)
    assert np.array_equal(rle.counts_from_indices(rle.pixel_indices(c), h * w), c)


@FUZZ
@given(st.integers(1, 8), st.integers(1, 8),
       st.one_of(st.text(alphabet=[chr(i) for i in range(32, 127)], max_size=16),
                 st.binary(max_size=12)))
def test_coco_string_corruptions(h, w, s):
    """Any string: ValueError, or counts covering the image that pycocotools decodes identically."""
    from pycocotools import mask as mask_util

    try:
        c = rle.from_coco_segmentation({"size": [h, w], "counts": s}, h, w)
    except ValueError:
        return
    assert int(c.astype(np.int64).sum()) == h * w
    b = s.encode() if isinstance(s, str) else s
    ref = mask_util.decode({"size": [h, w], "counts": b})
    assert np.array_equal(rle.decode_mask(c, h, w), ref.astype(bool))


@FUZZ
@given(st.integers(1, 8), st.integers(1, 8),
       st.lists(st.one_of(st.integers(-2, 70), st.floats(allow_nan=True), st.text(max_size=2), st.booleans()),
                max_size=6))
def test_coco_uncompressed_counts_corruptions(h, w, counts):
    ok = (all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts)
          and sum(counts) == h * w)
    try:
        c = rle.from_coco_segmentation({"size": [h, w], "counts": counts}, h, w)
    except ValueError:
        assert not ok, counts
        return
    assert ok, f"accepted bad counts {counts}"
    assert c.tolist() == counts


# ---------------------------------------------------------------------------
# 2. Kaggle RLE: round trip, and any string decoded exactly like a reference parser or refused
# ---------------------------------------------------------------------------

@FUZZ
@given(masks(nonempty=True))
def test_kaggle_round_trip(m):
    h, w = m.shape
    s = rle.kaggle_encode_mask(m)
    c = rle.kaggle_decode(s, h, w)
    assert np.array_equal(rle.decode_mask(c, h, w), m)
    assert rle.kaggle_encode(c, h, w) == s
    assert np.array_equal(c, rle.encode_mask(m))


def kaggle_reference(s: str, h: int, w: int) -> np.ndarray | None:
    """The competition's format, read the slow obvious way; None if the string is invalid."""
    toks = s.split()
    if not toks or not all(re.fullmatch(r"-?[0-9]+", t) for t in toks) or len(toks) % 2:
        return None
    v = [int(t) for t in toks]
    flat = np.zeros(h * w, bool)
    prev_end = 0
    for start, length in zip(v[0::2], v[1::2]):
        if length <= 0 or start < 1 or start - 1 + length > h * w or start - 1 < prev_end:
            return None
        flat[start - 1:start - 1 + length] = True
        prev_end = start - 1 + length
    return flat.reshape(h, w)


kaggle_strings = st.one_of(
    st.lists(st.integers(-2, 40), max_size=8).map(lambda v: " ".join(map(str, v))),
    st.text(alphabet="0123456789 -+.x\t", max_size=20),
    st.lists(st.integers(1, 30), min_size=2, max_size=8).map(lambda v: " ".join(map(str, sorted(v)))),
)


@FUZZ
@given(st.integers(1, 6), st.integers(1, 6), kaggle_strings)
def test_kaggle_any_string_exact_or_refused(h, w, s):
    ref = kaggle_reference(s, h, w)
    try:
        c = rle.kaggle_decode(s, h, w, "row 7")
    except DataError as e:
        assert ref is None, f"valid {s!r} refused: {e}"
        assert e.where == "row 7"
        return
    assert ref is not None, f"invalid {s!r} accepted"
    assert np.array_equal(rle.decode_mask(c, h, w), ref)


# ---------------------------------------------------------------------------
# 3. COCO polygons: accepted exactly when well formed
# ---------------------------------------------------------------------------

coords = st.one_of(st.integers(-4, 24), st.floats(-4, 24, allow_nan=False), st.just(float("nan")),
                   st.text(max_size=1), st.booleans())
polygons = st.one_of(st.lists(st.lists(coords, max_size=10), max_size=3),
                     st.lists(st.integers(0, 10), max_size=8))


def polygon_ok(seg, h, w) -> bool:
    if not isinstance(seg, list) or not seg:
        return False
    for p in seg:
        if not isinstance(p, list) or len(p) % 2 or len(p) < 6:
            return False
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in p):
            return False
        xs, ys = p[0::2], p[1::2]
        if min(xs) < -1 or min(ys) < -1 or max(xs) > w + 1 or max(ys) > h + 1:
            return False
    return True


@FUZZ
@given(st.integers(4, 20), st.integers(4, 20), polygons)
def test_polygons_accepted_iff_well_formed(h, w, seg):
    ok = polygon_ok(seg, h, w)
    try:
        c = rle.from_coco_segmentation(seg, h, w)
    except ValueError:
        assert not ok, seg
        return
    assert ok, f"accepted bad polygon {seg}"
    assert int(c.astype(np.int64).sum()) == h * w


# ---------------------------------------------------------------------------
# 4. Sartorius csv
# ---------------------------------------------------------------------------

def write_csv(ds: Dataset, bom=False, crlf=False) -> Path:
    d = tmpdir()
    p = d / "train.csv"
    write_sartorius_csv(p, ds)
    text = p.read_text()
    if crlf:
        text = text.replace("\n", "\r\n")
    p.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return p


@FUZZ
@given(datasets(), st.booleans(), st.booleans())
def test_csv_round_trip(ds, bom, crlf):
    p = write_csv(ds, bom, crlf)
    got = read_sartorius(p, require_images=False)
    assert [s.image_id for s in got] == [s.image_id for s in ds]
    for a, b in zip(got, ds):
        assert same_instances(a.instances, b.instances, scores=False)
        assert a.meta["cell_type"] == b.meta["cell_type"]


def _csv_corrupt(rows: list[list[str]], kind: str, r: int, h: int, w: int) -> None:
    row = rows[r]   # columns: id, annotation, width, height, cell_type
    v = row[1].split()
    if kind == "odd":
        row[1] += " 5"
    elif kind == "zero_length":
        v[1] = "0"
        row[1] = " ".join(v)
    elif kind == "outside":
        v[0] = str(h * w + 1)
        row[1] = " ".join(v)
    elif kind == "overlap":
        row[1] = " ".join(v[:2] + v[:2] + v[2:])
    elif kind == "not_int":
        row[1] += " 3.5"
    elif kind == "empty":
        row[1] = ""
    elif kind == "width_text":
        row[2] = "wide"
    elif kind == "width_zero":
        row[2] = "0"
    elif kind == "cell_type":
        row[4] = "neuron"
    elif kind == "fields":
        row.pop()
    elif kind == "huge":
        v[1] = "9" * 25
        row[1] = " ".join(v)


CSV_KINDS = ["odd", "zero_length", "outside", "overlap", "not_int", "empty", "width_text", "width_zero",
             "cell_type", "fields", "huge"]


@FUZZ
@given(datasets(), st.sampled_from(CSV_KINDS + ["no_id_column"]), st.data())
def test_csv_corruptions_are_data_errors(ds, kind, data):
    p = write_csv(ds)
    rows = list(csv.reader(open(p, newline="")))
    if kind == "no_id_column":
        rows[0][0] = "ident"
        line = None
    else:
        r = data.draw(st.integers(1, len(rows) - 1))
        iid = rows[r][0]
        s = next(s for s in ds if s.image_id == iid)
        _csv_corrupt(rows, kind, r, s.height, s.width)
        line = r + 1
    with open(p, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(DataError) as ei:
        read_sartorius(p, require_images=False)
    assert str(p) in str(ei.value)
    if line is not None:
        assert f"{p}:{line}" in str(ei.value)


@FUZZ
@given(datasets(), st.lists(st.tuples(st.integers(0, 10 ** 6), st.sampled_from(["del", "ins", "swap"]),
                                      st.sampled_from(list(",\n 0123456789x-\"\r\xe9"))), min_size=1, max_size=3))
def test_csv_random_edits_never_crash(ds, edits):
    p = write_csv(ds)
    text = p.read_text()
    for pos, op, ch in edits:
        pos %= len(text) + 1
        text = (text[:pos] + text[pos + 1:] if op == "del" else
                text[:pos] + ch + text[pos:] if op == "ins" else text[:pos] + ch + text[pos + 1:])
    p.write_text(text)
    try:
        got = read_sartorius(p, require_images=False)
    except DataError as e:
        assert str(p) in str(e)
        return
    for s in got:
        assert consistent(s.instances) and all(a > 0 for a in s.instances.areas)


# ---------------------------------------------------------------------------
# 5. COCO instance json
# ---------------------------------------------------------------------------

def coco_doc(ds: Dataset, style: int) -> dict:
    images, anns = [], []
    for n, s in enumerate(ds, start=1):
        images.append({"id": n, "file_name": f"{s.image_id}.png", "height": s.height, "width": s.width})
        for c, k in zip(s.instances.counts, s.instances.classes):
            seg = (rle.to_coco_rle(c, s.height, s.width) if style == 0 else
                   {"size": [s.height, s.width], "counts": c.astype(int).tolist()})
            anns.append({"id": len(anns) + 1, "image_id": n, "category_id": int(k) + 1, "segmentation": seg})
    return {"images": images, "annotations": anns,
            "categories": [{"id": k + 1, "name": c} for k, c in enumerate(CLASSES)]}


def write_doc(doc, bom=False) -> Path:
    p = tmpdir() / "coco.json"
    p.write_bytes((b"\xef\xbb\xbf" if bom else b"") + json.dumps(doc).encode())
    return p


@FUZZ
@given(datasets(), st.integers(0, 1), st.booleans())
def test_coco_round_trip(ds, style, bom):
    got = read_coco(write_doc(coco_doc(ds, style), bom), require_images=False)
    assert got.classes == CLASSES
    assert len(got) == len(ds)
    for a, b in zip(got, ds):
        assert same_instances(a.instances, b.instances, scores=False)


WRONG = [None, "7", 1.5, True, [], {}, -1, 0]


def _coco_mutations(doc: dict) -> list[tuple[str, callable]]:
    """(label, mutate) pairs each of which makes the document invalid."""
    out = []
    for key in ("images", "annotations", "categories"):
        out.append((f"drop {key}", lambda d, k=key: d.pop(k)))
        out.append((f"{key} not a list", lambda d, k=key: d.__setitem__(k, {"0": d[k]})))
    out.append(("top level a list", None))
    for i in range(len(doc["images"])):
        out.append((f"image {i} not an object", lambda d, i=i: d["images"].__setitem__(i, [1])))
        for f in ("id", "height", "width"):
            out.append((f"image {i} no {f}", lambda d, i=i, f=f: d["images"][i].pop(f)))
        for v in WRONG:
            out.append((f"image {i} height {v!r}", lambda d, i=i, v=v: d["images"][i].__setitem__("height", v)))
        for v in (None, 1.5, True, [], {}):
            out.append((f"image {i} id {v!r}", lambda d, i=i, v=v: d["images"][i].__setitem__("id", v)))
        out.append((f"image {i} file_name 5", lambda d, i=i: d["images"][i].__setitem__("file_name", 5)))
    for j in range(len(doc["categories"])):
        out.append((f"category {j} no id", lambda d, j=j: d["categories"][j].pop("id")))
        for v in (None, "1", True, 1.5, []):
            out.append((f"category {j} id {v!r}", lambda d, j=j, v=v: d["categories"][j].__setitem__("id", v)))
        for v in (None, 5, ""):
            out.append((f"category {j} name {v!r}", lambda d, j=j, v=v: d["categories"][j].__setitem__("name", v)))
    for k in range(len(doc["annotations"])):
        out.append((f"annotation {k} a string", lambda d, k=k: d["annotations"].__setitem__(k, "ann")))
        for f in ("image_id", "category_id", "segmentation"):
            out.append((f"annotation {k} no {f}", lambda d, k=k, f=f: d["annotations"][k].pop(f)))
        for v in (None, [], {}, True, 999, 1.5):
            out.append((f"annotation {k} image_id {v!r}",
                        lambda d, k=k, v=v: d["annotations"][k].__setitem__("image_id", v)))
        for v in (None, "1", 99, 1.5, True):
            out.append((f"annotation {k} category_id {v!r}",
                        lambda d, k=k, v=v: d["annotations"][k].__setitem__("category_id", v)))
        for v in (None, 5, "seg", {}, [], [[1, 2, 3]], [[0, 0, 1, 0]], {"counts": "!!"}, {"counts": [1.5]},
                  {"counts": []}, {"size": [1, 1], "counts": [1]}, [1, 2, 3, 4, 5, 6]):
            out.append((f"annotation {k} segmentation {v!r}",
                        lambda d, k=k, v=v: d["annotations"][k].__setitem__("segmentation", v)))
    return out


@FUZZ
@given(datasets(), st.data())
def test_coco_corruptions_are_data_errors(ds, data):
    doc = coco_doc(ds, 0)
    label, mutate = data.draw(st.sampled_from(_coco_mutations(doc)))
    if mutate is None:
        doc = [doc]
    else:
        mutate(doc)
    p = write_doc(doc)
    with pytest.raises(DataError) as ei:
        read_coco(p, require_images=False)
    assert str(p) in str(ei.value), label


json_values = st.recursive(st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=False)
                           | st.text(max_size=3), lambda kids: st.lists(kids, max_size=3)
                           | st.dictionaries(st.text(max_size=3), kids, max_size=3), max_leaves=5)


@FUZZ
@given(datasets(max_images=2), st.data(), json_values)
def test_coco_random_value_swaps_never_crash(ds, data, value):
    """Any value anywhere replaced by any JSON value: DataError naming the file, or a consistent read."""
    doc = coco_doc(ds, data.draw(st.integers(0, 1)))
    # every (container, key) in the document
    slots = []

    def walk(node):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for k, v in items:
            slots.append((node, k))
            walk(v)
    walk(doc)
    node, key = data.draw(st.sampled_from(slots))
    node[key] = value
    p = write_doc(doc)
    try:
        got = read_coco(p, require_images=False)
    except DataError as e:
        assert str(p) in str(e)
        return
    for s in got:
        assert consistent(s.instances) and all(a > 0 for a in s.instances.areas)


# ---------------------------------------------------------------------------
# 6. label images
# ---------------------------------------------------------------------------

@FUZZ
@given(st.integers(1, 12), st.integers(1, 12), st.sampled_from(["uint8-png", "uint16-png", "uint8-tif",
                                                                 "uint16-tif", "int32-tif", "float32-tif",
                                                                 "float64-tif"]), st.data())
def test_label_images_round_trip(h, w, kind, data):
    import tifffile
    from PIL import Image

    dtype, fmt = kind.split("-")
    hi = {"uint8": 255, "uint16": 65535}.get(dtype, 100000)
    lab = data.draw(arrays(np.int64, (h, w), elements=st.integers(0, hi)))
    p = tmpdir() / f"a_masks.{fmt}"
    if fmt == "png":
        Image.fromarray(lab.astype(dtype)).save(p)
    else:
        tifffile.imwrite(p, lab.astype(dtype))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = read_label_image(p, expect_hw=(h, w))
    assert got.dtype == np.int64 and np.array_equal(got, lab)
    assert bool(caught) == dtype.startswith("float")   # float labels convert, with a warning


@FUZZ
@given(st.integers(1, 10), st.integers(1, 10), st.data())
def test_label_image_fractional_or_truncated_refused(h, w, data):
    import tifffile

    lab = data.draw(arrays(np.float32, (h, w), elements=st.integers(0, 50).map(float)))
    y, x = data.draw(st.integers(0, h - 1)), data.draw(st.integers(0, w - 1))
    lab[y, x] += data.draw(st.sampled_from([0.5, 0.25, np.nan, np.inf]))
    p = tmpdir() / "a_masks.tif"
    tifffile.imwrite(p, lab)
    with pytest.raises(DataError) as ei:
        read_label_image(p)
    assert str(p) in str(ei.value)
    # a truncated file (of an integer label image) is a DataError too, never garbage labels
    tifffile.imwrite(p, np.nan_to_num(lab, posinf=0).astype(np.uint16))
    raw = p.read_bytes()
    cut = data.draw(st.integers(1, len(raw) - 1))
    p.write_bytes(raw[:cut])
    try:
        got = read_label_image(p)
    except DataError as e:
        assert str(p) in str(e)
    else:  # the cut only removed bytes the reader does not need (trailing metadata): same labels
        assert np.array_equal(got, np.nan_to_num(lab, posinf=0).astype(np.uint16))


# ---------------------------------------------------------------------------
# 7. cellbench prediction files (.jsonl, .jsonl.gz)
# ---------------------------------------------------------------------------

@FUZZ
@given(prediction_sets(), st.booleans())
def test_predictions_round_trip(preds, gz):
    p = tmpdir() / ("p.jsonl.gz" if gz else "p.jsonl")
    write_predictions(p, preds, CLASSES)
    got, header = read_predictions(p)
    assert header["classes"] == CLASSES and list(got) == list(preds)
    for k in preds:
        assert same_instances(got[k], preds[k])


@FUZZ
@given(prediction_sets(), st.data())
def test_truncated_gz_is_a_data_error(preds, data):
    p = tmpdir() / "p.jsonl.gz"
    write_predictions(p, preds, CLASSES)
    raw = p.read_bytes()
    p.write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1))])
    with pytest.raises(DataError) as ei:
        read_predictions(p)
    assert str(p) in str(ei.value)


REC_MUTATIONS = [
    ("drop image_id", lambda r: r.pop("image_id")), ("drop height", lambda r: r.pop("height")),
    ("drop counts", lambda r: r.pop("counts")), ("height str", lambda r: r.update(height="9")),
    ("width float", lambda r: r.update(width=r["width"] + 0.5)), ("height 0", lambda r: r.update(height=0)),
    ("width True", lambda r: r.update(width=True)), ("counts str", lambda r: r.update(counts="0")),
    ("counts of ints", lambda r: r.update(counts=[1, 2])), ("extra mask", lambda r: r["counts"].append("1")),
    ("score nan", lambda r: r.update(scores=[float("nan")] * len(r["counts"]) or [float("nan")])),
    ("score str", lambda r: r.update(scores=["x"] * (len(r["counts"]) or 1))),
    ("class float", lambda r: r.update(classes=[0.5] * (len(r["counts"]) or 1))),
    ("class -2", lambda r: r.update(classes=[-2] * (len(r["counts"]) or 1))),
    ("class beyond header", lambda r: r.update(classes=[7] * (len(r["counts"]) or 1))),
    ("image_id list", lambda r: r.update(image_id=[1])),
    ("bad rle", lambda r: r.update(counts=["!!"] * (len(r["counts"]) or 1))),
]


@FUZZ
@given(prediction_sets(nonempty=True), st.sampled_from(REC_MUTATIONS + [("not an object", None),
                                                                        ("not json", "text")]), st.data())
def test_prediction_record_corruptions(preds, mutation, data):
    label, mutate = mutation
    p = tmpdir() / "p.jsonl"
    write_predictions(p, preds, CLASSES)
    lines = p.read_text().splitlines()
    n = data.draw(st.integers(1, len(lines) - 1))
    if mutate is None:
        lines[n] = "[1, 2]"
    elif mutate == "text":
        lines[n] = lines[n][:-3]
    else:
        rec = json.loads(lines[n])
        mutate(rec)
        lines[n] = json.dumps(rec)
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as ei:
        read_predictions(p)
    assert f"{p}:{n + 1}" in str(ei.value), label


@FUZZ
@given(prediction_sets(), st.lists(st.tuples(st.integers(0, 10 ** 6), st.sampled_from(list('{}[]",:0159 abcn\n'))),
                                   min_size=1, max_size=3))
def test_prediction_random_edits_never_crash(preds, edits):
    p = tmpdir() / "p.jsonl"
    write_predictions(p, preds, CLASSES)
    text = p.read_text()
    for pos, ch in edits:
        pos %= len(text)
        text = text[:pos] + ch + text[pos + 1:]
    p.write_text(text)
    try:
        got, _ = read_predictions(p)
    except DataError as e:
        assert str(p) in str(e)
        return
    for inst in got.values():
        assert consistent(inst) and np.isfinite(inst.scores).all()


# ---------------------------------------------------------------------------
# 8. Kaggle submission csv
# ---------------------------------------------------------------------------

@FUZZ
@given(prediction_sets(nonempty=True), st.booleans(), st.booleans())
def test_submission_round_trip(preds, with_scores, bom):
    preds = {k: Instances(v.height, v.width, v.counts, np.where(v.classes < 0, 0, v.classes), v.scores)
             for k, v in preds.items()}
    p = tmpdir() / "sub.csv"
    write_submission(p, preds, CLASSES, with_scores=with_scores)
    if bom:
        p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes().replace(b"\n", b"\r\n"))
    got = read_submission(p, {k: (v.height, v.width) for k, v in preds.items()}, CLASSES)
    assert set(got) == set(preds)
    for k, v in preds.items():
        g = got[k]
        assert len(g) == len(v) and all(np.array_equal(a, b) for a, b in zip(g.counts, v.counts))
        if with_scores:
            assert np.allclose(g.scores, v.scores, atol=1e-6) and np.array_equal(g.classes, v.classes)


SUB_KINDS = ["odd", "not_int", "outside", "overlap", "unknown_id", "score_text", "score_nan", "cell_type",
             "fields", "huge"]


@FUZZ
@given(prediction_sets(nonempty=True), st.sampled_from(SUB_KINDS), st.data())
def test_submission_corruptions_are_data_errors(preds, kind, data):
    p = tmpdir() / "sub.csv"
    write_submission(p, preds, CLASSES, with_scores=True)
    rows = list(csv.reader(open(p, newline="")))
    r = data.draw(st.integers(1, len(rows) - 1))
    row = rows[r]     # id, predicted, score, cell_type
    v = row[1].split()
    h, w = preds[row[0]].height, preds[row[0]].width
    if kind == "odd":
        row[1] += " 4"
    elif kind == "not_int":
        row[1] += " 1e3"
    elif kind == "outside":
        row[1] = f"{h * w} 2"
    elif kind == "overlap":
        row[1] = " ".join(v[:2] + v[:2] + v[2:])
    elif kind == "unknown_id":
        row[0] = "nobody"
    elif kind == "score_text":
        row[2] = "high"
    elif kind == "score_nan":
        row[2] = "nan"
    elif kind == "cell_type":
        row[3] = "neuron"
    elif kind == "fields":
        row.append("x")
    elif kind == "huge":
        row[1] = "1 " + "9" * 30
    with open(p, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(DataError) as ei:
        read_submission(p, {k: (v.height, v.width) for k, v in preds.items()}, CLASSES)
    assert f"{p}:{r + 1}" in str(ei.value), kind


# ---------------------------------------------------------------------------
# 9. COCO results json
# ---------------------------------------------------------------------------

def results_doc(preds: dict[str, Instances]) -> list[dict]:
    return [{"image_id": k, "category_id": int(c) + 1, "score": float(s),
             "segmentation": rle.to_coco_rle(m, v.height, v.width)}
            for k, v in preds.items() for m, c, s in zip(v.counts, v.classes, v.scores)]


@FUZZ
@given(prediction_sets(nonempty=True), st.booleans())
def test_coco_results_round_trip(preds, bom):
    p = write_doc(results_doc(preds), bom)
    got = read_coco_results(p, {k: k for k in preds}, {k: (v.height, v.width) for k, v in preds.items()})
    for k, v in preds.items():
        assert same_instances(got[k], v)


RES_MUTATIONS = [
    ("not an object", None), ("drop segmentation", lambda d: d.pop("segmentation")),
    ("image_id unknown", lambda d: d.update(image_id="nobody")), ("image_id list", lambda d: d.update(image_id=[1])),
    ("image_id None", lambda d: d.update(image_id=None)), ("image_id True", lambda d: d.update(image_id=True)),
    ("score text", lambda d: d.update(score="0.5")), ("score True", lambda d: d.update(score=True)),
    ("score inf", lambda d: d.update(score=float("inf"))), ("category text", lambda d: d.update(category_id="1")),
    ("category float", lambda d: d.update(category_id=1.5)),
    ("segmentation size", lambda d: d["segmentation"].update(size=[1, 1])),
    ("segmentation counts", lambda d: d["segmentation"].update(counts=5)),
    ("segmentation polygon odd", lambda d: d.update(segmentation=[[0, 0, 1, 0, 1]])),
]


@FUZZ
@given(prediction_sets(nonempty=True), st.sampled_from(RES_MUTATIONS), st.data())
def test_coco_results_corruptions_are_data_errors(preds, mutation, data):
    label, mutate = mutation
    doc = results_doc(preds)
    k = data.draw(st.integers(0, len(doc) - 1))
    if mutate is None:
        doc[k] = [doc[k]]
    else:
        mutate(doc[k])
    p = write_doc(doc)
    with pytest.raises(DataError) as ei:
        read_coco_results(p, {i: i for i in preds}, {i: (v.height, v.width) for i, v in preds.items()})
    assert f"{p}: result #{k}" in str(ei.value), label


# the corruption targets (each a family of bad inputs, many with a dozen named mutation kinds); with the
# rows of tests/test_bad_input.py they are the bad-input classes the README counts
CORRUPTION_TARGETS = [
    "test_coco_string_corruptions", "test_coco_uncompressed_counts_corruptions",
    "test_kaggle_any_string_exact_or_refused", "test_polygons_accepted_iff_well_formed",
    "test_csv_corruptions_are_data_errors", "test_csv_random_edits_never_crash",
    "test_coco_corruptions_are_data_errors", "test_coco_random_value_swaps_never_crash",
    "test_label_image_fractional_or_truncated_refused", "test_truncated_gz_is_a_data_error",
    "test_prediction_record_corruptions", "test_prediction_random_edits_never_crash",
    "test_submission_corruptions_are_data_errors", "test_coco_results_corruptions_are_data_errors",
]


def test_bad_input_class_count_is_the_one_the_readme_quotes():
    """The README's "Tested: N bad-input classes (R table rows ..., and T ...)" counts the rows of
    tests/test_bad_input.py and the corruption targets here: adding one without the README fails."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bad_input_rows", Path(__file__).with_name("test_bad_input.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert all(callable(globals().get(n)) for n in CORRUPTION_TARGETS)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    m = re.search(r"Tested: (\d+) bad-input classes \((\d+) table rows.*?and (\d+)", readme, re.S)
    assert m, "the README no longer quotes the bad-input count"
    total, rows, targets = map(int, m.groups())
    assert (rows, targets) == (mod.BAD_INPUT_CLASSES, len(CORRUPTION_TARGETS)) and total == rows + targets
