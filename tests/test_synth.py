"""The synthetic Sartorius-format generator: format, determinism and realism."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from bench.data import rle
from bench.data.io import read_sartorius
from bench.data.synth import CSV_COLUMNS, _kaggle_rle_crop, generate, image_id

REAL_MEDIAN_AREA = {"shsy5y": 196, "astro": 557, "cort": 203}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synth_small"), n_images=6, size=(128, 128), seed=3)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = generate(tmp_path_factory.mktemp("synth_full"), n_images=12, size=(704, 520), seed=0)
    return out, read_sartorius(out)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_is_byte_identical_other_seed_differs(small, tmp_path):
    again = generate(tmp_path / "again", n_images=6, size=(128, 128), seed=3)
    other = generate(tmp_path / "other", n_images=6, size=(128, 128), seed=4)
    a, b, c = _files(small), _files(again), _files(other)
    assert len(a) == 7 and a == b
    assert a["train.csv"] != c["train.csv"]
    assert set(a) != set(c)  # ids derive from the seed
    assert image_id(3, 0) != image_id(4, 0) and image_id(3, 0) != image_id(3, 1)
    assert len(image_id(3, 0)) == 12 and int(image_id(3, 0), 16) >= 0


def test_csv_format_and_reader_roundtrip(small):
    with open(small / "train.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        rows = list(reader)
    ds = read_sartorius(small)  # validates every RLE and finds every image
    assert len(ds) == 6
    assert sum(len(s.instances) for s in ds) == len(rows)
    types = {s.meta["cell_type"] for s in ds}
    assert types == {"shsy5y", "astro", "cort"}  # every type at least once when n >= 3
    by_sample = defaultdict(set)
    for s in ds:
        assert len(s.instances) >= 1
        img = s.image
        assert img.dtype == np.uint8 and img.shape == (128, 128)
        by_sample[s.meta["sample_id"]].add(s.meta["cell_type"])
        assert s.meta["group"] == s.meta["sample_id"]
        for k in ("plate_time", "sample_date", "elapsed_timedelta"):
            assert s.meta[k]
        for i in range(len(s.instances)):
            m = s.instances.dense(i)
            assert m.sum() >= 8
            assert ndi.label(m)[1] == 1  # one 4-connected region
    assert all(len(t) == 1 for t in by_sample.values())  # a sample (well) has one cell type
    assert len(by_sample) < len(ds)  # some images share a sample_id


def test_crop_encoder_matches_full_mask_encoder():
    rng = np.random.default_rng(0)
    for _ in range(500):
        H, W = rng.integers(1, 10, 2)
        h, w = rng.integers(1, H + 1), rng.integers(1, W + 1)
        y0, x0 = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
        m = rng.random((h, w)) < rng.random()
        if not m.any():
            continue
        full = np.zeros((H, W), dtype=bool)
        full[y0:y0 + h, x0:x0 + w] = m
        assert _kaggle_rle_crop(m, int(y0), int(x0), int(W)) == rle.kaggle_encode_mask(full)


def test_full_size_statistics_look_real(full):
    _, ds = full
    areas, per_image, means = defaultdict(list), defaultdict(list), []
    for s in ds:
        ct = s.meta["cell_type"]
        areas[ct].extend(s.instances.areas.tolist())
        per_image[ct].append(len(s.instances))
        means.append(float(s.image.mean()))
    assert set(areas) == {"shsy5y", "astro", "cort"}
    for ct, real in REAL_MEDIAN_AREA.items():
        med = float(np.median(areas[ct]))
        assert real / 1.5 <= med <= real * 1.5, (ct, med)
    mean_n = {ct: np.mean(v) for ct, v in per_image.items()}
    assert mean_n["shsy5y"] > max(mean_n["astro"], mean_n["cort"])
    assert max(areas["astro"]) > 2000
    assert all(128 - 15 <= m <= 128 + 15 for m in means)


def test_some_ground_truth_masks_overlap(full):
    _, ds = full
    n_overlapping_images, total_ov, total_fg = 0, 0, 0
    for s in ds:
        pix = [rle.pixel_indices(c) for c in s.instances.counts]
        allp = np.concatenate(pix)
        uniq = np.unique(allp)
        total_ov += allp.size - uniq.size
        total_fg += uniq.size
        if allp.size > uniq.size:
            n_overlapping_images += 1
    assert n_overlapping_images >= 1
    assert total_ov < 0.1 * total_fg  # a few percent, not a pile-up

    # an explicit pair with pixel sets in the first image that has one
    for s in ds:
        sets = [set(rle.pixel_indices(c).tolist()) for c in s.instances.counts]
        pair = next(((i, j) for i in range(len(sets)) for j in range(i + 1, len(sets)) if sets[i] & sets[j]), None)
        if pair is not None:
            i, j = pair
            assert 0 < len(sets[i] & sets[j]) < min(len(sets[i]), len(sets[j]))
            break
    else:
        pytest.fail("no overlapping pair of masks")
