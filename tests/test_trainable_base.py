"""The pieces every trainable adapter shares, each tested once in isolation (no framework)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.adapters.base import AdapterConfig, Capabilities, FitContext, log_record
from bench.adapters.registry import ConfigError, make_config
from bench.adapters.trainable import (CHECKPOINT_SCHEMA, CheckpointError, TrainableAdapter, amp_enabled,
                                      configure_torch, read_meta, seed_everything)
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


# ---- the template (fit / save / load) with a framework-free adapter ------------------------------


class _ToyConfig(AdapterConfig):
    iterations: int = 2


class _Toy(TrainableAdapter):
    """Trains 'weights' from numpy's global RNG: what it learns depends only on the seeding the base does."""

    name = "toy"
    framework = "numpy"
    capabilities = Capabilities(predicts_classes=False, overlapping_masks=False)
    Config = _ToyConfig

    def train(self, train, val, ctx):
        self.clock_started = ctx._t0 is not None
        self.weights = np.random.rand(3)

    def predict(self, samples):
        return []

    def save_weights(self, directory: Path) -> None:
        np.save(directory / "w.npy", self.weights)

    def load_weights(self, directory: Path) -> None:
        self.weights = np.load(directory / "w.npy")

    def checkpoint_extra(self) -> dict:
        return {"scale": float(self.weights.sum())}

    def restore_extra(self, extra: dict) -> None:
        self.scale = extra["scale"]


def _toy_fit(tmp_path, seed: int, **opts) -> _Toy:
    cfg = _ToyConfig(**opts)
    toy = _Toy(_ToyConfig(), ["a", "b"])
    np.random.seed(1000 + seed)  # whatever the global RNG held before: the base seeds from ctx.seed
    toy.fit([], [], cfg, FitContext(tmp_path / "work", seed=seed))
    return toy


def test_fit_seeds_and_takes_the_config_and_policy_it_is_given(tmp_path):
    a, b, c = _toy_fit(tmp_path, 5), _toy_fit(tmp_path, 5), _toy_fit(tmp_path, 6)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert not np.array_equal(a.weights, c.weights)
    assert a.clock_started
    m = _toy_fit(tmp_path, 5, input_norm="minmax", iterations=7)
    assert m.cfg.iterations == 7 and m.policy == InputPolicy("minmax")  # fit's cfg, not the constructor's


def test_save_load_round_trip_restores_config_classes_policy_and_extras(tmp_path):
    toy = _toy_fit(tmp_path, 3, input_norm="fixed", iterations=9)
    toy.save(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "meta.json").read_text())
    assert meta["adapter"] == "toy" and meta["classes"] == ["a", "b"]
    assert InputPolicy(meta["input_policy"]["norm"], tuple(meta["input_policy"]["percentiles"])) == toy.policy
    fresh = _Toy(_ToyConfig(), ["other"])
    fresh.load(tmp_path / "ckpt")
    assert fresh.cfg == toy.cfg and fresh.classes == ["a", "b"] and fresh.policy == InputPolicy("fixed")
    np.testing.assert_array_equal(fresh.weights, toy.weights)
    img = np.array([[0, 51], [102, 255]], np.uint8)
    np.testing.assert_array_equal(fresh.model_input(img), normalize(img, InputPolicy("fixed")))  # the loaded policy
    assert fresh.scale == pytest.approx(float(toy.weights.sum()))
    # a config this version does not accept: a CheckpointError naming the folder, not a pydantic trace
    meta["config"]["no_such_option"] = 1
    (tmp_path / "ckpt" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'ckpt'}.*does not fit"):
        _Toy(_ToyConfig(), []).load(tmp_path / "ckpt")


def test_seed_everything_repeats_python_numpy_and_torch_draws():
    import random

    torch = pytest.importorskip("torch")

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    seed_everything(11)
    first = draws()
    seed_everything(11)
    assert draws() == first
    seed_everything(12)
    assert draws() != first


def test_amp_only_where_asked_and_on_cuda(tmp_path):
    got = []
    ctx = FitContext(tmp_path, log_loss=got.append)
    assert amp_enabled(_ToyConfig(), "cuda:1", ctx) is False  # the toy has no amp option: never
    asked = type("Amp", (), {"amp": True})()
    assert amp_enabled(asked, "cuda:1", ctx) is True and got == []
    assert amp_enabled(asked, "cpu", ctx) is False
    assert "mixed precision needs CUDA" in got[0]["note"]  # asked on CPU: said, not silent


def test_configure_torch_undoes_a_frameworks_autotuning():
    torch = pytest.importorskip("torch")
    before = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    try:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
        configure_torch("cpu")
        assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.deterministic is True
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before


# ---- the validation-point hook --------------------------------------------------------------------

def test_validation_points_every_n_steps_and_at_the_end(tmp_path, tiny_synth):
    from bench.data.io import read_sartorius
    from bench.metrics.kaggle import quick_map

    val = read_sartorius(tiny_synth).samples[:2]
    assert not FitContext(tmp_path, eval_every=3).validation_due(3, 10)  # no validation split: never
    assert not FitContext(tmp_path, val=val).validation_due(3, 10)       # eval_every 0: never
    points = []
    ctx = FitContext(tmp_path, val=val, eval_every=3, log_val=points.append)
    assert [s for s in range(1, 11) if ctx.validation_due(s, 10)] == [3, 6, 9, 10]
    half = [s.instances.subset(np.arange(len(s.instances)) % 2 == 0) for s in val]
    for inst in half:
        inst.scores = np.ones(len(inst))
    value = ctx.validate(3, lambda samples: half)
    assert value == points[0]["kaggle_map"] == pytest.approx(quick_map([s.instances for s in val], half))
    assert 0 < value < 1 and points[0]["step"] == 3 and ctx.validation_seconds > 0


# ---- input policy: what percentiles are for ------------------------------------------------------

def test_percentile_policy_clips_hot_pixels_that_minmax_lets_dominate():
    rng = np.random.default_rng(3)
    img = rng.integers(100, 200, (64, 64)).astype(np.uint16)
    img[5, 5] = 65535  # one hot pixel
    pct, mm = normalize(img), normalize(img, InputPolicy("minmax"))
    assert pct[5, 5] == 1.0 and mm[5, 5] == 1.0
    rest = np.ones(img.shape, bool)
    rest[5, 5] = False
    assert pct[rest].max() > 0.9 and pct[rest].min() < 0.1  # the cells keep the whole range
    assert mm[rest].max() < 0.01                            # under minmax they are crushed to black
    p = InputPolicy("percentile", (2.0, 98.0))
    d = p.as_dict()
    assert InputPolicy(d["norm"], tuple(d["percentiles"])) == p and json.loads(json.dumps(d)) == d


def test_policy_values_are_checked_and_every_dtype_has_its_fixed_range():
    with pytest.raises(ValueError, match="input_norm"):
        InputPolicy("zscore")
    with pytest.raises(ValueError, match="input_percentiles"):
        InputPolicy("percentile", (99.0, 1.0))
    fixed = InputPolicy("fixed")
    f = np.array([[0.0, 0.25], [0.5, 1.0]], np.float32)
    np.testing.assert_array_equal(fixed(f), f)  # floats already in [0, 1] pass unchanged
    i32 = np.array([[0, np.iinfo(np.int32).max]], np.int32)
    np.testing.assert_allclose(fixed(i32), [[0.0, 1.0]])
    assert normalize(np.zeros((3, 4, 1), np.uint8)).shape == (3, 4)  # a single channel axis is squeezed


def test_weights_files_are_local_or_a_clear_error(tmp_path):
    from bench.adapters.base import check_weights_file

    assert check_weights_file(None) is None
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'w.pt'} does not exist.*never downloads"):
        check_weights_file(str(tmp_path / "w.pt"))
    (tmp_path / "w.pt").write_bytes(b"x")
    assert check_weights_file(str(tmp_path / "w.pt")) == tmp_path / "w.pt"
