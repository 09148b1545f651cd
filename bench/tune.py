"""``bench tune``: post-processing thresholds fitted honestly, from saved validation predictions.

The grid: a minimum score and a minimum mask area, per class, chosen to maximise the
Kaggle mAP. Three numbers per model say what tuning is worth:

* ``untuned``: the predictions as they are (overlaps resolved by score), = ``metrics.json``;
* ``tuned_in_sample``: thresholds fitted and scored on the same validation images.
  Optimistic by construction (>= untuned, since "keep everything" is in the grid);
* ``tuned_cv``: k-fold cross-validation over the validation images (seeded, stratified
  by the image's class): fit on k-1 folds, score the held-out fold, rotate; the mean over
  all images of their held-out scores. This is the number to believe.

Post-processing, exactly as :func:`apply_tuning` applies it to new images: overlaps
are resolved first (each pixel to the highest-scoring instance, as the evaluator does;
Kaggle rejects overlapping masks, so resolution is always on), *then* instances with a
score below the class's threshold or an area (after resolution) below its minimum are
dropped. Dropping after resolution leaves the pixels a dropped instance won as
background; that is what a user filtering a finished prediction does, and keeps the
search cheap: the IoU pairs of each image are computed once, and each grid point only
masks them.

The "class" of an image is the model's own predicted cell type (the score-weighted
majority of its instances' classes) when the model predicts classes, else one
threshold set for all images ("single"). The ground-truth cell type is never used to
choose thresholds, only to break the reported numbers down per class. Thresholds for
"all" images are always fitted too: they apply to an image whose predicted class had no
image in the fitting set (or that has no classed instance).

Ties between grid points go to the smallest score threshold, then the smallest area.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from bench.data.errors import DataError
from bench.data.sample import Instances
from bench.metrics.kaggle import match_counts, resolve_overlaps
from bench.metrics.matching import mask_overlaps
from bench.store import Manifest, RunDir

SCORE_GRID = tuple(float(x) for x in np.round(np.arange(0.0, 0.951, 0.05), 2))
AREA_GRID = (0, 10, 20, 40, 60, 80, 120, 160, 250, 400)
ALL = "all"
TIE_EPS = 1e-12


@dataclass
class ImageTable:
    """One validation image, precomputed once: resolved predictions' scores and areas, IoU pairs."""

    image_id: str
    cls: str            # predicted class (or "all"): what thresholds are chosen by
    gt_type: str        # ground-truth cell type: for the per-class report only
    n_gt: int
    scores: np.ndarray  # (n_pred,) after overlap resolution
    areas: np.ndarray   # (n_pred,) after overlap resolution
    gt_idx: np.ndarray
    pred_idx: np.ndarray
    iou: np.ndarray

    def score(self, score_thr: float, min_area: int) -> float:
        keep = (self.scores >= score_thr) & (self.areas >= min_area)
        return self._score_keep(keep)

    def _score_keep(self, keep: np.ndarray) -> float:
        n_pred = int(keep.sum())
        new = np.cumsum(keep) - 1
        m = keep[self.pred_idx]
        return match_counts(self.gt_idx[m], new[self.pred_idx[m]], self.iou[m], self.n_gt, n_pred).score

    def grid_scores(self, score_grid: Sequence[float], area_grid: Sequence[int]) -> np.ndarray:
        """Image score at every grid point, (len(score_grid) * len(area_grid),), score-major."""
        out = np.zeros(len(score_grid) * len(area_grid))
        cache: dict[bytes, float] = {}
        k = 0
        for t in score_grid:
            for a in area_grid:
                keep = (self.scores >= t) & (self.areas >= a)
                key = np.packbits(keep).tobytes() + len(keep).to_bytes(8, "little")
                if key not in cache:
                    cache[key] = self._score_keep(keep)
                out[k] = cache[key]
                k += 1
        return out


def with_scores(inst: Instances) -> Instances:
    if inst.scores is not None:
        return inst
    return Instances(inst.height, inst.width, inst.counts, inst.classes, np.ones(len(inst)))


def predicted_class(inst: Instances, classes: Sequence[str]) -> str | None:
    """The image's cell type as the model sees it: score-weighted majority of its instances' classes
    (ties to the lower class index); None when no instance has a class."""
    m = inst.classes >= 0
    if not m.any():
        return None
    cl = inst.classes[m]
    w = np.ones(m.sum()) if inst.scores is None else np.clip(inst.scores[m], 0, None)
    if w.sum() <= 0:
        w = np.ones_like(w)
    votes = np.bincount(cl, weights=w, minlength=len(classes))
    return list(classes)[int(votes.argmax())]


def image_class(resolved: Instances, classes: Sequence[str], class_source: str) -> str:
    if class_source != "predicted":
        return ALL
    return predicted_class(resolved, classes) or ALL


def build_table(gt: Instances, pred: Instances, image_id: str, gt_type: str, classes: Sequence[str],
                class_source: str) -> ImageTable:
    if (gt.height, gt.width) != (pred.height, pred.width):
        raise DataError(f"image {image_id}", f"prediction size {pred.width}x{pred.height} differs from "
                                             f"ground truth {gt.width}x{gt.height}")
    res = resolve_overlaps(with_scores(pred))
    ov = mask_overlaps(gt.counts, res.counts, gt.height, gt.width)
    return ImageTable(image_id, image_class(res, classes, class_source), gt_type, len(gt),
                      np.asarray(res.scores, dtype=float), ov.pred_area.astype(np.int64),
                      ov.gt_idx, ov.pred_idx, ov.iou)


def _best(mean_scores: np.ndarray, score_grid, area_grid) -> dict:
    """Grid point with the highest mean; ties to the smallest score threshold, then smallest area."""
    best = int(np.flatnonzero(mean_scores >= mean_scores.max() - TIE_EPS)[0])
    i, j = divmod(best, len(area_grid))
    return {"score": float(score_grid[i]), "min_area": int(area_grid[j])}


def fit_thresholds(S: np.ndarray, cls: Sequence[str], rows: np.ndarray, score_grid, area_grid) -> dict:
    """Thresholds per class (and for "all") from the grid scores ``S`` of the images ``rows``."""
    rows = np.asarray(rows)
    out = {ALL: _best(S[rows].mean(axis=0), score_grid, area_grid)}
    for c in sorted({cls[r] for r in rows} - {ALL}):
        sel = [r for r in rows if cls[r] == c]
        out[c] = _best(S[sel].mean(axis=0), score_grid, area_grid)
    return out


def _grid_index(th: dict, score_grid, area_grid) -> int:
    return list(score_grid).index(th["score"]) * len(area_grid) + list(area_grid).index(th["min_area"])


def _apply_scores(S: np.ndarray, cls: Sequence[str], rows, thresholds: dict, score_grid, area_grid) -> np.ndarray:
    return np.array([S[r, _grid_index(thresholds.get(cls[r], thresholds[ALL]), score_grid, area_grid)]
                     for r in rows])


def make_folds(cls: Sequence[str], k: int, seed: int) -> np.ndarray:
    """Fold of each image: seeded shuffle within each class, then dealt round-robin (stratified)."""
    rng = np.random.default_rng(seed)
    folds = np.zeros(len(cls), dtype=np.int64)
    pos = 0
    for c in sorted(set(cls)):
        idx = np.array([i for i, x in enumerate(cls) if x == c])
        rng.shuffle(idx)
        for i in idx:
            folds[i] = pos % k
            pos += 1
    return folds


def tune_tables(tables: list[ImageTable], class_source: str, seed: int = 0, k: int = 5,
                score_grid: Sequence[float] = SCORE_GRID, area_grid: Sequence[int] = AREA_GRID,
                untuned_scores: Sequence[float] | None = None) -> dict:
    """The three numbers, fitted thresholds and per-class breakdown from precomputed image tables.

    ``untuned_scores``: each image's score as published, when the tables hold the un-thresholded
    raw outputs (bench/raw.py) rather than the published predictions."""
    n = len(tables)
    if n < 2:
        raise ValueError(f"tuning needs at least 2 validation images (has {n}): cross-validation would be empty")
    if 0.0 not in score_grid or 0 not in area_grid:
        raise ValueError("the grid must contain score 0 and area 0 (the untuned point)")
    k = max(2, min(k, n))
    S = np.stack([t.grid_scores(score_grid, area_grid) for t in tables])  # (n, G)
    cls = [t.cls for t in tables]
    untuned_i = _grid_index({"score": 0.0, "min_area": 0}, score_grid, area_grid)
    untuned = S[:, untuned_i] if untuned_scores is None else np.asarray(untuned_scores, dtype=float)
    all_rows = np.arange(n)
    thresholds = fit_thresholds(S, cls, all_rows, score_grid, area_grid)
    in_sample = _apply_scores(S, cls, all_rows, thresholds, score_grid, area_grid)
    folds = make_folds(cls, k, seed)
    cv = np.zeros(n)
    fold_thresholds = []
    for f in range(k):
        held = np.flatnonzero(folds == f)
        fit_rows = np.flatnonzero(folds != f)
        th = fit_thresholds(S, cls, fit_rows, score_grid, area_grid)
        fold_thresholds.append(th)
        cv[held] = _apply_scores(S, cls, held, th, score_grid, area_grid)
    per_class = {}
    for c in sorted({t.gt_type for t in tables}):
        sel = [i for i, t in enumerate(tables) if t.gt_type == c]
        per_class[c] = {"n_images": len(sel), "untuned": float(untuned[sel].mean()),
                        "tuned_in_sample": float(in_sample[sel].mean()), "tuned_cv": float(cv[sel].mean())}
    return {
        "untuned": float(untuned.mean()),
        "tuned_in_sample": float(in_sample.mean()),
        "tuned_cv": float(cv.mean()),
        "cv_gain": float(cv.mean() - untuned.mean()),
        "in_sample_gain": float(in_sample.mean() - untuned.mean()),
        "k": int(k), "seed": int(seed), "n_images": n,
        "thresholds": thresholds,
        "class_source": class_source,
        "postprocess": "resolve overlaps by score, then drop instances with score < score or area < min_area",
        "grid": {"score": list(score_grid), "min_area": list(area_grid)},
        "per_class_gt": per_class,
        "image_class": {t.image_id: t.cls for t in tables},
        "folds": {t.image_id: int(f) for t, f in zip(tables, folds)},
        "fold_thresholds": fold_thresholds,
        "per_image": {t.image_id: {"untuned": float(u), "tuned_in_sample": float(s), "tuned_cv": float(v)}
                      for t, u, s, v in zip(tables, untuned, in_sample, cv)},
    }


def tune_predictions(gt: dict[str, tuple[Instances, str]], preds: dict[str, Instances], classes: Sequence[str],
                     seed: int = 0, k: int = 5, class_source: str | None = None,
                     score_grid: Sequence[float] = SCORE_GRID, area_grid: Sequence[int] = AREA_GRID,
                     published: dict[str, Instances] | None = None) -> dict:
    """Tune on ``gt`` (image id -> (instances, ground-truth cell type)) and ``preds``.

    An image without a prediction counts as empty (scores 0, as in the evaluator); a
    prediction for an image not in ``gt`` is an error. ``class_source`` defaults to
    "predicted" when any predicted instance has a class, else "single"."""
    unknown = sorted(set(preds) - set(gt))
    if unknown:
        raise DataError("predictions", f"{len(unknown)} image id(s) not in the ground truth, e.g. {unknown[:3]}")
    if class_source is None:
        class_source = "predicted" if any((p.classes >= 0).any() for p in preds.values()) else "single"
    tables, untuned = [], None
    for iid, (g, ct) in gt.items():
        p = preds.get(iid)
        if p is None:
            p = Instances.empty(g.height, g.width)
        tables.append(build_table(g, p, iid, ct or ALL, classes, class_source))
    if published is not None:  # ``preds`` are raw outputs: "untuned" is what the model published
        untuned = [build_table(g, published.get(iid, Instances.empty(g.height, g.width)), iid, ct or ALL, classes,
                               class_source).score(0.0, 0) for iid, (g, ct) in gt.items()]
    return tune_tables(tables, class_source, seed, k, score_grid, area_grid, untuned)


# ---------------------------------------------------------------------------
# applying thresholds to new predictions
# ---------------------------------------------------------------------------

def apply_tuning(pred: Instances, tuning: dict | None, classes: Sequence[str]) -> tuple[Instances, str]:
    """The tuned post-processing of one image: resolve overlaps, then the image's class thresholds.

    ``tuning`` is a ``tuning.json`` (None: only resolve overlaps). Returns the instances and the
    class whose thresholds were used."""
    res = resolve_overlaps(with_scores(pred))
    if not tuning:
        return res, ALL
    c = image_class(res, classes, tuning.get("class_source", "single"))
    th = tuning["thresholds"].get(c)
    if th is None:
        c, th = ALL, tuning["thresholds"][ALL]
    keep = (res.scores >= th["score"]) & (res.areas >= th["min_area"])
    return res.subset(keep), c


# ---------------------------------------------------------------------------
# a run folder
# ---------------------------------------------------------------------------

def run_models(run_dir: Path) -> list[str]:
    """Labels of the run's models that finished predicting (predictions file present)."""
    return [m.label for m in RunDir(run_dir).models() if m.predictions.is_file()]


def resolve_label(run_dir: Path, model: str) -> str:
    """A model folder name from a label or a spec ('cellpose:diam_mean=20')."""
    return RunDir(run_dir).resolve(model).label


def read_manifest(run_dir: Path) -> Manifest:
    return RunDir(run_dir).read_manifest()


def validation_ground_truth(run_dir: Path, manifest: Manifest) -> tuple[dict[str, tuple[Instances, str]], list[str]]:
    from bench.data.io import load_dataset
    from bench.data.split import read_split

    ds = load_dataset(manifest.data, require_images=False)
    split = read_split(RunDir(run_dir).split, ds)
    val = ds.subset(split["val"])
    return {s.image_id: (s.instances, s.cell_type(ds.classes)) for s in val}, ds.classes


def tune_run(run_dir: Path, models: Sequence[str] | None = None, k: int = 5, seed: int | None = None,
             echo=print) -> dict[str, dict]:
    """Tune each model of a finished run; writes each model's ``tuning.json`` (only that)."""
    from bench.data.predictions import read_predictions
    from bench.raw import cached_predictions

    run = RunDir(run_dir)
    manifest = run.read_manifest()
    labels = [run.resolve(m).label for m in models] if models else run_models(run.path)
    if not labels:
        raise DataError(run.models_dir, "no model with saved validation predictions in this run")
    gt, classes = validation_ground_truth(run.path, manifest)
    seed = int(manifest.seed) if seed is None else int(seed)
    out = {}
    for label in labels:
        md = run.model(label)
        if not md.predictions.is_file():
            raise DataError(md.predictions, f"model {label} has no saved validation predictions (did its run "
                                            "finish?)")
        preds, _ = read_predictions(md.predictions)
        cached = cached_predictions(md)  # the un-thresholded raw outputs, where the run kept them
        if cached is not None:
            res = tune_predictions(gt, cached[0], classes, seed=seed, k=k, published=preds)
        else:
            res = tune_predictions(gt, preds, classes, seed=seed, k=k)
        res["source"] = cached[1] if cached is not None else "predictions (no raw outputs with a score floor)"
        res["score_floor"] = cached[2] if cached is not None else None  # bench predict predicts down to it
        res["model"] = label
        res["split_hash"] = manifest.split_hash
        metrics = md.read_metrics()
        if metrics is not None:
            res["metrics_kaggle_map"] = metrics.get("kaggle_map")
        md.write_tuning(res)
        out[label] = res
        echo(f"[{label}] tuned: wrote {md.tuning}")
    return out


def tuning_table(results: dict[str, dict]) -> str:
    rows = [f"{'model':<28} {'classes':<9} {'untuned':>8} {'in-sample*':>10} {'CV':>8} {'CV gain':>8}  thresholds "
            "(score / min area px)"]
    for label, r in results.items():
        th = ", ".join(f"{c}: {v['score']:.2f}/{v['min_area']}" for c, v in r["thresholds"].items())
        rows.append(f"{label:<28} {r['class_source']:<9} {r['untuned']:8.4f} {r['tuned_in_sample']:10.4f} "
                    f"{r['tuned_cv']:8.4f} {r['cv_gain']:+8.4f}  {th}")
    k = next(iter(results.values()))["k"] if results else 0
    rows.append(f"* in-sample: fitted and scored on the same validation images (optimistic). CV: {k}-fold over "
                "validation images, each scored by thresholds fitted without it.")
    return "\n".join(rows)
