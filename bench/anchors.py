"""Cell size from the training set: anchor sizes (``anchor_sizes: auto``) and the detectors' scale
(``train_crop: auto``, ``image_scale: auto``), instead of constants.

The presets' anchors (8-128 px, Sartorius-sized cells at 520 px) are numbers someone chose for
one data set. ``auto`` measures the cells the network will actually see: every training
instance's size ``sqrt(box_w * box_h)`` (what an anchor's size means in Detectron2 and
torchvision: the square root of its area), times the factor by which the model resizes its
image (:func:`resize_factor`; after a training crop when ``train_crop`` is on, since the model
resizes the crop). The anchors are then one octave apart per FPN level (the levels' strides are
octaves), centred in log scale on the middle of the ``LOW_PCT``..``HIGH_PCT`` percentile range; if
that range is wider than the octaves span, they are spread evenly over it in log scale instead.
No anchor is smaller than ``MIN_STRIDE_RATIO`` times its level's stride: on DSB2018 the derived
6-89 px anchors (1.5x stride at P2) cost Detectron2 0.10 Kaggle mAP against 8-128 px
(``results/real/dsb2018-native-exp``), because an anchor barely larger than the stride between
neighbouring anchors overlaps a small cell little wherever the cell sits between two of them.

The scale: a shortest-edge-resizing detector (Detectron2, torchvision) sees an image at
``short / short side``, a factor set by the image's size, not by its cells (a 1388x1040 DSB2018
image shrunk to 384 px has 7-px nuclei; a 256x256 one grown to 384 px has 30-px ones).
``train_crop: auto`` (:func:`auto_scale_crop`) picks the training crop (and the prediction tile)
whose resize to ``short`` brings the training set's median cell to ``target_cell_px``, the size the
presets' anchors are built around, as Cellpose rescales every image to its ``diam_mean``. A crop at
least as large as every training image means whole images (no crop). Cascade, which rescales by a
factor, gets that factor instead (:func:`auto_image_scale`).

Pure numpy; the adapters record what was derived in their checkpoint's ``meta.json``.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from bench.data.sample import Instances

LOW_PCT, HIGH_PCT = 5.0, 95.0
MIN_ANCHOR = 2
MIN_STRIDE_RATIO = 2.0          # anchor >= 2x its FPN level's stride (the presets' 8-128 px on 4-64)
FPN_STRIDES = (4, 8, 16, 32, 64)  # P2-P6 of Detectron2's, torchvision's and MMDetection's FPNs
CROP_GRID = 32                  # derived crops and tiles are multiples of this (FPN size divisibility)
MIN_CROP = 128


def resize_factor(height: int, width: int, short: int, long: int) -> float:
    """The scale of torchvision's / Detectron2's shortest-edge resize: short side to ``short``
    unless the long side would pass ``long`` (``short`` 0: no resize)."""
    if short <= 0:
        return 1.0
    return min(short / min(height, width), long / max(height, width))


def instance_sizes(instances: Iterable[Instances], scales: Iterable[float] | None = None) -> np.ndarray:
    """``sqrt(box_w * box_h)`` of every instance, times its image's scale (1 when not given)."""
    out = []
    insts = list(instances)
    for inst, s in zip(insts, scales if scales is not None else [1.0] * len(insts)):
        b = inst.boxes_xywh()
        if len(b):
            out.append(np.sqrt(b[:, 2] * b[:, 3]) * float(s))
    return np.concatenate(out) if out else np.zeros(0)


def auto_anchor_sizes(sizes: Sequence[float] | np.ndarray, levels: int = 5,
                      strides: Sequence[int] | None = FPN_STRIDES) -> list[int]:
    """``levels`` anchor sizes (px, increasing) for instances of these sizes, none under
    ``MIN_STRIDE_RATIO`` x its level's stride (``strides`` None: no floor; see the module doc)."""
    sizes = np.asarray(sizes, dtype=float)
    sizes = sizes[np.isfinite(sizes) & (sizes > 0)]
    if sizes.size == 0:
        raise ValueError("anchor_sizes=auto: the training split has no instance to measure")
    lo, hi = np.percentile(sizes, [LOW_PCT, HIGH_PCT])
    centre = np.sqrt(lo * hi)
    octaves = centre * 2.0 ** (np.arange(levels) - (levels - 1) / 2.0)
    if octaves[0] > lo or octaves[-1] < hi:  # wider than the octaves reach
        octaves = np.geomspace(lo, hi, levels)
    out = [max(MIN_ANCHOR, int(round(x))) for x in octaves]
    if strides is not None:
        out = [max(a, int(round(MIN_STRIDE_RATIO * st))) for a, st in zip(out, strides)]
    for k in range(1, levels):  # rounding must not make two levels equal
        out[k] = max(out[k], out[k - 1] + 1)
    return out


def training_sizes(instances: Sequence[Instances], short: int, long: int, crop: int = 0) -> np.ndarray:
    """Instance sizes as a shortest-edge-resizing detector sees them in training: each image cropped
    to ``crop`` (0: whole) and resized by :func:`resize_factor`."""
    scales = []
    for inst in instances:
        h, w = (min(crop, inst.height), min(crop, inst.width)) if crop else (inst.height, inst.width)
        scales.append(resize_factor(h, w, short, long))
    return instance_sizes(instances, scales)


def summary(sizes: np.ndarray, anchors: Sequence[float]) -> dict:
    """What ``meta.json`` records: the anchors and the size percentiles they came from."""
    p = np.percentile(sizes, [LOW_PCT, 50.0, HIGH_PCT]) if len(sizes) else [None] * 3
    return {"anchor_sizes": [float(a) for a in anchors], "instances": int(len(sizes)),
            "size_p5": float(p[0]) if len(sizes) else None, "size_median": float(p[1]) if len(sizes) else None,
            "size_p95": float(p[2]) if len(sizes) else None, "measure": "sqrt(box_w*box_h) after resize"}


def median_cell_px(instances: Sequence[Instances]) -> float:
    """The training set's median cell size at native scale (``sqrt(box_w * box_h)``)."""
    sizes = instance_sizes(instances)
    if sizes.size == 0:
        raise ValueError("train_crop/image_scale=auto: the training split has no instance to measure")
    return float(np.median(sizes))


def auto_scale_crop(instances: Sequence[Instances], short: int, target_cell_px: float) -> dict:
    """``train_crop: auto``: the square crop (native px, a multiple of ``CROP_GRID``) that the
    detector's resize of its short side to ``short`` turns into a view with the median training
    cell at ``target_cell_px``; ``train_crop`` 0 (whole images) when no training image is larger.
    The prediction tile is the same crop, so a cell is seen at one scale in training and test."""
    median = median_cell_px(instances)
    crop = max(MIN_CROP, int(round(short * median / target_cell_px / CROP_GRID)) * CROP_GRID)
    largest = max(max(i.height, i.width) for i in instances)
    used = 0 if crop >= largest else crop
    return {"train_crop": used, "predict_tile": used, "derived_crop": crop, "largest_image": int(largest),
            "median_cell_px": round(median, 2), "target_cell_px": float(target_cell_px), "resize_short": int(short),
            "rule": "crop = short * median / target, rounded to 32 px; 0 (whole) if >= the largest image"}


def auto_image_scale(instances: Sequence[Instances], target_cell_px: float, step: float = 0.05) -> dict:
    """``image_scale: auto`` (Cascade's resize factor): ``target / median``, rounded to ``step``."""
    median = median_cell_px(instances)
    scale = max(step, round(target_cell_px / median / step) * step)
    return {"image_scale": round(min(scale, 8.0), 4), "median_cell_px": round(median, 2),
            "target_cell_px": float(target_cell_px), "rule": "image_scale = target / median, rounded to 0.05"}
