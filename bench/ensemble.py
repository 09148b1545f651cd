"""``bench ensemble``: fuse the cached predictions of models trained on the same split into a new
model folder, a leaderboard row like any other.

No inference is redone: each member's ``predictions.jsonl.gz`` (every instance it returned,
before overlap resolution; with ``tune``, its un-thresholded ``raw_outputs.jsonl.gz`` where the
run kept one, bench/raw.py) is read and the members' instance sets of each validation image
are fused by :func:`bench.fusion.fuse_sets` (``mask-vote``, ``score-average`` or
``wbf-masks``). Members must come from runs on the same split of the same data (the split
hash, which covers the image ids and the annotations' content): anything else is refused,
naming the hashes.

With ``tune`` the members' weights (a grid over the simplex in steps of 1/4, unless
``weights`` are given) and ``bench tune``'s post-processing of the fused prediction (overlaps
resolved, then a score threshold and a minimum area per predicted cell type, its grid) are
chosen with the same k-fold cross-validation over the validation images as ``bench tune``
(:func:`bench.tune.make_folds`, stratified by the predicted image class, seeded): each image's
saved prediction is fused and thresholded with
what the other folds chose, so the model folder's ``metrics.json``, and with it the
leaderboard's Kaggle mAP, its CI and every paired test, are the honest cross-validated figure.
The choice refitted on all images is scored on them too, shown as "in-sample (optimistic)".

The folder gets ``predictions.jsonl.gz``, ``metrics.json`` (with a paired bootstrap against
every member and the summed inference time of the members plus the fusion's own),
``ensemble.json`` (members, their split, weights, threshold, per-fold choices) and
``status.json``.
"""

from __future__ import annotations

import itertools
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from bench.data.errors import DataError
from bench.data.sample import Instances
from bench.fusion import METHODS, fuse_sets, normalise_weights
from bench.store import ModelDir, RunDir, Status

WEIGHT_STEP = 0.25


@dataclass
class Member:
    label: str
    dir: ModelDir
    preds: dict[str, Instances]
    split_hash: str
    metrics: dict
    source: str = "predictions"


# ---------------------------------------------------------------------------
# members
# ---------------------------------------------------------------------------

def resolve_member(run: RunDir, ref: str) -> ModelDir:
    """A member: a model of ``run`` (label or spec) or the path of a model folder of another run."""
    p = Path(ref)
    if p.is_dir() and p.parent.name == "models" and (p.parent.parent / "manifest.json").is_file():
        return ModelDir(p)
    return run.resolve(ref)


def load_member(md: ModelDir, run_split: str, raw: bool = False) -> Member:
    """The member's cached outputs, checked: present, readable, made on ``run_split``. ``raw``: its
    un-thresholded raw outputs where the run kept them (bench/raw.py), for a tuned fusion whose
    threshold may go below the member's own."""
    from bench.data.predictions import read_predictions

    if not md.predictions.is_file():
        raise DataError(md.predictions, f"model {md.label} has no cached outputs (its run did not finish "
                                        f"predicting): finish it with `bench run --resume --out {md.run.path}` "
                                        "(nothing finished is redone), then ensemble again")
    manifest = md.run.read_manifest()
    preds, header = read_predictions(md.predictions)
    split = str(header.get("split") or manifest.split_hash)
    if split != run_split:
        raise DataError(md.path, f"model {md.label} was trained and scored on split {split}, the ensemble's "
                                 f"run on split {run_split}: only models of the same split (same data, same "
                                 "validation images) can be fused")
    source = "predictions"
    if raw:
        from bench.raw import cached_predictions

        cached = cached_predictions(md)
        if cached is not None:
            preds, source = cached[0], cached[1]
    return Member(md.label, md, preds, split, md.read_metrics() or {}, source)


def member_cv_scores(md: ModelDir) -> dict[str, float] | None:
    """A member's per-image Kaggle mAP with its own thresholds tuned by ``bench tune``'s CV (None
    when it was not tuned)."""
    t = md.read_tuning()
    if not t or "per_image" not in t:
        return None
    return {iid: float(v["tuned_cv"]) for iid, v in t["per_image"].items()}


def check_members(members: Sequence[Member]) -> None:
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least 2 models (got {len(members)})")
    labels = [str(m.dir.path.resolve()) for m in members]
    if len(set(labels)) != len(labels):
        raise ValueError(f"a model is given twice: {[m.label for m in members]}")
    splits = {m.split_hash for m in members}
    if len(splits) > 1:
        raise DataError(members[0].dir.run.path, "models of different splits: " +
                        ", ".join(f"{m.label} {m.split_hash}" for m in members))


def parse_weights(text: str | None, n: int) -> list[float] | None:
    """``'2,1'`` -> [2.0, 1.0]; ValueError when the count differs from the number of models."""
    if text is None or not str(text).strip():
        return None
    try:
        w = [float(x) for x in str(text).split(",")]
    except ValueError:
        raise ValueError(f"--weights {text!r}: not a comma-separated list of numbers") from None
    if len(w) != n:
        raise ValueError(f"--weights {text!r}: {len(w)} weight(s) for {n} model(s) (one per model, in --models "
                         "order)")
    normalise_weights(w, n)
    return w


def weight_grid(n: int, step: float = WEIGHT_STEP) -> list[tuple[float, ...]]:
    """Every weight vector on the simplex in steps of ``step``, equal weights first (ties go to it)."""
    k = int(round(1 / step))
    grid = [tuple(c / k for c in combo) for combo in itertools.product(range(k + 1), repeat=n) if sum(combo) == k]
    equal = tuple([1.0 / n] * n)
    return [equal] + [g for g in grid if not np.allclose(g, equal)]


# ---------------------------------------------------------------------------
# fusing and tuning (pure)
# ---------------------------------------------------------------------------

def fuse_images(member_preds: Sequence[dict[str, Instances]], ids: Sequence[str], sizes: dict[str, tuple[int, int]],
                weights: Sequence[float] | None, method: str) -> dict[str, Instances]:
    """The fused prediction of every image (a member without the image contributes nothing)."""
    out = {}
    for iid in ids:
        h, w = sizes[iid]
        sets = [p.get(iid) or Instances.empty(h, w) for p in member_preds]
        out[iid] = fuse_sets(sets, weights, method)
    return out


def tune_fusion(gt: dict[str, tuple[Instances, str]], member_preds: Sequence[dict[str, Instances]], classes,
                method: str, weights: Sequence[float] | None = None, k: int = 5, seed: int = 0,
                score_grid: Sequence[float] | None = None, area_grid: Sequence[int] | None = None) -> dict:
    """Weights (unless given) and ``bench tune``'s post-processing by its k-fold CV over the images.

    The post-processing is ``bench tune``'s exactly (overlaps resolved, then a score threshold and
    a minimum area per predicted cell type, its grid, its folds): on the fit folds, each weight
    vector gets its best thresholds, the weights whose thresholds score best win, and the held-out
    images are fused and post-processed with that choice. Returns those cross-fitted predictions,
    the untuned / in-sample / CV means, the choice refitted on all images and each fold's."""
    from bench.tune import (AREA_GRID, SCORE_GRID, _apply_scores, _grid_index, apply_tuning, build_table,
                            fit_thresholds, make_folds)

    score_grid, area_grid = tuple(score_grid or SCORE_GRID), tuple(area_grid or AREA_GRID)
    ids = list(gt)
    n = len(ids)
    if n < 2:
        raise ValueError(f"tuning an ensemble needs at least 2 validation images (has {n})")
    sizes = {i: (g.height, g.width) for i, (g, _) in gt.items()}
    grid = [tuple(normalise_weights(weights, len(member_preds)))] if weights else weight_grid(len(member_preds))
    fused = [fuse_images(member_preds, ids, sizes, w, method) for w in grid]
    src = "predicted" if any((p.classes >= 0).any() for f in fused for p in f.values()) else "single"
    tables = [[build_table(gt[i][0], f[i], i, gt[i][1] or "all", classes, src) for i in ids] for f in fused]
    S = [np.stack([tb.grid_scores(score_grid, area_grid) for tb in tw]) for tw in tables]  # per weights: (n, G)
    cls = [[tb.cls for tb in tw] for tw in tables]
    k = max(2, min(k, n))
    folds = make_folds(cls[0], k, seed)   # bench tune's folds (of the first weights' predicted classes)

    def best(rows) -> tuple[int, dict]:
        """Weights and thresholds fitted on ``rows``; ties: the first weights (equal or given)."""
        fits = [fit_thresholds(S[w], cls[w], rows, score_grid, area_grid) for w in range(len(grid))]
        means = [float(_apply_scores(S[w], cls[w], rows, fits[w], score_grid, area_grid).mean())
                 for w in range(len(grid))]
        w = int(np.flatnonzero(np.asarray(means) >= max(means) - 1e-12)[0])
        return w, fits[w]

    untuned_i = _grid_index({"score": 0.0, "min_area": 0}, score_grid, area_grid)
    cv = np.zeros(n)
    cross: dict[str, Instances] = {}
    per_fold = []
    for f in range(k):
        held, fit = np.flatnonzero(folds == f), np.flatnonzero(folds != f)
        w, th = best(fit)
        per_fold.append({"fold": f, "weights": list(grid[w]), "thresholds": th, "images": [ids[r] for r in held]})
        cv[held] = _apply_scores(S[w], cls[w], held, th, score_grid, area_grid)
        for r in held:
            cross[ids[r]] = apply_tuning(fused[w][ids[r]], {"thresholds": th, "class_source": src}, classes)[0]
    w, th = best(np.arange(n))
    in_sample = _apply_scores(S[w], cls[w], np.arange(n), th, score_grid, area_grid)
    return {
        "predictions": cross,
        "untuned": float(S[0][:, untuned_i].mean()), "tuned_in_sample": float(in_sample.mean()),
        "tuned_cv": float(cv.mean()), "k": int(k), "seed": int(seed), "n_images": n,
        "weights": list(grid[w]), "thresholds": th, "class_source": src, "weights_tuned": weights is None,
        "postprocess": "fuse; resolve overlaps by score; drop instances with score < score or area < min_area "
                       "(per predicted class, bench tune's grid)",
        "weight_grid": [list(g) for g in grid], "folds": per_fold,
        "per_image": {iid: {"untuned": float(S[0][r, untuned_i]), "tuned_cv": float(cv[r])}
                      for r, iid in enumerate(ids)},
    }


# ---------------------------------------------------------------------------
# a run folder
# ---------------------------------------------------------------------------

def check_name(name: str, run: RunDir) -> ModelDir:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.=,+-]*", name or ""):
        raise ValueError(f"--name {name!r} must be folder-safe (letters, digits, _.=,+-)")
    md = run.model(name)
    if md.is_dir():
        raise FileExistsError(f"{md.path} already exists: choose another --name (or delete that folder)")
    return md


def build_ensemble(run_dir: Path, refs: Sequence[str], name: str, method: str = "score-average",
                   weights: Sequence[float] | None = None, tune: bool = True, k: int = 5,
                   seed: int | None = None, echo=print) -> dict:
    """Fuse the members' cached outputs into ``RUN/models/<name>``; returns its metrics."""
    from bench.metrics.bootstrap import paired_bootstrap
    from bench.metrics.evaluator import evaluate_predictions
    from bench.tune import validation_ground_truth

    if method not in METHODS:
        raise ValueError(f"--method {method!r}: one of {', '.join(METHODS)}")
    run = RunDir(run_dir)
    manifest = run.read_manifest()
    if len(refs) < 2:
        raise ValueError(f"an ensemble needs at least 2 models (got {len(refs)})")
    if weights is not None:
        normalise_weights(weights, len(refs))
    out = check_name(name, run)
    members = [load_member(resolve_member(run, r), manifest.split_hash, raw=tune) for r in refs]
    check_members(members)
    gt, classes = validation_ground_truth(run.path, manifest)
    seed = int(manifest.seed) if seed is None else int(seed)
    preds = [m.preds for m in members]
    t0 = time.perf_counter()
    sizes = {i: (g.height, g.width) for i, (g, _) in gt.items()}
    plain = fuse_images(preds, list(gt), sizes, weights, method)
    fuse_ms = 1000 * (time.perf_counter() - t0) / max(len(gt), 1)
    record: dict = {"members": [{"label": m.label, "dir": str(m.dir.path), "split": m.split_hash, "source": m.source}
                                for m in members],
                    "method": method, "weights_given": list(weights) if weights else None, "split_hash":
                    manifest.split_hash, "tuned": tune}
    if tune:
        t = tune_fusion(gt, preds, classes, method, weights, k, seed)
        final = t.pop("predictions")
        record["tuning"] = t
    else:
        final = plain
    with run.lock():
        check_name(name, run)  # again under the lock: another process may have made it meanwhile
        out.mkdir()
        from bench.data.predictions import write_predictions

        write_predictions(out.predictions, final, classes, {"model": f"ensemble:{name}", "split": manifest.split_hash,
                                                            "members": [m.label for m in members]})
        res = evaluate_predictions(gt, final, classes, resolve_overlaps=True, seed=seed)
        tm = [m.metrics.get("timings", {}) for m in members]
        infer = [x.get("infer_ms_per_image") for x in tm]
        res["timings"] = {
            "train_seconds": float(sum(x.get("train_seconds") or 0 for x in tm)),
            "infer_ms_per_image": float(sum(v or 0 for v in infer) + fuse_ms) if all(v is not None for v in infer)
            else None,
            "fusion_ms_per_image": fuse_ms, "members_infer_ms_per_image": dict(zip([m.label for m in members], infer)),
            "fit_peak_rss_mb": max((x.get("fit_peak_rss_mb") or 0) for x in tm),
            "predict_peak_rss_mb": max((x.get("predict_peak_rss_mb") or 0) for x in tm),
        }
        res["paired_vs_members"] = {m.label: paired_bootstrap(res["per_image"], m.metrics["per_image"], seed=seed)
                                    .as_dict() for m in members if m.metrics.get("per_image")}
        # a tuned ensemble against members tuned the same way (bench tune's CV per image), so
        # that what fusion adds is not confused with what tuning adds
        tuned = {m.label: member_cv_scores(m.dir) for m in members}
        res["paired_vs_members_tuned_cv"] = {lb: paired_bootstrap(res["per_image"], s, seed=seed).as_dict()
                                             for lb, s in tuned.items() if s and tune}
        res.update(model=f"ensemble:{name}", label=name, split_hash=manifest.split_hash, seed=seed,
                   device="+".join(sorted({str(m.metrics.get("device", "?")) for m in members})),
                   fit="fused (no training)", overlaps="resolved by score",
                   framework={"name": "cellbench ensemble", "version": method}, ensemble=record)
        if tune:
            tr = record["tuning"]
            res["tuning"] = {"untuned": tr["untuned"], "tuned_in_sample": tr["tuned_in_sample"],
                             "tuned_cv": tr["tuned_cv"], "note": "weights and bench tune's thresholds, "
                             f"{tr['k']}-fold CV; metrics are the cross-fitted (CV) predictions'"}
        from bench.util import atomic_write_json

        atomic_write_json(out.ensemble_record, record)
        out.write_metrics(res)
        out.write_status(Status(state="done", device=res["device"]))
    echo(f"[{name}] wrote {out.path}")
    return res


def summary_table(res: dict) -> str:
    """The ensemble's row and its paired test against each member, for the terminal."""
    lo, hi = res["kaggle_map_ci95"]
    rows = [f"{res['label']}: Kaggle mAP {res['kaggle_map']:.4f} [{lo:.4f}, {hi:.4f}]"
            + (" (cross-validated weights/threshold)" if res.get("tuning") else "")]
    if res.get("tuning"):
        t = res["tuning"]
        rows.append(f"  untuned {t['untuned']:.4f} / tuned in-sample (optimistic) {t['tuned_in_sample']:.4f} / "
                    f"tuned CV {t['tuned_cv']:.4f}")
    tm = res["timings"]
    ms = tm.get("infer_ms_per_image")
    rows.append(f"  inference {'?' if ms is None else f'{ms:.1f}'} ms/img (members' sum + fusion "
                f"{tm['fusion_ms_per_image']:.1f}), training {tm['train_seconds']:.1f} s (sum)")
    for key, what in (("paired_vs_members", ""), ("paired_vs_members_tuned_cv", " tuned (bench tune, CV)")):
        for label, p in res.get(key, {}).items():
            rows.append(f"  vs {label}{what}: diff {p['diff']:+.4f} [{p['diff_ci95'][0]:+.4f}, "
                        f"{p['diff_ci95'][1]:+.4f}] P(ensemble better)={p['p_a_better']:.2f} -> {p['verdict']}")
    return "\n".join(rows)
