"""Export samples to the YOLO segmentation dataset layout (Ultralytics' format), written once.

Layout (what Ultralytics' ``check_det_dataset`` reads)::

    OUT/data.yaml                 path, train, val, names
    OUT/images/<split>/<id>.png   the image as the model should see it (8-bit, grey or RGB)
    OUT/labels/<split>/<id>.txt   one line per instance: class x1 y1 x2 y2 ... (polygon, coordinates / size)

Any adapter that trains through a framework reading this layout uses this module; it imports no
framework. Each instance mask becomes the polygon of its largest outer contour (sub-pixel, through
pixel centres, simplified to within half a pixel); a mask in several pieces keeps its largest piece,
and a mask too small to have a contour (under ~2 pixels) is left out and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import yaml

from bench.data.sample import Sample


@dataclass
class YoloExport:
    """What was written: the dataset yaml, per split the images and instances, and the masks left out."""

    yaml_path: Path
    images: dict[str, int] = field(default_factory=dict)
    instances: dict[str, int] = field(default_factory=dict)
    skipped_masks: int = 0


def mask_polygon(mask: np.ndarray, tolerance: float = 0.5) -> np.ndarray | None:
    """The largest outer contour of a boolean mask as an (N, 2) array of (x, y) coordinates.

    Coordinates follow COCO's polygon convention (pixel k spans [k, k+1)), which annotation tools
    and YOLO's normalised coordinates times the image size use. None for a mask without a 3-point contour.
    """
    from skimage import measure

    padded = np.pad(np.asarray(mask, dtype=np.uint8), 1)
    contours = measure.find_contours(padded, 0.5)
    if not contours:
        return None
    best = max(contours, key=_area)
    if tolerance > 0:
        best = measure.approximate_polygon(best, tolerance)
    if len(best) > 1 and np.array_equal(best[0], best[-1]):
        best = best[:-1]
    if len(best) < 3:
        return None
    rows, cols = best[:, 0] - 1 + 0.5, best[:, 1] - 1 + 0.5  # undo the padding; pixel centre -> +0.5
    return np.stack([cols, rows], axis=1)


def _area(c: np.ndarray) -> float:
    y, x = c[:, 0], c[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def label_lines(sample: Sample, n_classes: int) -> tuple[list[str], int]:
    """The label file's lines for one sample, and how many masks had no polygon.

    Class-agnostic instances (class -1) go to class 0; classes outside the list are an error."""
    inst = sample.instances
    h, w = inst.height, inst.width
    lines, skipped = [], 0
    for i in range(len(inst)):
        c = int(inst.classes[i])
        c = 0 if c < 0 else c
        if c >= n_classes:
            raise ValueError(f"{sample.image_id}: instance {i} has class {c}, but there are {n_classes} classes")
        poly = mask_polygon(inst.dense(i))
        if poly is None:
            skipped += 1
            continue
        xy = np.clip(poly / [w, h], 0.0, 1.0)
        lines.append(f"{c} " + " ".join(f"{v:.6f}" for v in xy.ravel()))
    return lines, skipped


def export_yolo_seg(splits: dict[str, Sequence[Sample] | str], out: Path, classes: Sequence[str],
                    image_fn: Callable[[Sample], np.ndarray]) -> YoloExport:
    """Write ``splits`` ({"train": samples, "val": samples}) under ``out`` in the YOLO segmentation layout.

    ``image_fn`` turns a sample into the 8-bit image the model should see (the adapter applies the
    shared input policy there). A split given as another split's name (``{"val": "train"}``) points at
    that split's images: Ultralytics needs a ``val`` entry, and an adapter that must not look at the
    benchmark's validation images points it at the training images.
    """
    from PIL import Image

    out = Path(out)
    done = YoloExport(out / "data.yaml")
    folders = {}
    for split, samples in splits.items():
        if isinstance(samples, str):  # another split's images again, not written twice
            folders[split] = f"images/{samples}"
            continue
        folders[split] = f"images/{split}"
        img_dir, lab_dir = out / "images" / split, out / "labels" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        lab_dir.mkdir(parents=True, exist_ok=True)
        n_inst, seen = 0, {}
        for s in samples:
            img = np.asarray(image_fn(s))
            if img.dtype != np.uint8:
                raise ValueError(f"{s.image_id}: the exported image must be 8-bit, got {img.dtype}")
            stem = _safe_stem(s.image_id)
            if seen.setdefault(stem, s.image_id) != s.image_id:
                raise ValueError(f"image ids {seen[stem]!r} and {s.image_id!r} both become file {stem}.png")
            Image.fromarray(img).save(img_dir / f"{stem}.png")
            lines, skipped = label_lines(s, len(classes))
            (lab_dir / f"{stem}.txt").write_text("".join(line + "\n" for line in lines))
            n_inst += len(lines)
            done.skipped_masks += skipped
        done.images[split], done.instances[split] = len(samples), n_inst
    doc = {"path": str(out.resolve()), **folders,
           "names": {i: str(c) for i, c in enumerate(classes)}}
    done.yaml_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return done


def _safe_stem(image_id: str) -> str:
    """A file name for an image id (ids may hold path separators)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(image_id))
