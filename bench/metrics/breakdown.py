"""Scores per group of images (``--breakdown ATTR``): DSB2018's fluorescence / histology /
brightfield as Sartorius reports its three cell types.

A group's Kaggle mAP is the mean of its images' scores, with a bootstrap CI over those images
only (a group of 3 brightfield images gets the wide interval it deserves); counts say how many
images and ground-truth cells the number rests on. Where the evaluator has COCO's match table
(``bench eval``), a group's COCO AP re-accumulates that table over the group's images, the way
per-class AP already does.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import numpy as np

from bench.data.errors import DataError
from bench.metrics.bootstrap import N_RESAMPLES, bootstrap_ci


def group_ids(ids: list[str], groups: dict[str, str], attribute: str) -> dict[str, list[str]]:
    """value -> image ids (in ``ids``' order), values sorted; every id must have a value."""
    lacking = [i for i in ids if i not in groups]
    if lacking:
        raise DataError(f"--breakdown {attribute}", f"{len(lacking)} scored image(s) have no {attribute!r} "
                                                    f"(e.g. {lacking[0]})")
    out: dict[str, list[str]] = defaultdict(list)
    for i in ids:
        out[groups[i]].append(i)
    return dict(sorted(out.items()))


def breakdown(per_image: dict[str, float], groups: dict[str, str], attribute: str,
              n_gt: dict[str, int] | None = None, n_pred: dict[str, int] | None = None,
              extra: Callable[[list[str]], dict] | None = None, n_resamples: int = N_RESAMPLES,
              seed: int = 0) -> dict:
    """``{"attribute", "groups": {value: {n_images, n_gt, n_pred, kaggle_map, kaggle_map_ci95, ...}}}``.

    ``n_gt``/``n_pred``: instances per image (summed per group where given); ``extra(ids)`` adds
    numbers that need more than per-image scores (COCO AP of those images)."""
    out = {}
    for value, ids in group_ids(list(per_image), groups, attribute).items():
        v = np.array([per_image[i] for i in ids], dtype=float)
        g = {"n_images": len(ids), "kaggle_map": float(v.mean()),
             "kaggle_map_ci95": list(bootstrap_ci(v, n_resamples, seed))}
        if n_gt is not None:
            g["n_gt"] = int(sum(n_gt.get(i, 0) for i in ids))
        if n_pred is not None:
            g["n_pred"] = int(sum(n_pred.get(i, 0) for i in ids))
        if extra is not None:
            g.update(extra(ids))
        out[value] = g
    return {"attribute": attribute, "groups": out}


def breakdown_table(bd: dict) -> str:
    """Terminal table of one breakdown (``bench eval``)."""
    rows = bd["groups"]
    head = f"{bd['attribute']:<14} {'images':>6} {'GT cells':>8} {'Kaggle mAP':>10}  {'95% CI':<19} {'COCO AP':>8}"
    lines = [head]
    for value, g in rows.items():
        ci = g["kaggle_map_ci95"]
        ap = g.get("coco_AP")
        lines.append(f"{value:<14} {g['n_images']:>6} {g.get('n_gt', ''):>8} {g['kaggle_map']:>10.4f}  "
                     f"[{ci[0]:.4f}, {ci[1]:.4f}] {'' if ap is None else f'{ap:.4f}':>8}")
    return "\n".join(lines)
