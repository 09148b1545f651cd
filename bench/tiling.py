"""Parts of large images: random training crops and tiled prediction, shared by every adapter.

Detectors resize whole images to one short side (the ``cpu`` presets: 384 px). A 1388x1040 DSB2018
image shrunk to 384 px loses its 7-px nuclei. The alternative, written once here:

* **Training crops** (``train_crop: <px>``, 0 = off, the detectors' shared option): an image larger
  than the crop is trained on a random ``min(crop, H) x min(crop, W)`` window, offsets uniform
  over every position (Detectron2's and MMDetection's ``RandomCrop`` with ``crop_type="absolute"``
  draw the same way); instances cut by the window are clipped to it, and any instance left with
  fewer than ``train_crop_min_area`` pixels is dropped. The crop comes before the model's resize,
  so with ``min_size`` equal to the crop, crops are seen at native scale. :func:`crop_window` and
  :func:`crop_instances` are the rule; torchvision uses them directly, Detectron2 and MMDetection
  spell the same rule in their own augmentation lists (their adapters say how).
* **Tiled prediction** (``predict_tile: <px>``, ``predict_tile_overlap: <px>``, every adapter): an
  image larger than the tile is predicted as overlapping tiles (the last tile of a row/column is
  aligned to the image edge) and the instances are stitched back (:func:`stitch`):

  1. *ownership*: the overlap between two neighbouring tiles is split at its middle, so the tiles
     own a partition of the image; an instance is kept only from the tile that owns its box centre
     (the tile where it is most central). With an overlap wider than a cell, a cell cut by one
     tile's border lies whole in its neighbour, whose copy is the one kept;
  2. *merging*: kept instances of different tiles that still overlap (a cell wider than the
     overlap, cut in both tiles) are merged when, inside the window both tiles saw, their
     intersection covers >= ``MERGE_IOS`` of the smaller one there: union of the masks, the higher
     score and its class.

  Tiles are cut from the image *after* the input policy has been applied to the whole image and
  the adapter predicts them under the identity policy (``fixed`` on [0, 1] floats), so a tile's
  intensities are those of the whole image, as the training crops' are (per-tile percentiles would
  stretch a dim tile). An adapter whose config has no ``input_norm`` gets raw tiles.

Everything here works on :class:`~bench.data.sample.Instances` (run-length counts) and numpy; no
framework import.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import numpy as np

from bench.data import rle
from bench.data.sample import Instances, Sample

MERGE_IOS = 0.5   # intersection over the smaller mask at which two tiles' instances are one cell

PredictFn = Callable[[Sequence[Sample]], "list[Instances]"]


# ---------------------------------------------------------------------------
# training crops
# ---------------------------------------------------------------------------

def crop_window(height: int, width: int, size: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(y0, x0, h, w) of a random ``size`` window: ``min(size, H) x min(size, W)``, every offset
    equally likely (what Detectron2's and MMDetection's absolute RandomCrop draw)."""
    h, w = min(int(size), height), min(int(size), width)
    return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w


def crop_counts(counts: np.ndarray, height: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """One mask (counts on a ``height``-row image) clipped to the window, as counts of the window."""
    idx = rle.pixel_indices(counts)
    x, y = np.divmod(idx, height)
    keep = (y >= y0) & (y < y0 + h) & (x >= x0) & (x < x0 + w)
    return rle.counts_from_indices((x[keep] - x0) * h + (y[keep] - y0), h * w)


def crop_instances(inst: Instances, y0: int, x0: int, h: int, w: int, min_area: int = 1) -> Instances:
    """Instances clipped to a window; those left with fewer than ``min_area`` pixels are dropped."""
    counts = [crop_counts(c, inst.height, y0, x0, h, w) for c in inst.counts]
    keep = np.array([rle.area(c) >= max(int(min_area), 1) for c in counts], dtype=bool)
    return Instances(h, w, [c for c, k in zip(counts, keep) if k], inst.classes[keep],
                     None if inst.scores is None else inst.scores[keep])


def random_crop(image, inst: Instances, size: int, rng: np.random.Generator, min_area: int = 1,
                channels_first: bool = False):
    """An image (H x W [x C] array, or C x H x W with ``channels_first``: a torch tensor) and its
    instances cropped to one random window (:func:`crop_window`, :func:`crop_instances`)."""
    y0, x0, h, w = crop_window(inst.height, inst.width, size, rng)
    img = image[:, y0:y0 + h, x0:x0 + w] if channels_first else image[y0:y0 + h, x0:x0 + w]
    return img, crop_instances(inst, y0, x0, h, w, min_area)


# ---------------------------------------------------------------------------
# tiles
# ---------------------------------------------------------------------------

def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start offsets along one axis of length ``n``: stride ``tile - overlap``, the last tile
    aligned to the end (so every tile is ``tile`` long when ``n >= tile``)."""
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"predict_tile={tile} with overlap {overlap}: need tile > 0 and 0 <= overlap < tile")
    if n <= tile:
        return [0]
    return sorted(set(range(0, n - tile, tile - overlap)) | {n - tile})


def owned(starts: Sequence[int], k: int, tile: int, n: int) -> tuple[int, int]:
    """[lo, hi) of the axis that tile ``k`` owns: overlaps split at their middle, so the tiles'
    owned ranges partition [0, n)."""
    lo = 0 if k == 0 else (starts[k] + min(starts[k - 1] + tile, n)) // 2
    hi = n if k == len(starts) - 1 else (starts[k + 1] + min(starts[k] + tile, n)) // 2
    return lo, hi


def shift_counts(counts: np.ndarray, th: int, y0: int, x0: int, height: int, width: int) -> np.ndarray:
    """A tile's mask (tile of ``th`` rows) placed at (y0, x0) of the full image, as full counts."""
    x, y = np.divmod(rle.pixel_indices(counts), th)
    return rle.counts_from_indices((x + x0) * height + (y + y0), height * width)


def _centres(inst: Instances) -> np.ndarray:
    """(cy, cx) box centres, from the runs (no dense masks)."""
    b = inst.boxes_xywh()
    return np.stack([b[:, 1] + b[:, 3] / 2.0, b[:, 0] + b[:, 2] / 2.0], axis=1) if len(b) else np.zeros((0, 2))


def stitch(parts: Sequence[tuple[int, int, Instances]], height: int, width: int, tile: int,
           overlap: int) -> Instances:
    """One image's instances from its tiles' predictions: ``parts`` = (y0, x0, instances in tile
    coordinates) for every tile of :func:`tile_starts`' grid (see the module doc)."""
    ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    counts, classes, scores, tile_of = [], [], [], []
    rects = [(y0, x0, y0 + p.height, x0 + p.width) for y0, x0, p in parts]
    with_scores = any(p.scores is not None for _, _, p in parts)
    for t, (y0, x0, inst) in enumerate(parts):
        (ylo, yhi), (xlo, xhi) = owned(ys, ys.index(y0), tile, height), owned(xs, xs.index(x0), tile, width)
        for i, (cy, cx) in enumerate(_centres(inst)):
            if ylo <= cy + y0 < yhi and xlo <= cx + x0 < xhi:
                counts.append(shift_counts(inst.counts[i], inst.height, y0, x0, height, width))
                classes.append(int(inst.classes[i]))
                scores.append(1.0 if inst.scores is None else float(inst.scores[i]))
                tile_of.append(t)
    out = Instances(height, width, counts, np.asarray(classes, dtype=np.int64), np.asarray(scores, dtype=float))
    out = merge_across_tiles(out, np.asarray(tile_of, dtype=np.int64), rects)
    return out if with_scores else Instances(height, width, out.counts, out.classes, None)


def _area_in(counts: np.ndarray, height: int, rect: tuple[int, int, int, int]) -> int:
    x, y = np.divmod(rle.pixel_indices(counts), height)
    return int(((y >= rect[0]) & (y < rect[2]) & (x >= rect[1]) & (x < rect[3])).sum())


def merge_across_tiles(inst: Instances, tile_of: np.ndarray, rects: Sequence[tuple[int, int, int, int]],
                       ios: float = MERGE_IOS) -> Instances:
    """Instances of different tiles are one cell when, inside the window both tiles saw (``rects``:
    y0, x0, y1, x1 per tile), their intersection is >= ``ios`` of the smaller one's area there:
    their union, with the best score and its class (groups by union-find, so chains merge too)."""
    from bench.metrics.matching import mask_overlaps

    n = len(inst)
    if n < 2:
        return inst
    ov = mask_overlaps(inst.counts, inst.counts, inst.height, inst.width)
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b, inter in zip(ov.gt_idx.tolist(), ov.pred_idx.tolist(), ov.inter.tolist()):
        if a >= b or tile_of[a] == tile_of[b]:
            continue
        ra, rb = rects[tile_of[a]], rects[tile_of[b]]
        both = (max(ra[0], rb[0]), max(ra[1], rb[1]), min(ra[2], rb[2]), min(ra[3], rb[3]))
        small = min(_area_in(inst.counts[a], inst.height, both), _area_in(inst.counts[b], inst.height, both))
        if inter >= ios * small:
            parent[root(a)] = root(b)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    scores = inst.scores if inst.scores is not None else np.ones(n)
    counts, classes, out_scores = [], [], []
    for members in groups.values():
        best = max(members, key=lambda i: (scores[i], -i))
        if len(members) == 1:
            counts.append(inst.counts[best])
        else:
            pix = np.unique(np.concatenate([rle.pixel_indices(inst.counts[i]) for i in members]))
            counts.append(rle.counts_from_indices(pix, inst.height * inst.width))
        classes.append(int(inst.classes[best]))
        out_scores.append(float(scores[best]))
    order = np.argsort(-np.asarray(out_scores), kind="stable")
    return Instances(inst.height, inst.width, [counts[i] for i in order], np.asarray(classes)[order],
                     np.asarray(out_scores)[order])


def tiles_of(sample: Sample, image: np.ndarray, tile: int, overlap: int) -> Iterator[tuple[int, int, Sample]]:
    """(y0, x0, tile sample) for every tile of ``image`` (the sample's image, maybe normalised)."""
    h, w = sample.height, sample.width
    for y0 in tile_starts(h, tile, overlap):
        for x0 in tile_starts(w, tile, overlap):
            crop = np.ascontiguousarray(image[y0:y0 + tile, x0:x0 + tile])
            yield y0, x0, Sample(f"{sample.image_id}@{y0},{x0}",
                                 Instances.empty(crop.shape[0], crop.shape[1], with_scores=False),
                                 None, dict(sample.meta), crop)


def _has_policy(adapter) -> bool:
    return hasattr(getattr(adapter, "cfg", None), "input_norm")


@contextlib.contextmanager
def _identity_policy(adapter) -> Iterator[None]:
    """While tiles are predicted, the adapter's input policy is the identity (``fixed`` on float
    [0, 1] tiles, normalised as a whole image): its config says ``input_norm=fixed`` and, for a
    trainable adapter, so does the policy it keeps (``TrainableAdapter.policy``)."""
    from bench.data.normalize import InputPolicy

    old_cfg, old_policy = adapter.cfg, getattr(adapter, "policy", None)
    adapter.cfg = old_cfg.model_copy(update={"input_norm": "fixed"})
    if isinstance(old_policy, InputPolicy):
        adapter.policy = InputPolicy("fixed")
    try:
        yield
    finally:
        adapter.cfg = old_cfg
        if isinstance(old_policy, InputPolicy):
            adapter.policy = old_policy


def predict_tiled(adapter, samples: Sequence[Sample], tile: int, overlap: int) -> list[Instances]:
    """``adapter.predict`` on ``samples``, images larger than ``tile`` as stitched tiles (one
    predict call per image: its tiles are the batch); smaller ones whole, as they are.

    While raw maps are captured (``adapter.raw_maps``, bench/raw.py), the adapter appends one map
    per *tile*; they are stitched into one map per image (:func:`stitch_maps`) and left in the
    samples' order, so the capture sees what an untiled predict would have appended."""
    from bench.data.normalize import InputPolicy, normalize

    recording = getattr(adapter, "raw_maps", None) is not None
    start = len(adapter.raw_maps) if recording else 0
    maps: list[dict] = [{} for _ in samples]
    out: list[Instances | None] = [None] * len(samples)
    small = [k for k, s in enumerate(samples) if s.height <= tile and s.width <= tile]
    if small:
        for k, pred in zip(small, adapter.predict([samples[k] for k in small])):
            out[k] = pred
        for k, m in zip(small, _maps_since(adapter, start)):
            maps[k] = m
    for k, s in enumerate(samples):
        if out[k] is not None:
            continue
        if _has_policy(adapter):
            grid = list(tiles_of(s, normalize(s.image, InputPolicy.of(adapter.cfg)), tile, overlap))
            with _identity_policy(adapter):
                preds = adapter.predict([t for _, _, t in grid])
        else:
            grid = list(tiles_of(s, s.image, tile, overlap))
            preds = adapter.predict([t for _, _, t in grid])
        out[k] = stitch([(y0, x0, p) for (y0, x0, _), p in zip(grid, preds)], s.height, s.width, tile, overlap)
        tile_maps = _maps_since(adapter, start)
        if tile_maps:
            maps[k] = stitch_maps([(y0, x0, m) for (y0, x0, _), m in zip(grid, tile_maps)], s.height, s.width,
                                  tile, overlap)
    if recording:
        adapter.raw_maps.extend(maps)
    return out  # type: ignore[return-value]


def _maps_since(adapter, start: int) -> list[dict]:
    """The maps the adapter appended since ``start``, removed from its capture list."""
    got = getattr(adapter, "raw_maps", None)
    if got is None:
        return []
    taken = list(got[start:])
    del got[start:]
    return taken


def stitch_maps(parts: Sequence[tuple[int, int, dict]], height: int, width: int, tile: int,
                overlap: int) -> dict:
    """One image's per-pixel maps from its tiles' maps: each tile fills the part of the image it owns
    (:func:`owned`, the same partition as the instances). A map may be at a coarser resolution
    than its tile (StarDist's grid): the tile's own ratio scales the owned rectangle. Keys every
    tile has are stitched; a tile without maps leaves none for the image."""
    if not parts or any(not m for _, _, m in parts):
        return {}
    ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    th, tw = min(tile, height), min(tile, width)
    out = {}
    for key in set.intersection(*(set(m) for _, _, m in parts)):
        first = np.asarray(parts[0][2][key])
        fy, fx = first.shape[0] / th, first.shape[1] / tw
        full = np.zeros((int(round(height * fy)), int(round(width * fx))) + first.shape[2:], dtype=first.dtype)
        for y0, x0, m in parts:
            a = np.asarray(m[key])
            (ylo, yhi), (xlo, xhi) = owned(ys, ys.index(y0), tile, height), owned(xs, xs.index(x0), tile, width)
            oy0, oy1 = int(round(ylo * fy)), min(int(round(yhi * fy)), full.shape[0])
            ox0, ox1 = int(round(xlo * fx)), min(int(round(xhi * fx)), full.shape[1])
            sy0, sx0 = oy0 - int(round(y0 * fy)), ox0 - int(round(x0 * fx))
            h, w = min(oy1 - oy0, a.shape[0] - sy0), min(ox1 - ox0, a.shape[1] - sx0)
            full[oy0:oy0 + h, ox0:ox0 + w] = a[sy0:sy0 + h, sx0:sx0 + w]
        out[key] = full
    return out


def predictor(adapter) -> PredictFn:
    """The adapter's predict function under its config's ``predict_tile`` (read at each call: a
    checkpoint's ``load`` replaces the config)."""

    def predict(samples: Sequence[Sample]) -> list[Instances]:
        tile = getattr(adapter.cfg, "predict_tile", 0) or 0
        if tile == "auto":
            raise ValueError(f"{adapter.name}: predict_tile=auto is the tile its fit derives (train_crop=auto); "
                             "this model has not been fitted with it, so give a number of pixels")
        tile = int(tile)
        if tile <= 0:
            return adapter.predict(samples)
        overlap = int(getattr(adapter.cfg, "predict_tile_overlap", 0) or 0)
        return predict_tiled(adapter, samples, tile, overlap)

    return predict
