"""The cell-specific error taxonomy, and what each error type costs in Kaggle mAP (TIDE for masks).

Counts come from the outcomes of the match table (:mod:`bench.metrics.matches`, definitions
there and in the README) at one IoU threshold (default 0.5), per image, per image class and
per size bin. "Kaggle mAP if fixed" answers TIDE's question without re-inference: each error
type is repaired by an oracle on the table's pairs, the image is re-scored with the exact
Kaggle rule (:func:`bench.metrics.kaggle.match_counts`, thresholds 0.5..0.95), and the gain
over the actual mAP is what that error type costs. The oracles:

* ``missed``: the missed ground-truth cells are removed;
* ``spurious`` / ``duplicate``: those predictions are removed;
* ``split``: the predictions lying in each split cell are joined into one (their union:
  areas and intersections add up, predictions being disjoint);
* ``merge``: each prediction in which two or more cells lie is cut along those cells: one
  piece per cell (that cell's part of it), the rest of the prediction dropped;
* ``poor_boundary``: a poor-boundary cell's best prediction is redrawn as the cell (IoU 1);
* ``inexact_boundary`` (not an error at the threshold, shown for scale): every matched pair is
  redrawn to IoU 1: what imperfect outlines of found cells cost at the stricter thresholds.

A cut piece's overlap with other cells is taken as zero (exact when cells do not overlap).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Sequence

import numpy as np

from bench.metrics.kaggle import match_counts
from bench.metrics.matches import (BACKGROUND_IOU, DEFAULT_IOU, OUTCOMES_GT, OUTCOMES_PRED, ImageMatches, Outcomes,
                                   best_partner, outcomes, size_bin)

ERRORS = ("missed", "spurious", "split", "merge", "poor_boundary", "duplicate")
FIXES = ERRORS + ("inexact_boundary",)

Scene = tuple[np.ndarray, np.ndarray, np.ndarray, int, int]   # gi, pj, iou, n_gt, n_pred


def _drop(im: ImageMatches, drop_g: np.ndarray, drop_p: np.ndarray) -> Scene:
    """Remove instances (boolean masks), renumber the rest."""
    kg, kp = ~drop_g, ~drop_p
    ng, np_ = np.cumsum(kg) - 1, np.cumsum(kp) - 1
    k = kg[im.gi] & kp[im.pj]
    return ng[im.gi[k]], np_[im.pj[k]], im.iou[k], int(kg.sum()), int(kp.sum())


def _regroup(im: ImageMatches, new_id: np.ndarray) -> Scene:
    """Predictions joined by ``new_id`` (areas and intersections add: predictions are disjoint)."""
    uniq, inv = np.unique(new_id, return_inverse=True)
    area = np.bincount(inv, weights=im.pred_area, minlength=len(uniq))
    key = im.gi * len(uniq) + inv[im.pj]
    k, pos = np.unique(key, return_inverse=True)
    inter = np.bincount(pos, weights=im.inter, minlength=len(k))
    gi, pj = k // len(uniq), k % len(uniq)
    iou = inter / (im.gt_area[gi] + area[pj] - inter)
    return gi, pj, iou, im.n_gt, len(uniq)


def fix_split(im: ImageMatches, o: Outcomes) -> Scene:
    new_id = np.arange(im.n_pred)
    split_g = o.gt == "split"
    sel = o.p_in_g & split_g[im.gi] & (o.pred[im.pj] == "split")
    for g in np.unique(im.gi[sel]):
        members = im.pj[sel & (im.gi == g)]
        new_id[members] = members.min()
    return _regroup(im, new_id)


def fix_merge(im: ImageMatches, o: Outcomes) -> Scene:
    gts_in = np.bincount(im.pj[o.g_in_p], minlength=im.n_pred)
    merged = gts_in >= 2
    keep = ~merged[im.pj]
    kp = ~merged
    renum = np.cumsum(kp) - 1
    gi, pj, iou = list(im.gi[keep]), list(renum[im.pj[keep]]), list(im.iou[keep])
    n_pred = int(kp.sum())
    pieces = o.g_in_p & merged[im.pj]
    for k in np.flatnonzero(pieces):  # one piece per cell lying in a merging prediction
        g = int(im.gi[k])
        gi.append(g)
        pj.append(n_pred)
        iou.append(im.inter[k] / im.gt_area[g])  # piece = the cell's part: inter/(gt + inter - inter)
        n_pred += 1
    return np.asarray(gi, np.int64), np.asarray(pj, np.int64), np.asarray(iou, float), im.n_gt, n_pred


def fix_poor_boundary(im: ImageMatches, o: Outcomes) -> Scene:
    gi, pj, iou = im.gi, im.pj, im.iou.copy()
    g_pair, _, _ = best_partner(gi, pj, iou, im.n_gt)
    cand = [int(g_pair[g]) for g in np.flatnonzero(o.gt == "poor_boundary") if g_pair[g] >= 0]
    cand = [k for k in cand if o.pred_match[pj[k]] < 0]
    taken: set[int] = set()
    for k in sorted(cand, key=lambda k: -iou[k]):  # a prediction is redrawn for one cell only
        if int(pj[k]) not in taken:
            taken.add(int(pj[k]))
            iou[k] = 1.0
    return gi, pj, iou, im.n_gt, im.n_pred


def fix_inexact_boundary(im: ImageMatches, o: Outcomes) -> Scene:
    iou = im.iou.copy()
    iou[o.gt_match[im.gi] == im.pj] = 1.0
    return im.gi, im.pj, iou, im.n_gt, im.n_pred


def fixed_scene(im: ImageMatches, o: Outcomes, fix: str) -> Scene:
    if fix == "missed":
        return _drop(im, o.gt == "missed", np.zeros(im.n_pred, bool))
    if fix in ("spurious", "duplicate"):
        return _drop(im, np.zeros(im.n_gt, bool), o.pred == fix)
    return {"split": fix_split, "merge": fix_merge, "poor_boundary": fix_poor_boundary,
            "inexact_boundary": fix_inexact_boundary}[fix](im, o)


def kaggle_score(scene: Scene) -> float:
    gi, pj, iou, ng, npd = scene
    return match_counts(gi, pj, iou, ng, npd).score


# ---------------------------------------------------------------------------
# the breakdown
# ---------------------------------------------------------------------------

def _count(labels: np.ndarray, names: Sequence[str]) -> dict[str, int]:
    c = Counter(labels.tolist())
    return {n: int(c.get(n, 0)) for n in names}


def _counts(gt_lab: np.ndarray, pred_lab: np.ndarray) -> dict:
    return {"gt": _count(gt_lab, OUTCOMES_GT), "pred": _count(pred_lab, OUTCOMES_PRED)}


def taxonomy(images: Sequence[ImageMatches], thr: float = DEFAULT_IOU, tb: float = BACKGROUND_IOU,
             with_fixes: bool = True) -> dict:
    """Counts per outcome (gt and pred side), per image, per image class, per size bin, and the
    Kaggle mAP with each error type fixed. Every image weighs the same, as in the Kaggle mAP."""
    if not 0 < tb < thr < 1:
        raise ValueError(f"need 0 < background IoU ({tb}) < IoU threshold ({thr}) < 1")
    per_image, by_class_g, by_class_p = {}, defaultdict(list), defaultdict(list)
    by_size_g, by_size_p = defaultdict(list), defaultdict(list)
    all_g, all_p = [], []
    base, fixed = [], {f: [] for f in FIXES}
    for im in images:
        o = outcomes(im, thr, tb)
        per_image[im.image_id] = _counts(o.gt, o.pred)
        all_g.append(o.gt)
        all_p.append(o.pred)
        by_class_g[im.image_class].append(o.gt)
        by_class_p[im.image_class].append(o.pred)
        for lab, area, store in ((o.gt, im.gt_area, by_size_g), (o.pred, im.pred_area, by_size_p)):
            bins = size_bin(area)
            for b in ("small", "medium", "large"):
                store[b].append(lab[bins == b])
        if with_fixes:
            base.append(kaggle_score((im.gi, im.pj, im.iou, im.n_gt, im.n_pred)))
            for f in FIXES:
                fixed[f].append(kaggle_score(fixed_scene(im, o, f)))
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=object)  # noqa: E731
    out = {"iou_threshold": thr, "background_iou": tb, "n_images": len(per_image),
           "counts": _counts(cat(all_g), cat(all_p)),
           "per_class": {c: _counts(cat(by_class_g[c]), cat(by_class_p[c])) for c in sorted(by_class_g)},
           "per_size": {b: _counts(cat(by_size_g[b]), cat(by_size_p[b])) for b in ("small", "medium", "large")},
           "per_image": per_image}
    if with_fixes and base:
        b = float(np.mean(base))
        out["kaggle_map"] = b
        out["if_fixed"] = {f: float(np.mean(v)) for f, v in fixed.items()}
        out["gain_if_fixed"] = {f: float(np.mean(v)) - b for f, v in fixed.items()}
    return out


def taxonomy_table(tax: dict, title: str = "") -> str:
    """Markdown: one row per error type with gt/pred counts and the Kaggle mAP if it were fixed."""
    c = tax["counts"]
    n_gt, n_pred = sum(c["gt"].values()), sum(c["pred"].values())
    rows = [f"| error at IoU {tax['iou_threshold']:g} | ground-truth cells | predictions | Kaggle mAP if fixed | gain |",
            "|---|---:|---:|---:|---:|"]
    for e in FIXES:
        g = c["gt"].get(e, 0) if e != "inexact_boundary" else c["gt"]["matched"]
        p = c["pred"].get(e, 0) if e != "inexact_boundary" else c["pred"]["matched"]
        name = "inexact boundary (matched cells, IoU < 1)" if e == "inexact_boundary" else e.replace("_", " ")
        fx = tax.get("if_fixed", {}).get(e)
        gain = tax.get("gain_if_fixed", {}).get(e)
        gs = "" if e in ("spurious", "duplicate") else f"{g} ({100 * g / max(n_gt, 1):.1f} %)"
        ps = "" if e == "missed" else f"{p} ({100 * p / max(n_pred, 1):.1f} %)"
        rows.append(f"| {name} | {gs} | {ps} | {'' if fx is None else f'{fx:.4f}'} | "
                    f"{'' if gain is None else f'{gain:+.4f}'} |")
    head = f"{title}\n\n" if title else ""
    return (head + "\n".join(rows) + f"\n\n{n_gt} ground-truth cells, {n_pred} predictions, {tax['n_images']} images; "
            f"actual Kaggle mAP {tax.get('kaggle_map', float('nan')):.4f}; matched: {c['gt']['matched']} cells.")
