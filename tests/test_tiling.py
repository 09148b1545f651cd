"""Training crops, tiled prediction and auto anchors (bench/tiling.py, bench/anchors.py): pure helpers."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from bench import anchors, tiling
from bench.data.normalize import InputPolicy, normalize
from bench.data.sample import Instances, Sample


def _disks(h: int, w: int, centres, radii) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    lab = np.zeros((h, w), np.int32)
    for k, ((cy, cx), r) in enumerate(zip(centres, radii), start=1):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    return lab


def _masks(inst: Instances) -> set[bytes]:
    return {np.asarray(c, dtype=np.uint32).tobytes() for c in inst.counts}


# ---------------------------------------------------------------------------
# training crops
# ---------------------------------------------------------------------------

def test_crop_window_is_clamped_and_reaches_every_offset():
    rng = np.random.default_rng(0)
    wins = [tiling.crop_window(40, 100, 32, rng) for _ in range(3000)]
    assert {(h, w) for _, _, h, w in wins} == {(32, 32)}
    assert {y for y, *_ in wins} == set(range(9)) and {x for _, x, *_ in wins} == set(range(69))
    assert tiling.crop_window(20, 100, 32, rng)[0::2] == (0, 20)  # smaller than the crop: whole along y


def test_crop_clips_cut_instances_and_drops_small_ones():
    lab = np.zeros((60, 80), np.int32)
    lab[10:20, 10:20] = 1      # inside the window
    lab[25:35, 36:46] = 2      # cut by the window's right edge (x < 40): 4 columns x 10 rows kept
    lab[40:42, 38:48] = 3      # cut to 2 x 2 = 4 px: under min_area 5, dropped
    lab[50:58, 60:70] = 4      # outside
    inst = Instances.from_label_image(lab, cls_id=0)
    out = tiling.crop_instances(inst, 5, 0, 40, 40, min_area=5)
    assert (out.height, out.width) == (40, 40)
    got = out.to_label_image()
    want = lab[5:45, 0:40].copy()
    want[want == 3] = 0
    assert sorted(out.areas.tolist()) == [40, 100]  # instance 2 clipped to 4 x 10, instance 3 dropped
    np.testing.assert_array_equal(got > 0, want > 0)
    # random_crop: the image window and the instances' window are the same one
    img = np.arange(60 * 80, dtype=np.float32).reshape(60, 80)
    cimg, cinst = tiling.random_crop(img, inst, 40, np.random.default_rng(3), 1)
    y0, x0 = divmod(int(cimg[0, 0]), 80)
    np.testing.assert_array_equal(cinst.to_label_image() > 0, lab[y0:y0 + 40, x0:x0 + 40] > 0)
    chw, cinst2 = tiling.random_crop(np.stack([img] * 3), inst, 40, np.random.default_rng(3), 1, channels_first=True)
    np.testing.assert_array_equal(chw[0], cimg)


# ---------------------------------------------------------------------------
# tiles
# ---------------------------------------------------------------------------

def test_tile_grid_covers_the_image_and_ownership_partitions_it():
    assert tiling.tile_starts(100, 128, 32) == [0]
    starts = tiling.tile_starts(300, 128, 32)
    assert starts[0] == 0 and starts[-1] == 300 - 128 and all(b - a <= 96 for a, b in zip(starts, starts[1:]))
    owned = [tiling.owned(starts, k, 128, 300) for k in range(len(starts))]
    assert owned[0][0] == 0 and owned[-1][1] == 300 and all(a[1] == b[0] for a, b in zip(owned, owned[1:]))
    for (lo, hi), s in zip(owned, starts):
        assert s <= lo < hi <= s + 128
    with pytest.raises(ValueError, match="overlap"):
        tiling.tile_starts(300, 64, 64)


class _Components:
    """A stand-in model: each connected bright blob is an instance (score = its mean brightness).
    Records the images it was given, to check what tiles look like."""

    def __init__(self, cfg=None):
        self.cfg = cfg
        self.seen: list[np.ndarray] = []

    def predict(self, samples):
        out = []
        for s in samples:
            img = normalize(s.image, InputPolicy.of(self.cfg)) if self.cfg is not None else s.image
            self.seen.append(img)
            lab, n = ndi.label(img > 0.5)
            inst = Instances.from_label_image(lab, cls_id=0)
            inst.scores = np.array([float(img[lab == k].mean()) for k in range(1, n + 1)])
            out.append(inst)
        return out


def test_tiled_prediction_equals_whole_image_prediction_and_reassembles_cut_cells():
    """Cells anywhere, several across tile borders: tiled = untiled, mask for mask. One cell sits on
    the first tile's right border (x = 128): its cut copy in tile 0 is replaced by the whole one."""
    rng = np.random.default_rng(1)
    h, w = 230, 300
    centres = [(int(rng.integers(12, h - 12)), int(rng.integers(12, w - 12))) for _ in range(40)] + [(60, 127)]
    lab = _disks(h, w, centres, [int(r) for r in rng.integers(4, 10, 40)] + [9])
    img = (lab > 0).astype(np.float32) * 0.9
    s = Sample("a", Instances.empty(h, w, with_scores=False), _image=img)
    model = _Components()
    whole = model.predict([s])[0]
    tiles = tiling.predict_tiled(model, [s], 128, 32)[0]
    assert len(tiles) == len(whole) and _masks(tiles) == _masks(whole)
    cut = _disks(h, w, [(60, 127)], [9]) > 0
    assert cut[:, :128].any() and cut[:, 128:].any()  # tile 0 ends at x = 128: it sees the cell cut
    assert any(tiles.dense(i)[cut].all() for i in range(len(tiles)))  # reassembled: whole, from tile 1
    # a small image is predicted whole, in one call
    small = Sample("b", Instances.empty(100, 90, with_scores=False), _image=img[:100, :90])
    assert _masks(tiling.predict_tiled(model, [small], 128, 32)[0]) == _masks(model.predict([small])[0])


class _MapModel(_Components):
    """Also keeps per-pixel maps as Cellpose and StarDist do while raw maps are captured: a full-
    resolution one (the image) and one on StarDist's 2x2 grid (every other pixel)."""

    raw_maps = None

    def predict(self, samples):
        out = super().predict(samples)
        if self.raw_maps is not None:
            for img in self.seen[-len(samples):]:
                self.raw_maps.append({"prob": img.astype(np.float32), "grid": img[::2, ::2].astype(np.float32)})
        return out


def test_tiled_prediction_stitches_the_tiles_maps_into_one_map_per_image_in_order():
    """With tiles on, the capture gets one map per image (not per tile), equal to the untiled
    map at full and at grid resolution, in the samples' order (a small image before a large one
    in the same call, or after it)."""
    from bench.raw import capture, take_maps

    rng = np.random.default_rng(3)
    big = Sample("big", Instances.empty(230, 300, with_scores=False),
                 _image=rng.random((230, 300)).astype(np.float32))
    small = Sample("small", Instances.empty(100, 90, with_scores=False),
                   _image=rng.random((100, 90)).astype(np.float32))
    for order in ([big, small], [small, big]):
        model = _MapModel()
        with capture(model, None):
            tiling.predict_tiled(model, order, 128, 32)
            tiled = take_maps(model)
        with capture(model, None):
            model.predict(order)
            whole = take_maps(model)
        assert len(tiled) == len(whole) == 2
        for t, w in zip(tiled, whole):
            assert set(t) == {"prob", "grid"} and t["prob"].shape == w["prob"].shape
            np.testing.assert_array_equal(t["prob"], w["prob"])
            np.testing.assert_array_equal(t["grid"], w["grid"])
    # a prediction outside a capture keeps no maps
    model = _MapModel()
    tiling.predict_tiled(model, [big], 128, 32)
    assert model.raw_maps is None


def test_a_cell_wider_than_the_overlap_is_merged_from_its_pieces():
    """A 40 px bar across a border with an 8 px overlap is cut in both tiles; the pieces are one cell."""
    h, w = 64, 120
    img = np.zeros((h, w), np.float32)
    img[20:30, 40:80] = 0.9
    s = Sample("a", Instances.empty(h, w, with_scores=False), _image=img)
    out = tiling.predict_tiled(_Components(), [s], 64, 8)[0]
    assert len(out) == 1
    np.testing.assert_array_equal(out.dense(0), img > 0.5)


def test_tiles_carry_the_whole_images_normalisation():
    """Percentiles of the whole image, not of each tile: a dim tile is not stretched to full range."""
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 100, (96, 200)).astype(np.float32)
    img[:, 120:] *= 10  # the right part is bright
    s = Sample("a", Instances.empty(96, 200, with_scores=False), _image=img)
    from bench.adapters.base import AdapterConfig

    cfg = AdapterConfig(input_percentiles=(1.0, 99.8))
    policy = InputPolicy.of(cfg)
    model = _Components(cfg)
    tiling.predict_tiled(model, [s], 96, 16)
    whole = normalize(img, policy)
    starts = tiling.tile_starts(200, 96, 16)
    assert len(model.seen) == len(starts)
    for x0, seen in zip(starts, model.seen):
        np.testing.assert_allclose(seen, whole[:, x0:x0 + 96], atol=1e-6)
    assert model.cfg is cfg  # restored


# ---------------------------------------------------------------------------
# auto anchors
# ---------------------------------------------------------------------------

def _disk_set(diameters, size=400):
    """One image of well-separated squares of the given sides (sqrt(w*h) = side exactly)."""
    lab = np.zeros((size, size), np.int32)
    per_row = size // 50
    for k, d in enumerate(diameters, start=1):
        y, x = divmod(k - 1, per_row)
        lab[y * 50:y * 50 + d, x * 50:x * 50 + d] = k
    return Instances.from_label_image(lab, cls_id=0)


def test_auto_anchor_sizes_from_known_sizes():
    sides = list(range(10, 41))  # 31 cells, 10..40 px
    inst = _disk_set(sides, 400)
    sizes = anchors.instance_sizes([inst])
    np.testing.assert_allclose(np.sort(sizes), sides)
    a = anchors.auto_anchor_sizes(sizes, strides=None)
    lo, hi = np.percentile(sides, [5, 95])
    assert len(a) == 5 and a[0] <= lo and a[-1] >= hi
    assert all(1.8 <= b / a_ <= 2.2 for a_, b in zip(a, a[1:]))  # one octave per FPN level
    assert abs(np.log(a[2] / np.sqrt(lo * hi))) < 0.1              # centred on the size range
    # resized x2 by the model: anchors double
    a2 = anchors.auto_anchor_sizes(anchors.instance_sizes([inst], [2.0]), strides=None)
    assert all(abs(y - 2 * x) <= 1 for x, y in zip(a, a2))
    # a range wider than four octaves: spread over it instead
    spread = np.geomspace(3, 300, 200)
    wide = anchors.auto_anchor_sizes(spread, strides=None)
    lo, hi = np.percentile(spread, [5, 95])
    assert abs(wide[0] - lo) <= 0.5 and abs(wide[-1] - hi) <= 0.5 and wide == sorted(set(wide))
    with pytest.raises(ValueError, match="no instance"):
        anchors.auto_anchor_sizes([])


def test_auto_anchors_never_fall_under_twice_their_stride():
    """Cells smaller than the FPN can place anchors for: the floor (2x stride), not the data, sets the
    small levels; cells large enough keep the derived octaves."""
    small = anchors.auto_anchor_sizes(np.geomspace(9, 55, 50))  # DSB2018's nuclei in 384-px crops
    assert small == [8, 16, 32, 64, 128]
    assert anchors.auto_anchor_sizes(np.geomspace(9, 55, 50), strides=None)[0] < 8
    big = anchors.auto_anchor_sizes(np.geomspace(30, 120, 50))
    assert big == anchors.auto_anchor_sizes(np.geomspace(30, 120, 50), strides=None) and big[0] >= 8


def test_auto_scale_crop_puts_the_median_cell_at_the_target():
    inst = _disk_set([20] * 8, 400)  # median 20 px, images 400 px
    got = anchors.auto_scale_crop([inst], short=200, target_cell_px=20)
    assert got["train_crop"] == got["predict_tile"] == 192  # 200 * 20 / 20 on the 32-px grid
    assert got["median_cell_px"] == 20 and got["largest_image"] == 400
    # the crop resized to 200 px shows the median cell at ~20 px
    np.testing.assert_allclose(anchors.training_sizes([inst], 200, 10_000, crop=got["train_crop"]), 20 * 200 / 192)
    # smaller target: larger crop (the cells are shrunk more); at least the largest image: whole images
    whole = anchors.auto_scale_crop([inst], short=200, target_cell_px=8)
    assert whole["derived_crop"] == 512 and whole["train_crop"] == whole["predict_tile"] == 0
    assert anchors.auto_scale_crop([inst], short=200, target_cell_px=1000)["train_crop"] == anchors.MIN_CROP
    scale = anchors.auto_image_scale([inst], target_cell_px=30)
    assert scale["image_scale"] == 1.5 and anchors.auto_image_scale([inst], 7)["image_scale"] == 0.35
    with pytest.raises(ValueError, match="no instance"):
        anchors.auto_scale_crop([Instances.empty(50, 50)], 200, 20)


def test_training_sizes_follow_crop_and_resize():
    inst = _disk_set([20] * 4, 400)
    # 400 px short side to 200: x0.5
    np.testing.assert_allclose(anchors.training_sizes([inst], 200, 1000), [10] * 4)
    # cropped to 100 first, then resized to 200: x2
    np.testing.assert_allclose(anchors.training_sizes([inst], 200, 1000, crop=100), [40] * 4)
    assert anchors.resize_factor(100, 400, 200, 600) == pytest.approx(1.5)  # the long side caps it
    assert anchors.resize_factor(100, 400, 0, 600) == 1.0
