"""The leaderboard's second table (the neighbouring benchmarks' metrics) and the error taxonomy.

Kept apart from :mod:`bench.report.leaderboard`, which calls these hooks: per model row the
numbers of ``metrics.json["cell"]`` (F1/precision/recall at IoU 0.5, PQ/SQ/DQ, AJI, mean matched
IoU, with 95% CIs), the bootstrap unit, and the taxonomy (``metrics.json["taxonomy"]``, or,
for a run of an older cellbench, computed from the match table of its stored predictions,
without writing into the run folder).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

CELL_KEYS = ("f1_50", "precision_50", "recall_50", "pq", "sq", "dq", "aji", "mean_matched_iou")
CI_KEYS = ("f1_50", "pq", "aji", "mean_matched_iou")
CSV_COLUMNS = [*CELL_KEYS, *[f"{k}_{e}" for k in CI_KEYS for e in ("lo", "hi")], "bootstrap_unit", "bootstrap_groups"]


def _mean(vals) -> float | None:
    v = [x for x in vals if x is not None and x == x]
    return float(np.mean(v)) if v else None


def cell_fields(done: list[dict]) -> dict:
    """Leaderboard-row fields from the finished runs of one model (seeds averaged; CIs of the first)."""
    ms = [r["metrics"] for r in done]
    cells = [m.get("cell") or {} for m in ms]
    out = {k: _mean([c.get(k) for c in cells]) for k in CELL_KEYS}
    for k in CI_KEYS:
        ci = cells[0].get(f"{k}_ci95") or [None, None]
        out[f"{k}_lo"], out[f"{k}_hi"] = ci
    out["bootstrap_unit"] = (ms[0].get("bootstrap") or {}).get("unit", "images")
    out["bootstrap_groups"] = (ms[0].get("bootstrap") or {}).get("n_groups")
    tax = ms[0].get("taxonomy")
    if not tax or "if_fixed" not in tax:
        tax = _taxonomy_from_table(done[0])
    return {"cell": out, "taxonomy": tax}


def _taxonomy_from_table(rec: dict) -> dict | None:
    """An older run: its taxonomy from the match table of its stored predictions (not saved)."""
    from bench.metrics.matches import load_matches
    from bench.metrics.taxonomy import taxonomy
    from bench.store import ModelDir

    md = ModelDir(rec["dir"])
    if not (md.matches.is_file() or md.predictions.is_file()):
        return None
    try:
        t = load_matches(rec["run"], rec["label"], save=False)
        return taxonomy(t.images(rec["manifest"].get("classes", [])))
    except (OSError, ValueError) as e:  # a run whose data moved: the leaderboard still comes out
        return {"error": str(e)}


def _f(x, nd: int = 4) -> str:
    return "" if x is None or x != x else f"{x:.{nd}f}"


def _ci(c: dict, k: str) -> str:
    lo, hi = c.get(f"{k}_lo"), c.get(f"{k}_hi")
    return f"**{_f(c.get(k))}** [{_f(lo)}, {_f(hi)}]" if lo is not None else _f(c.get(k))


def cell_markdown(rows: list[dict]) -> str:
    done = [r for r in rows if r["state"] == "done" and (r.get("cell") or {}).get("f1_50") is not None]
    older = [r["model"] for r in rows if r["state"] == "done" and r not in done]
    note = (f"Not in the metrics of {', '.join(older)} (scored by an older cellbench; their error taxonomy "
            "below comes from their stored predictions).\n") if older else ""
    if not done:
        return f"## The neighbouring benchmarks' metrics\n\n{note}" if note else ""
    head = ["model", "F1 @ IoU 0.5 [95% CI]", "precision", "recall", "PQ [95% CI]", "SQ", "DQ", "AJI [95% CI]",
            "mean matched IoU [95% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in done:
        c = r["cell"]
        lines.append("| " + " | ".join([r["model"], _ci(c, "f1_50"), _f(c["precision_50"]), _f(c["recall_50"]),
                                        _ci(c, "pq"), _f(c["sq"]), _f(c["dq"]), _ci(c, "aji"),
                                        _ci(c, "mean_matched_iou")]) + " |")
    units = sorted({r["cell"]["bootstrap_unit"] for r in done})
    return ("## The neighbouring benchmarks' metrics\n\nF1, precision and recall at IoU 0.5 as NeurIPS-CellSeg 2022 "
            "scores them (mean over images), panoptic quality PQ = SQ x DQ (IoU > 0.5, mean over images), "
            "aggregated Jaccard index as `cellpose.metrics` computes it, mean IoU of the pairs matched at 0.5 "
            f"(pooled). 95% CIs: bootstrap resamples of {', '.join(units)}.\n\n" + "\n".join(lines) + "\n"
            + (f"\n{note}" if note else ""))


def taxonomy_markdown(rows: list[dict]) -> str:
    from bench.metrics.taxonomy import taxonomy_table

    parts = []
    for r in rows:
        tax = r.get("taxonomy")
        if r["state"] != "done" or not tax:
            continue
        if "error" in tax:
            parts.append(f"### {r['model']}\n\nno taxonomy: {tax['error']}\n")
            continue
        parts.append(taxonomy_table(tax, f"### {r['model']}") + "\n")
    if not parts:
        return ""
    return ("## Why models lose: the error taxonomy at IoU 0.5\n\nFrom each model's match table "
            "(`models/<model>/matches.csv.gz`, `bench matches RUN`): missed cells, spurious predictions, split "
            "cells, merges, poor boundaries (best IoU 0.1..0.5), duplicates; 'Kaggle mAP if fixed' repairs that "
            "error type alone on the stored matches and rescores (no re-inference). Definitions: README, "
            "'Why a model loses'.\n\n" + "\n".join(parts))


def taxonomy_csv(rows: list[dict]) -> str:
    """Long format: model, error, side counts, Kaggle mAP if fixed, gain."""
    from bench.metrics.taxonomy import FIXES

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "error", "gt_cells", "predictions", "kaggle_map", "kaggle_map_if_fixed", "gain"])
    for r in rows:
        tax = r.get("taxonomy")
        if r["state"] != "done" or not tax or "counts" not in tax:
            continue
        c = tax["counts"]
        for e in FIXES:
            side = "matched" if e == "inexact_boundary" else e
            w.writerow([r["model"], e, c["gt"].get(side, ""), c["pred"].get(side, ""), tax.get("kaggle_map"),
                        tax.get("if_fixed", {}).get(e), tax.get("gain_if_fixed", {}).get(e)])
    return buf.getvalue()


def write_taxonomy_csv(rows: list[dict], out: Path) -> Path | None:
    from bench.util import atomic_write_text

    text = taxonomy_csv(rows)
    if text.count("\n") <= 1:
        return None
    atomic_write_text(out / "taxonomy.csv", text)
    return out / "taxonomy.csv"
