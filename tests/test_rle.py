"""RLE: Kaggle and COCO round trips on the real annotations, and every malformed case named by row."""

import numpy as np
import pytest
from pycocotools import mask as mask_util

from bench.data import rle
from bench.data.errors import DataError
from bench.data.io import read_coco, read_sartorius


def test_kaggle_csv_equals_coco_json_on_real_annotations(real_csv, real_json):
    ds = read_sartorius(real_csv, require_images=False)
    dc = read_coco(real_json, require_images=False).by_id()
    assert sum(len(s.instances) for s in ds) == 7339
    for s in ds:
        c = dc[s.image_id].instances
        assert len(c) == len(s.instances)
        for a, b in zip(s.instances.counts, c.counts):
            np.testing.assert_array_equal(a, b)


def test_kaggle_round_trip_real(real_csv):
    import csv

    rows = list(csv.DictReader(open(real_csv)))[:400]
    for r in rows:
        h, w = int(r["height"]), int(r["width"])
        counts = rle.kaggle_decode(r["annotation"], h, w)
        assert rle.kaggle_encode(counts, h, w) == " ".join(r["annotation"].split())
        dense = rle.decode_mask(counts, h, w)
        assert rle.kaggle_encode_mask(dense) == rle.kaggle_encode(counts, h, w)


def test_compressed_strings_match_pycocotools(real_csv):
    ds = read_sartorius(real_csv, require_images=False)
    s = ds.samples[3]
    for c in s.instances.counts[:100]:
        m = rle.decode_mask(c, s.height, s.width)
        ref = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
        assert rle.counts_to_string(c) == ref["counts"].decode()
        np.testing.assert_array_equal(rle.string_to_counts(ref["counts"]), c)
        np.testing.assert_array_equal(rle.encode_mask(m), c)
        assert rle.area(c) == int(mask_util.area(ref))


def test_random_masks_round_trip_including_edges():
    rng = np.random.default_rng(1)
    for _ in range(50):
        h, w = rng.integers(1, 40, size=2)
        m = rng.random((h, w)) < rng.random()
        c = rle.encode_mask(m)
        np.testing.assert_array_equal(rle.decode_mask(c, h, w), m)
        assert int(c.astype(np.int64).sum()) == h * w
        np.testing.assert_array_equal(rle.string_to_counts(rle.counts_to_string(c)), c)
        np.testing.assert_array_equal(rle.kaggle_decode(rle.kaggle_encode_mask(m), h, w) if m.any() else c, c)
        ys, xs = np.nonzero(m) if m.any() else (np.array([0]), np.array([0]))
        y0, x0 = int(ys.min()), int(xs.min())
        np.testing.assert_array_equal(rle.encode_mask_at(m[y0:, x0:], y0, x0, h, w), c)


def test_label_image_encoding_matches_per_label():
    rng = np.random.default_rng(2)
    lab = rng.integers(0, 6, size=(30, 25))
    ids, counts = rle.encode_label_image(lab)
    assert list(ids) == [1, 2, 3, 4, 5]
    for i, c in zip(ids, counts):
        np.testing.assert_array_equal(rle.decode_mask(c, 30, 25), lab == i)


@pytest.mark.parametrize("ann,problem", [
    ("1 2 3", "odd number"),
    ("5 0", "positive"),
    ("0 3", "outside"),
    ("99 5", "outside"),
    ("10 3 5 2", "not sorted"),
    ("10 3 12 2", "overlap"),
    ("", "empty"),
    ("1 x", "not an integer"),
])
def test_kaggle_decode_errors_name_the_row(ann, problem):
    with pytest.raises(DataError) as e:
        rle.kaggle_decode_many(["1 2", ann], 10, 10, ["train.csv:2", "train.csv:3"])
    assert "train.csv:3" in str(e.value) and problem in str(e.value)


def test_vectorised_runs_match_per_mask_and_corner_pixels():
    """Masks touching the last and first pixel must not merge in the vectorised decode."""
    h, w = 4, 5
    anns = ["20 1", "1 1", "1 3 6 2", "18 3"]
    got = rle.kaggle_decode_many(anns, h, w)
    for a, c in zip(anns, got):
        m = np.zeros(h * w, bool)
        v = list(map(int, a.split()))
        for s, l in zip(v[0::2], v[1::2]):
            m[s - 1:s - 1 + l] = True
        np.testing.assert_array_equal(c, rle.encode_mask(m.reshape(h, w)))
    s, l, o = rle.runs_of_many(got)
    for i, c in enumerate(got):
        s1, l1 = rle.runs_from_counts(c)
        np.testing.assert_array_equal(s[o == i], s1)
        np.testing.assert_array_equal(l[o == i], l1)


def test_kaggle_decode_matches_dense_masks_with_runs_wrapping_rows():
    """Runs that cross the end of a row (a mask touching the right border and the next row's left)
    decode to the same pixels and the same COCO counts as the dense mask."""
    rng = np.random.default_rng(1)
    wrapped = 0
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 12, 2))
        masks = [rng.random((h, w)) < rng.uniform(0.05, 0.9) for _ in range(int(rng.integers(1, 5)))]
        masks = [m for m in masks if m.any()] or [np.ones((h, w), bool)]
        anns = [rle.kaggle_encode_mask(m) for m in masks]
        for a in anns:
            v = np.array(a.split(), dtype=np.int64)
            wrapped += int(((v[0::2] - 1) % w + v[1::2] > w).sum())
        for c, m in zip(rle.kaggle_decode_many(anns, h, w), masks):
            np.testing.assert_array_equal(c, rle.encode_mask(m))
    assert wrapped > 100  # the case under test really occurred
