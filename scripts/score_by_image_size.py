"""Kaggle mAP per image-size group and modality, for one model across several runs on one split.

Why: on DSB2018 a crop or a tile changes only the images larger than it, while anchors change
every image. Scoring by size group separates the two (images <= 384 px are predicted whole and
trained uncropped with train_crop=384, so a change there comes from the anchors or from what the
network learned on the other images).

    python scripts/score_by_image_size.py ../shared/data/dsb2018/annotations.json maskrcnn RUN [RUN ...]

Reads each run's ``models/<model>[--options]/metrics.json`` (``per_image``) and the dataset's image
sizes and ``modality``; prints a markdown table, one column per run, and for each run after the
first its paired difference from the first (mean over images, 95% CI of 10,000 bootstrap
resamples of the images, seed 0: the same images in both settings, so this is the paired test).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

GROUPS = ((384, "<= 384 px"), (768, "385-768 px"), (10**9, "> 768 px"))


def size_group(height: int, width: int) -> str:
    side = max(height, width)
    return next(name for limit, name in GROUPS if side <= limit)


def model_metrics(run: Path, model: str) -> dict:
    """The metrics of ``model`` in ``run`` (its plain label or one with options)."""
    found = [p for p in sorted((run / "models").glob(f"{model}*/metrics.json"))
             if p.parent.name.split("--")[0] == model]
    if not found:
        raise SystemExit(f"{run}: no finished {model!r} (no models/{model}*/metrics.json)")
    return json.loads(found[0].read_text())


def per_image_score(value) -> float:
    return float(value["kaggle_map"] if isinstance(value, dict) else value)


def paired_difference(first: dict, other: dict, resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean per-image difference ``other - first`` and its 95% bootstrap CI (images resampled)."""
    ids = sorted(first)
    diff = np.array([per_image_score(other[i]) - per_image_score(first[i]) for i in ids])
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(lo), float(hi)


def main(annotations: str, model: str, runs: list[str]) -> None:
    doc = json.loads(Path(annotations).read_text())
    images = {str(i["id"]): i for i in doc["images"]}
    metrics = [model_metrics(Path(r), model) for r in runs]
    groups: dict[tuple[str, str], list[list[float]]] = defaultdict(list)
    for image_id in metrics[0]["per_image"]:
        info = images[image_id]
        key = (size_group(info["height"], info["width"]), info.get("modality", "-"))
        groups[key].append([per_image_score(m["per_image"][image_id]) for m in metrics])
    names = [Path(r).name if Path(r).name != "run" else Path(r).parent.name for r in runs]  # committed copies: run/
    print("| image size | modality | images | " + " | ".join(names) + " |")
    print("|---|---|---:|" + "---:|" * len(runs))
    print("| all | | " + str(metrics[0]["n_images"]) + " | "
          + " | ".join(f"{m['kaggle_map']:.3f}" for m in metrics) + " |")
    order = [name for _, name in GROUPS]
    for (size, modality), rows in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        means = np.asarray(rows, float).mean(axis=0)
        print(f"| {size} | {modality} | {len(rows)} | " + " | ".join(f"{v:.3f}" for v in means) + " |")
    cells = ["(reference)"]
    for m in metrics[1:]:
        d, lo, hi = paired_difference(metrics[0]["per_image"], m["per_image"])
        cells.append(f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    print("| paired vs the first | | | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
