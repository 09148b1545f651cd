"""One masks-to-instances path for every adapter that predicts per-instance masks.

Mask R-CNN-style models return one image-sized mask per detection. Encoding N full
images is the expensive part of their inference (about 1.5 s per 1000 detections on a
704x520 image), and before this module each adapter did it its own way (full-image
encode, box crop with a Python loop, ...), so their timings were not comparable. Here
every mask is cropped to its box (with a margin, falling back to the whole image when
pixels lie outside), encoded by pycocotools' C encoder, and its runs are moved to the
full image in numpy: the same cost for every model, proportional to the box area.
"""

from __future__ import annotations

import numpy as np

from bench.data import rle
from bench.data.sample import Instances


def _crop_window(box, height: int, width: int, margin: float = 0.15) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) around an (x0, y0, x1, y1) box: pasted masks may spill a little past it
    (Mask R-CNN pastes a 28x28 grid with padding)."""
    bx0, by0, bx1, by1 = (float(v) for v in box)
    pad_x, pad_y = 2 + margin * (bx1 - bx0), 2 + margin * (by1 - by0)
    x0, y0 = max(int(bx0 - pad_x), 0), max(int(by0 - pad_y), 0)
    x1, y1 = min(int(np.ceil(bx1 + pad_x)), width), min(int(np.ceil(by1 + pad_y)), height)
    return y0, max(y1, y0), x0, max(x1, x0)


def place_counts(crop_counts: np.ndarray, crop_h: int, y0: int, x0: int, height: int, width: int) -> np.ndarray:
    """Counts of a crop (crop_h rows, column-major) placed at (y0, x0) -> counts of the full image."""
    starts, lengths = rle.runs_from_counts(crop_counts)
    if starts.size == 0:
        return np.array([height * width], dtype=np.uint32)
    ends = starts + lengths
    first_col, last_col = starts // crop_h, (ends - 1) // crop_h
    pieces = last_col - first_col + 1          # a run wraps over this many crop columns
    run = np.repeat(np.arange(starts.size), pieces)
    col = first_col[run] + (np.arange(run.size) - np.repeat(np.cumsum(pieces) - pieces, pieces))
    p_start = np.maximum(starts[run], col * crop_h)
    p_end = np.minimum(ends[run], (col + 1) * crop_h)
    full_start = (x0 + col) * height + y0 + (p_start - col * crop_h)
    full_end = full_start + (p_end - p_start)
    # pieces that touch in the full image (a crop as tall as the image) become one run
    touch = np.flatnonzero(full_start[1:] == full_end[:-1]) + 1
    keep_start = np.ones(full_start.size, bool)
    keep_start[touch] = False
    keep_end = np.ones(full_end.size, bool)
    keep_end[touch - 1] = False
    s, e = full_start[keep_start], full_end[keep_end]
    out = np.empty(2 * s.size + 1, dtype=np.int64)
    out[0:-1:2] = s - np.concatenate(([0], e[:-1]))
    out[1::2] = e - s
    out[-1] = height * width - e[-1]
    if out[-1] == 0:
        out = out[:-1]
    return out.astype(np.uint32)


def encode_crop(crop: np.ndarray) -> np.ndarray:
    """A boolean crop -> its COCO counts, by pycocotools' C encoder."""
    from pycocotools import mask as mask_utils

    enc = mask_utils.encode(np.asfortranarray(crop.astype(np.uint8, copy=False)[:, :, None]))[0]
    return rle.string_to_counts(enc["counts"])


def instances_from_masks(masks: np.ndarray, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                         height: int, width: int) -> Instances:
    """N image-sized boolean masks + their (x0, y0, x1, y1) boxes -> :class:`Instances`.

    Empty masks are dropped (with their scores and classes). ``masks`` may be a numpy
    array or anything indexable per instance that yields H x W booleans.
    """
    counts, keep = [], []
    for i in range(len(boxes)):
        m = np.asarray(masks[i], dtype=bool)
        y0, y1, x0, x1 = _crop_window(boxes[i], height, width)
        crop = m[y0:y1, x0:x1]
        total = int(np.count_nonzero(m))
        if total == 0:
            continue
        if int(np.count_nonzero(crop)) != total:  # pixels outside the window: encode the whole image
            crop, y0, x0 = m, 0, 0
        counts.append(place_counts(encode_crop(crop), crop.shape[0], y0, x0, height, width))
        keep.append(i)
    keep_idx = np.asarray(keep, dtype=np.int64)
    return Instances(height, width, counts, np.asarray(classes, dtype=np.int64)[keep_idx],
                     np.asarray(scores, dtype=np.float64)[keep_idx])
