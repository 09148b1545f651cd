"""Dataset statistics (``bench data stats``) and full validation (``bench data check``)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from bench.data import rle
from bench.data.errors import DataError
from bench.data.sample import Dataset


@dataclass
class ClassStats:
    cell_type: str
    images: int
    instances: int
    per_image_min: int
    per_image_median: float
    per_image_max: int
    area_p05: float
    area_p50: float
    area_p95: float
    intensity_mean: float | None
    intensity_std: float | None


def dataset_stats(dataset: Dataset, with_images: bool = True) -> list[ClassStats]:
    per_img: dict[str, list[int]] = defaultdict(list)
    areas: dict[str, list[np.ndarray]] = defaultdict(list)
    means: dict[str, list[float]] = defaultdict(list)
    stds: dict[str, list[float]] = defaultdict(list)
    for s in dataset:
        ct = s.cell_type(dataset.classes)
        per_img[ct].append(len(s.instances))
        areas[ct].append(s.instances.areas)
        if with_images and s.path is not None:
            img = s.image.astype(np.float64)
            means[ct].append(float(img.mean()))
            stds[ct].append(float(img.std()))
    out = []
    for ct in [c for c in dataset.classes if c in per_img] + sorted(set(per_img) - set(dataset.classes)):
        n = np.array(per_img[ct])
        a = np.concatenate(areas[ct]) if areas[ct] else np.zeros(0)
        q = np.percentile(a, [5, 50, 95]) if a.size else [np.nan] * 3
        out.append(ClassStats(ct, len(n), int(n.sum()), int(n.min()), float(np.median(n)), int(n.max()),
                              float(q[0]), float(q[1]), float(q[2]),
                              float(np.mean(means[ct])) if means[ct] else None,
                              float(np.mean(stds[ct])) if stds[ct] else None))
    return out


def stats_table(rows: list[ClassStats]) -> str:
    """A Markdown table (the README carries two of these)."""
    head = ("| class | images | instances | inst/img min / median / max | area p5 / p50 / p95 (px) "
            "| intensity mean / std |\n|---|---:|---:|---|---|---|")
    lines = [head]
    for r in rows:
        inten = "n/a (no images)" if r.intensity_mean is None else f"{r.intensity_mean:.1f} / {r.intensity_std:.1f}"
        lines.append(f"| {r.cell_type} | {r.images} | {r.instances} | {r.per_image_min} / {r.per_image_median:g} / "
                     f"{r.per_image_max} | {r.area_p05:.0f} / {r.area_p50:.0f} / {r.area_p95:.0f} | {inten} |")
    return "\n".join(lines)


def check_dataset(dataset: Dataset) -> dict:
    """Read every image and mask; raise DataError on a problem, else return a summary.

    The readers already validated the RLE, classes and sizes; this adds what needs
    the pixels: image presence, decodability, size agreement (every unreadable or wrongly
    sized image is listed, not only the first), empty masks.
    """
    from bench.preflight import PreflightError, check_images

    seen: set[str] = set()
    n_masks = overlap_px = annotated_px = duplicates = 0
    for s in dataset:
        if s.image_id in seen:
            raise DataError(s.meta.get("source", dataset.name), f"duplicate image id {s.image_id}")
        seen.add(s.image_id)
        if s.path is None:
            raise DataError(s.meta.get("source", dataset.name), f"image of id {s.image_id} is missing")
        pix = [rle.pixel_indices(c) for c in s.instances.counts]
        for k, p in enumerate(pix):
            if p.size == 0:
                raise DataError(s.meta.get("source", dataset.name), f"id {s.image_id}: mask {k} is empty")
        keys = [c.tobytes() for c in s.instances.counts]
        duplicates += len(keys) - len(set(keys))  # the real Sartorius csv repeats a few masks: kept, reported
        if pix:
            allp = np.concatenate(pix)
            u = np.unique(allp).size
            annotated_px += u
            overlap_px += allp.size - u
        n_masks += len(pix)
    bad = check_images(dataset)  # reads every image, checks its size against the annotations
    if bad:
        raise PreflightError([why for _, why in bad], where=dataset.root or dataset.name,
                             when="with the images")
    gaps = [(s.meta["source"], s.meta["label_gaps"]) for s in dataset if s.meta.get("label_gaps")]
    return {"images": len(dataset), "masks": n_masks, "classes": dataset.classes,
            "overlapping_pixel_fraction": overlap_px / max(annotated_px, 1), "duplicate_masks": duplicates,
            "label_gaps": [f"{src}: labels up to {g['max_label']} but {g['cells']} cells" for src, g in gaps]}
