"""The pieces every trainable adapter shares, each tested once in isolation (no framework)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.adapters.base import FitContext, log_record
from bench.adapters.registry import ConfigError, make_config
from bench.adapters.trainable import CHECKPOINT_SCHEMA, CheckpointError, read_meta
from bench.data import rle
from bench.data.masks import instances_from_masks, strip_counts
from bench.data.normalize import InputPolicy, normalize, to_gray, to_rgb, to_uint8

# ---- input policy ----------------------------------------------------------------------


def test_percentile_policy_is_bit_depth_invariant():
    """The same scene as uint8 and as uint16 reaches the model identically (up to 8-bit rounding)."""
    rng = np.random.default_rng(0)
    img16 = rng.integers(1000, 30000, (40, 50)).astype(np.uint16)
    img8 = np.round((img16.astype(np.float64) - 1000) / 29000 * 255).astype(np.uint8)
    a, b = normalize(img16), normalize(img8)
    assert a.dtype == np.float32 and a.min() == 0.0 and a.max() == 1.0
    assert np.abs(a - b).max() < 0.01


def test_policies_differ_as_documented():
    img = np.array([[10, 20], [30, 250]], dtype=np.uint8)
    np.testing.assert_allclose(normalize(img, InputPolicy("fixed")), img / 255.0, rtol=1e-6)
    np.testing.assert_allclose(normalize(img, InputPolicy("minmax")), (img - 10) / 240.0, rtol=1e-6)
    pct = normalize(img, InputPolicy("percentile", (0.0, 100.0)))
    np.testing.assert_allclose(pct, (img - 10) / 240.0, rtol=1e-6)
    u16 = np.array([[0, 65535]], dtype=np.uint16)
    np.testing.assert_allclose(normalize(u16, InputPolicy("fixed")), [[0.0, 1.0]])


def test_rgb_rgba_gray_and_flat_images():
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., :3] = np.arange(20, dtype=np.uint8).reshape(4, 5, 1) * 10
    rgba[..., 3] = 7  # alpha is dropped, never mixed into the statistics
    out = normalize(rgba, InputPolicy("minmax"))
    assert out.shape == (4, 5, 3) and out.max() == 1.0
    assert to_gray(out).shape == (4, 5) and to_rgb(to_gray(out)).shape == (4, 5, 3)
    assert not normalize(np.full((3, 3), 9, np.uint16)).any()  # flat image: zeros, no NaN
    assert to_uint8(np.array([0.0, 0.5, 1.0])).tolist() == [0, 128, 255]
    with pytest.raises(ValueError, match="shape"):
        normalize(np.zeros((3, 3, 2), np.uint8))


def test_policy_is_a_validated_option_of_every_model():
    for name in ("maskrcnn-tv", "cellpose", "cascade", "maskrcnn", "watershed"):
        cfg = make_config(name, "smoke", {"input_norm": "minmax"})
        assert InputPolicy.of(cfg) == InputPolicy("minmax")
        assert InputPolicy.of(make_config(name, "smoke")) == InputPolicy()  # identical by default
    with pytest.raises(ConfigError, match="input_norm"):
        make_config("maskrcnn-tv", "smoke", {"input_norm": "zscore"})
    with pytest.raises(ConfigError, match="input_percentiles"):
        make_config("cellpose", "smoke", {"input_percentiles": [99, 1]})


# ---- masks to instances ---------------------------------------------------------------------


def test_strip_encoding_equals_full_image_encoding():
    rng = np.random.default_rng(1)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(3, 40, 2))
        n = int(rng.integers(0, 5))
        masks, boxes = np.zeros((n, h, w), bool), []
        for i in range(n):
            y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
            y1, x1 = int(rng.integers(y0, h)) + 1, int(rng.integers(x0, w)) + 1
            masks[i, y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < 0.7
            if rng.random() < 0.2:  # a pixel outside the box: the whole image is encoded
                masks[i, int(rng.integers(0, h)), int(rng.integers(0, w))] = True
            boxes.append([x0, y0, x1, y1])
        inst = instances_from_masks(masks, np.array(boxes, float).reshape(-1, 4), np.arange(n) / 10.0,
                                    np.arange(n), h, w)
        kept = [i for i in range(n) if masks[i].any()]
        assert inst.classes.tolist() == kept and np.allclose(inst.scores, np.array(kept) / 10.0)
        for k, i in enumerate(kept):
            np.testing.assert_array_equal(inst.counts[k], rle.encode_mask(masks[i]))


def test_strip_counts_extend_the_strip_to_the_image():
    m = np.zeros((4, 5), bool)
    m[:, 1:3] = True                      # two full columns: one run of 8 after 4 background pixels
    np.testing.assert_array_equal(strip_counts(m, 1, 3), [4, 8, 8])
    np.testing.assert_array_equal(strip_counts(m, 0, 5), rle.encode_mask(m))
    m[:, 3:] = True                       # foreground up to the last pixel: no trailing background
    np.testing.assert_array_equal(strip_counts(m, 1, 5), [4, 16])
    m[0, 0] = True                        # foreground at the first pixel: a leading zero, as pycocotools
    np.testing.assert_array_equal(strip_counts(m, 0, 5), rle.encode_mask(m))


# ---- log schema and checkpoints ----------------------------------------------------------------


def test_log_records_use_one_schema(tmp_path):
    assert log_record({"iteration": 3, "time": 1.5, "loss": np.float32(0.5)}) == {"step": 3, "seconds": 1.5,
                                                                                "loss": 0.5}
    got = []
    ctx = FitContext(tmp_path, log_loss=got.append)
    ctx.start_clock()
    ctx.log_step(5, loss=1.0, parts={"loss_mask": 0.25}, lr=0.01)
    assert set(got[0]) == {"step", "loss", "loss_mask", "lr", "seconds"} and got[0]["seconds"] >= 0


def test_checkpoint_meta_is_checked(tmp_path):
    with pytest.raises(CheckpointError, match="no meta.json"):
        read_meta(tmp_path, "maskrcnn-tv")
    meta = {"schema_version": CHECKPOINT_SCHEMA, "adapter": "cellpose", "classes": [], "config": {},
            "input_policy": {}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="'cellpose', not of 'maskrcnn-tv'"):
        read_meta(tmp_path, "maskrcnn-tv")
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "schema_version": 0}))
    with pytest.raises(CheckpointError, match="schema 0"):
        read_meta(tmp_path, "cellpose")
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        read_meta(tmp_path, "cellpose")
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert read_meta(tmp_path, "cellpose")["adapter"] == "cellpose"
