"""Anchor sizes from the training set (``anchor_sizes: auto``), instead of constants.

The presets' anchors (8-128 px, Sartorius-sized cells at 520 px) are numbers someone chose for
one data set. ``auto`` measures the cells the network will actually see: every training
instance's size ``sqrt(box_w * box_h)`` (what an anchor's size means in Detectron2 and
torchvision: the square root of its area), times the factor by which the model resizes its
image (:func:`resize_factor`; after a training crop when ``train_crop`` is on, since the model
resizes the crop). The anchors are then one octave apart per FPN level (the levels' strides are
octaves), centred in log scale on the middle of the ``LOW_PCT``..``HIGH_PCT`` percentile range; if
that range is wider than the octaves span, they are spread evenly over it in log scale instead.

Pure numpy; the adapters record what was derived in their checkpoint's ``meta.json``.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from bench.data.sample import Instances

LOW_PCT, HIGH_PCT = 5.0, 95.0
MIN_ANCHOR = 2


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


def auto_anchor_sizes(sizes: Sequence[float] | np.ndarray, levels: int = 5) -> list[int]:
    """``levels`` anchor sizes (px, increasing) for instances of these sizes (see the module doc)."""
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
