"""PNG plots of a leaderboard (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench.store import ModelDir, RunDir


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def all_plots(rows: list[dict], raw: list[dict], out: Path) -> list[Path]:
    done = [r for r in rows if r["state"] == "done"]
    if not done:
        return []
    paths = [leaderboard_bars(done, out / "leaderboard.png"), precision_vs_iou(done, out / "precision_vs_iou.png"),
             per_class_bars(done, out / "per_class.png"), accuracy_vs_speed(done, out / "accuracy_vs_speed.png")]
    p = loss_curves(done, out / "loss_curves.png")
    if p:
        paths.append(p)
    p = overlays(done, out / "overlays.png")
    if p:
        paths.append(p)
    return paths


def leaderboard_bars(done: list[dict], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(done) + 2), 4))
    x = np.arange(len(done))
    m = np.array([r["kaggle_map"] for r in done])
    lo = m - np.array([r["kaggle_map_ci95"][0] for r in done])
    hi = np.array([r["kaggle_map_ci95"][1] for r in done]) - m
    ax.bar(x, m, yerr=[lo, hi], capsize=6, color="#4C72B0", label="Kaggle mAP (95% CI)")
    ap = [r["coco_AP"] if r["coco_AP"] is not None else np.nan for r in done]
    ax.plot(x, ap, "D", color="#DD8452", label="COCO AP")
    ax.set_xticks(x, [r["model"] for r in done], rotation=20, ha="right")
    ax.set_ylabel("score")
    ax.set_title("Leaderboard (validation split)")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_ylim(0, max(0.05, float(np.nanmax(np.r_[m + hi, ap])) * 1.25))
    return _save(fig, path)


def precision_vs_iou(done: list[dict], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in done:
        t = sorted(r["per_threshold"])
        ax.plot([float(k) for k in t], [r["per_threshold"][k] for k in t], marker="o", label=r["model"])
    ax.set_xlabel("IoU threshold t (match: IoU > t)")
    ax.set_ylabel("TP / (TP + FP + FN), mean over images")
    ax.set_title("Precision vs IoU threshold")
    ax.legend(fontsize=8)
    return _save(fig, path)


def per_class_bars(done: list[dict], path: Path) -> Path:
    plt = _plt()
    classes = sorted({c for r in done for c in r["per_class"]})
    fig, ax = plt.subplots(figsize=(max(5, 1.5 * len(classes) + 2), 4))
    w = 0.8 / len(done)
    for k, r in enumerate(done):
        ax.bar(np.arange(len(classes)) + k * w, [r["per_class"].get(c) or 0 for c in classes], w, label=r["model"])
    ax.set_xticks(np.arange(len(classes)) + 0.4 - w / 2, classes)
    ax.set_ylabel("Kaggle mAP")
    ax.set_title("Per cell type (images grouped by ground-truth type)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def accuracy_vs_speed(done: list[dict], path: Path) -> Path:
    points = [(r["model"], r["infer_ms"], r["kaggle_map"], r["kaggle_map_ci95"]) for r in done
              if r["infer_ms"] is not None]
    return speed_accuracy_points(points, path, f"inference ms / image (after warm-up, device {done[0].get('device')})",
                                 "Accuracy vs inference speed")


def speed_accuracy_points(points: list[tuple[str, float, float, tuple[float, float]]], path: Path, xlabel: str,
                          title: str) -> Path:
    """(label, ms per image, Kaggle mAP, its CI) per point, log time axis. A few points are
    labelled in place; many (a sweep's variants crowd at the same speed) get a legend instead."""
    plt = _plt()
    many = len(points) > 8
    fig, ax = plt.subplots(figsize=(8.5, 4.2) if many else (6, 4))
    cmap = plt.get_cmap("tab20")
    for k, (label, ms, value, ci) in enumerate(points):
        ax.errorbar(ms, value, yerr=[[value - ci[0]], [ci[1] - value]], fmt="o", capsize=4, color=cmap(k % 20),
                    label=label)
        if not many:
            ax.annotate(label, (ms, value), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if many:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Kaggle mAP")
    ax.set_title(title)
    return _save(fig, path)


def loss_curves(done: list[dict], path: Path) -> Path | None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = 0
    for r in done:
        log = ModelDir(r["runs"][0]["dir"]).train_log
        if not log.is_file():
            continue
        # the shared schema (FitContext.log_step): every record has `step`; `epoch` where the
        # framework counts epochs (then step = epoch for Cellpose), named in the legend
        recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        recs = [x for x in recs if "loss" in x and "step" in x]
        if not recs:
            continue
        xs = np.array([x["step"] for x in recs], dtype=float)
        total = xs.max() or 1.0
        epochs = [x["epoch"] for x in recs if x.get("epoch") is not None]
        unit = f"epochs: {max(epochs)}" if epochs else f"steps: {int(total)}"
        ax.plot(xs / total, [x["loss"] for x in recs], label=f"{r['model']} ({unit})")
        drawn += 1
    if not drawn:
        _plt().close(fig)
        return None
    ax.set_xlabel("fraction of training")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title("Training loss")
    ax.legend(fontsize=8)
    return _save(fig, path)


def overlays(done: list[dict], path: Path, n_images: int = 3) -> Path | None:
    """Image | ground truth | each model's masks, for a few validation images."""
    from bench.data.io import load_dataset
    from bench.data.predictions import read_predictions

    run0 = done[0]["runs"][0]
    manifest = run0["manifest"]
    try:
        ds = load_dataset(manifest["data"])
    except Exception:  # data moved away: the table still stands
        return None
    split = json.loads(RunDir(run0["run"]).split.read_text())
    by_id = ds.by_id()
    ids = split["val"][:n_images]
    preds = {}
    for r in done:
        p = ModelDir(r["runs"][0]["dir"]).predictions
        if p.is_file():
            preds[r["model"]] = read_predictions(p)[0]
    plt = _plt()
    cols = 2 + len(preds)
    fig, axes = plt.subplots(len(ids), cols, figsize=(2.6 * cols, 2.2 * len(ids)), squeeze=False)
    for i, iid in enumerate(ids):
        s = by_id[iid]
        img = s.image
        panels = [("image", None), ("ground truth", s.instances)] + [(m, p.get(iid)) for m, p in preds.items()]
        for j, (title, inst) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(img, cmap="gray")
            if inst is not None and len(inst):
                ax.imshow(_color_labels(inst.to_label_image()), alpha=0.45)
            ax.set_axis_off()
            if i == 0:
                ax.set_title(title, fontsize=8)
            if j == 1:
                ax.text(2, 12, s.cell_type(ds.classes), color="yellow", fontsize=7)
    return _save(fig, path)


def _color_labels(lab: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(0)
    colors = rng.uniform(0.2, 1.0, size=(int(lab.max()) + 1, 4))
    colors[:, 3] = 1.0
    colors[0] = 0
    return colors[lab]
