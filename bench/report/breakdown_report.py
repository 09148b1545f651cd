"""``bench report --breakdown ATTR``: the leaderboard per value of a per-image attribute.

The per-image Kaggle scores are in each model's ``metrics.json``; the attribute of each image
comes from the run's dataset (read again from the manifest's ``data`` path, annotations only),
so any attribute the dataset has can be asked for after the run. Counts (images, ground-truth
cells) come from the same dataset.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from bench.data.errors import DataError
from bench.metrics.breakdown import breakdown


def _dataset_groups(manifest: dict, attribute: str) -> tuple[dict[str, str], dict[str, int]]:
    """(image id -> value, image id -> ground-truth cells) of the run's dataset."""
    from bench.data.attributes import attribute_values
    from bench.data.io import load_dataset

    data = manifest.get("data")
    if not data or not Path(data).exists():
        raise DataError(data or "manifest", f"--breakdown {attribute}: the run's dataset is not here, and the "
                                            "per-image attributes come from it")
    ds = load_dataset(data, require_images=False)
    return attribute_values(ds, attribute), {s.image_id: len(s.instances) for s in ds}


def model_breakdowns(rows: list[dict], attribute: str) -> dict[str, dict]:
    """model -> breakdown (``bench.metrics.breakdown``); several runs of a model: group means and
    CI bounds averaged over runs, as the leaderboard averages them."""
    cache: dict[str, tuple] = {}
    out = {}
    for r in rows:
        if r["state"] != "done":
            continue
        per_run = []
        for run in r["runs"]:
            m = run["manifest"]
            key = m.get("data", "")
            if key not in cache:
                cache[key] = _dataset_groups(m, attribute)
            groups, n_gt = cache[key]
            per_run.append(breakdown(run["metrics"]["per_image"], groups, attribute, n_gt=n_gt,
                                     seed=run["metrics"].get("seed", 0)))
        bd = per_run[0]
        if len(per_run) > 1:
            for value, g in bd["groups"].items():
                gs = [p["groups"][value] for p in per_run if value in p["groups"]]
                g["kaggle_map"] = float(np.mean([x["kaggle_map"] for x in gs]))
                g["kaggle_map_ci95"] = [float(np.mean([x["kaggle_map_ci95"][k] for x in gs])) for k in (0, 1)]
        out[r["model"]] = bd
    return out


def _values(bds: dict[str, dict]) -> list[str]:
    return sorted({v for bd in bds.values() for v in bd["groups"]})


def markdown(bds: dict[str, dict], attribute: str) -> str:
    """A section: one row per model, one column per value ('mAP [CI]'), counts in the header."""
    values = _values(bds)
    first = next(iter(bds.values()))["groups"]
    head = ["model"] + [f"{v} ({first[v]['n_images']} img, {first[v].get('n_gt', '?')} cells)"
                        if v in first else v for v in values]
    lines = [f"## Kaggle mAP by {attribute} [95% CI over that group's images]", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, bd in bds.items():
        cells = [model]
        for v in values:
            g = bd["groups"].get(v)
            cells.append("" if g is None else
                         f"{g['kaggle_map']:.4f} [{g['kaggle_map_ci95'][0]:.4f}, {g['kaggle_map_ci95'][1]:.4f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(bds: dict[str, dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "attribute", "value", "n_images", "n_gt", "kaggle_map", "ci_lo", "ci_hi"])
    for model, bd in bds.items():
        for v, g in bd["groups"].items():
            w.writerow([model, bd["attribute"], v, g["n_images"], g.get("n_gt", ""), g["kaggle_map"],
                        *g["kaggle_map_ci95"]])
    return buf.getvalue()


def plot(bds: dict[str, dict], attribute: str, path: Path) -> Path:
    """Grouped bars: one group per attribute value, one bar per model, CI whiskers."""
    from bench.report.plots import _plt, _save

    plt = _plt()
    values, models = _values(bds), list(bds)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(values) * max(1, len(models)) / 3), 4))
    width = 0.8 / max(1, len(models))
    for k, m in enumerate(models):
        gs = [bds[m]["groups"].get(v) for v in values]
        y = [g["kaggle_map"] if g else np.nan for g in gs]
        err = np.array([[g["kaggle_map"] - g["kaggle_map_ci95"][0], g["kaggle_map_ci95"][1] - g["kaggle_map"]]
                        if g else [0, 0] for g in gs]).T
        ax.bar(np.arange(len(values)) + (k - (len(models) - 1) / 2) * width, y, width, yerr=err, capsize=2,
               label=m)
    first = next(iter(bds.values()))["groups"]
    ax.set_xticks(np.arange(len(values)),
                  [f"{v}\n({first[v]['n_images']} img)" if v in first else v for v in values])
    ax.set_ylabel("Kaggle mAP (95% CI)")
    ax.set_title(f"by {attribute}")
    ax.legend(fontsize=8)
    return _save(fig, path)


def resolve_auto(rows: list[dict]) -> str | None:
    """``--breakdown auto``: the attribute the run's dataset is stratified by (DSB2018: modality);
    None where that is ``cell_type``, which the leaderboard's per-class columns already show."""
    from bench.data.attributes import default_stratify
    from bench.data.io import load_dataset

    run = next((x for r in rows if r["state"] == "done" for x in r["runs"]), None)
    if run is None:
        return None
    m = run["manifest"]
    by = m.get("split_stratified_by")
    if by is None and m.get("data") and Path(m["data"]).exists():
        by = default_stratify(load_dataset(m["data"], require_images=False))
    return None if by in (None, "cell_type") else by


def write(rows: list[dict], attribute: str, out: Path) -> tuple[str, list[Path]]:
    """The markdown section and the files (``breakdown_<attr>.csv`` and ``.png``) for the report;
    ``attribute`` "auto": see :func:`resolve_auto`."""
    from bench.util import atomic_write_text

    if attribute == "auto":
        attribute = resolve_auto(rows)
        if attribute is None:
            return "", []
    bds = model_breakdowns(rows, attribute)
    if not bds:
        return "", []
    csv_path = out / f"breakdown_{attribute}.csv"
    atomic_write_text(csv_path, csv_text(bds))
    png = plot(bds, attribute, out / f"breakdown_{attribute}.png")
    return markdown(bds, attribute) + f"\n![breakdown by {attribute}]({png.name})\n", [csv_path, png]
