"""``bench report``: leaderboard tables (md, csv, self-contained html) and PNG plots.

Reads only finished results (``metrics.json``, ``train_log.jsonl``, predictions) from
run folders; never writes into them. Several runs of the same model (seeds) are
aggregated into mean and spread; paired tests compare models within one run, on the
same validation images.
"""

from __future__ import annotations

import base64
import csv
import io
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench.metrics.bootstrap import paired_bootstrap
from bench.util import atomic_write_text


def load_runs(run_dirs: list[Path]) -> list[dict]:
    """One record per (run, model): metrics if finished, else its state from the manifest."""
    from bench.store import RunDir

    rows = []
    for rd in run_dirs:
        run = RunDir(rd)
        if not run.exists():
            raise FileNotFoundError(f"{run.path}: not a run folder (no {run.manifest_path.name})")
        manifest = run.read_manifest().to_dict()
        states = manifest.get("models_state", {})
        for md in run.models():
            rec = {"run": run.path, "label": md.label, "dir": md.path, "manifest": manifest,
                   "state": states.get(md.label, {}).get("state", "unknown"),
                   "detail": states.get(md.label, {}).get("detail", "")}
            metrics = md.read_metrics()
            if metrics is not None:
                rec["metrics"] = metrics
                rec["state"] = "done"
            tuning = md.read_tuning() or (metrics or {}).get("tuning")  # an ensemble's CV record
            if tuning is not None:
                rec["tuning"] = tuning
            rows.append(rec)
    return rows


def aggregate(rows: list[dict]) -> list[dict]:
    """Leaderboard rows: one per model label, seeds aggregated, best first."""
    by: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by[r["label"]].append(r)
    out = []
    for label, rs in by.items():
        done = [r for r in rs if "metrics" in r]
        if not done:
            out.append({"model": label, "state": rs[-1]["state"], "detail": rs[-1]["detail"], "n_runs": 0})
            continue
        ms = [r["metrics"] for r in done]
        k = np.array([m["kaggle_map"] for m in ms])
        t = [m.get("timings", {}) for m in ms]
        row = {
            "model": label, "state": "done", "n_runs": len(done),
            "framework": f"{ms[0]['framework']['name']} {ms[0]['framework'].get('version') or ''}".strip(),
            "kaggle_map": float(k.mean()), "kaggle_map_sd": float(k.std(ddof=1)) if len(k) > 1 else None,
            "kaggle_map_ci95": ms[0]["kaggle_map_ci95"] if len(ms) == 1 else
            [float(np.mean([m["kaggle_map_ci95"][0] for m in ms])), float(np.mean([m["kaggle_map_ci95"][1] for m in ms]))],
            "coco_AP": _mean([m.get("coco", {}).get("AP") for m in ms]),
            "coco_AP50": _mean([m.get("coco", {}).get("AP50") for m in ms]),
            "per_class": {c: _mean([m["per_class"].get(c) for m in ms]) for c in ms[0]["per_class"]},
            "per_threshold": {th: _mean([m["per_threshold"][th] for m in ms]) for th in ms[0]["per_threshold"]},
            "train_s": _mean([x.get("train_seconds") for x in t]),
            "s_per_iter": _mean([x.get("seconds_per_iteration") for x in t]),
            "infer_ms": _mean([x.get("infer_ms_per_image") for x in t]),
            "peak_rss_mb": _mean([max(x.get("fit_peak_rss_mb") or 0, x.get("predict_peak_rss_mb") or 0) for x in t]),
            "cuda_peak_mb": _mean([x.get("predict_cuda_peak_mb") for x in t]),
            # where the model ran (a CPU-only model of a cuda run ran on the CPU); older runs: the run's
            "device": ms[0].get("device") or done[0]["manifest"].get("device"),
            "runs": done,
        }
        from bench.report.cellreport import cell_fields

        row.update(cell_fields(done))  # F1/PQ/AJI/mean matched IoU, bootstrap unit, taxonomy
        tunings = [r["tuning"] for r in done if "tuning" in r]
        if tunings:
            row["tuned_in_sample"] = _mean([x["tuned_in_sample"] for x in tunings])
            row["tuned_cv"] = _mean([x["tuned_cv"] for x in tunings])
        out.append(row)
    out.sort(key=lambda r: (r["state"] != "done", -(r.get("kaggle_map") or 0)))
    _paired_vs_best(out)
    return out


def _paired_vs_best(rows: list[dict]) -> None:
    done = [r for r in rows if r["state"] == "done"]
    if not done:
        return
    best = done[0]
    for r in done:
        if r is best:
            r["vs_best"] = "best"
            continue
        # same run, same images: the first run both models finished in; else two runs of one split
        # (same split hash: the same validation images, so the images still pair)
        pair = next(((a, b) for a in r["runs"] for b in best["runs"] if a["run"] == b["run"]), None) or next(
            ((a, b) for a in r["runs"] for b in best["runs"]
             if a["manifest"].get("split_hash") and a["manifest"].get("split_hash") == b["manifest"].get("split_hash")),
            None)
        if pair is None:
            r["vs_best"] = "n/a (no common run)"
            continue
        groups = pair[0]["metrics"].get("image_group")
        if groups:  # images of one sample/well resampled together, as for the CIs
            from bench.metrics.resample import paired_clustered

            test = paired_clustered(pair[0]["metrics"]["per_image"], pair[1]["metrics"]["per_image"], groups,
                                    seed=pair[0]["metrics"].get("seed", 0))
        else:
            test = paired_bootstrap(pair[0]["metrics"]["per_image"], pair[1]["metrics"]["per_image"],
                                    seed=pair[0]["metrics"].get("seed", 0))
        r["paired"] = test.as_dict()
        r["vs_best"] = "worse" if test.verdict == "worse" else "not distinguishable" if test.verdict != "better" else "better"


FEW_GROUPS = 10


def _units(rows: list[dict]) -> str:
    """What the CIs resampled: images, or groups of them (sample/well: the clustered bootstrap)."""
    cells = [r.get("cell") or {} for r in rows if r["state"] == "done"]
    u = ", ".join(sorted({c.get("bootstrap_unit", "images") for c in cells})) or "images"
    groups = [c["bootstrap_groups"] for c in cells if c.get("bootstrap_unit", "images") != "images"
              and c.get("bootstrap_groups")]
    if groups and min(groups) < FEW_GROUPS:  # a percentile bootstrap over a handful of units is coarse
        u += (f"; with {min(groups)} groups (under {FEW_GROUPS}) the interval is little more than the range "
              "of the group means: read it as coarse")
    return u


def _mean(vals):
    v = [x for x in vals if x is not None and x == x]
    return float(np.mean(v)) if v else None


def _fmt(x, nd=4):
    return "" if x is None else f"{x:.{nd}f}"


COLUMNS = ["model", "state", "framework", "kaggle_map", "ci_lo", "ci_hi", "sd_over_runs", "n_runs", "coco_AP",
           "coco_AP50", "tuned_in_sample", "tuned_cv", "vs_best", "p_beats_best", "train_s", "s_per_iter",
           "infer_ms", "peak_rss_mb", "cuda_peak_mb", "device"]


def _flat(r: dict, classes: list[str]) -> dict:
    ci = r.get("kaggle_map_ci95") or [None, None]
    p = r.get("paired", {})
    d = {"model": r["model"], "state": r["state"], "framework": r.get("framework", ""),
         "kaggle_map": r.get("kaggle_map"), "ci_lo": ci[0], "ci_hi": ci[1], "sd_over_runs": r.get("kaggle_map_sd"),
         "n_runs": r.get("n_runs"), "coco_AP": r.get("coco_AP"), "coco_AP50": r.get("coco_AP50"),
         "tuned_in_sample": r.get("tuned_in_sample"), "tuned_cv": r.get("tuned_cv"),
         "vs_best": r.get("vs_best", r.get("detail", "")), "p_beats_best": 1 - p["p_a_better"] if p else None,
         "train_s": r.get("train_s"), "s_per_iter": r.get("s_per_iter"), "infer_ms": r.get("infer_ms"),
         "peak_rss_mb": r.get("peak_rss_mb"), "cuda_peak_mb": r.get("cuda_peak_mb"), "device": r.get("device")}
    for c in classes:
        d[f"map_{c}"] = (r.get("per_class") or {}).get(c)
    d.update(r.get("cell") or {})
    return d


def markdown_table(rows: list[dict], classes: list[str]) -> str:
    head = ["model", "Kaggle mAP [95% CI]", "COCO AP", "AP50", *classes, "untuned / tuned in-sample (optimistic) / tuned CV",
            "vs best", "train s", "s/iter", "ms/img", "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["state"] != "done":
            lines.append(f"| {r['model']} | {r['state']}: {r.get('detail', '')[:120]} |" + " |" * (len(head) - 2))
            continue
        ci = r["kaggle_map_ci95"]
        sd = f" ±{r['kaggle_map_sd']:.4f} sd ({r['n_runs']} runs)" if r.get("kaggle_map_sd") is not None else ""
        tuned = (f"{r['kaggle_map']:.4f} / {_fmt(r.get('tuned_in_sample'))} / {_fmt(r.get('tuned_cv'))}"
                 if r.get("tuned_cv") is not None else "not tuned (bench tune)")
        vs = r.get("vs_best", "")
        if r.get("paired"):
            vs += f" (P(best better)={1 - r['paired']['p_a_better']:.2f})"
        lines.append("| " + " | ".join([
            r["model"], f"**{r['kaggle_map']:.4f}** [{ci[0]:.4f}, {ci[1]:.4f}]{sd}", _fmt(r["coco_AP"]),
            _fmt(r["coco_AP50"]), *[_fmt(r["per_class"].get(c)) for c in classes], tuned, vs,
            _fmt(r["train_s"], 1), _fmt(r["s_per_iter"], 3), _fmt(r["infer_ms"], 1), _fmt(r["peak_rss_mb"], 0)]) + " |")
    return "\n".join(lines)


def write_report(run_dirs: list[Path], out: Path, breakdown: str | None = None) -> list[Path]:
    """``breakdown``: also the leaderboard per value of that per-image attribute (breakdown_report)."""
    rows_raw = load_runs(run_dirs)
    if not rows_raw:
        raise ValueError(f"no models in {', '.join(map(str, run_dirs))}")
    rows = aggregate(rows_raw)
    classes = rows_raw[0]["manifest"].get("classes", [])
    classes = [c for c in classes if any(c in (r.get("per_class") or {}) for r in rows)]
    out.mkdir(parents=True, exist_ok=True)
    written = []

    from bench.report import plots

    pngs = plots.all_plots(rows, rows_raw, out)
    written += pngs
    m0 = rows_raw[0]["manifest"]
    elsewhere = [f"{r['model']} ({r['device']})" for r in rows
                 if r.get("device") and r["device"] != m0.get("device")]
    header = (f"# cellbench leaderboard\n\nRuns: {', '.join(str(Path(r).name) for r in run_dirs)}; data: "
              f"`{m0.get('dataset')}` ({m0.get('n_train')} train / {m0.get('n_val')} val images, split "
              f"`{m0.get('split_hash')}`), preset `{m0.get('preset')}`, device `{m0.get('device')}`, "
              f"seed(s) {sorted({r['manifest'].get('seed') for r in rows_raw})}.\n\n"
              + (f"Ran on another device than the run's (as their adapters declare): {', '.join(elsewhere)}.\n\n"
                 if elsewhere else "") +
              "Kaggle mAP: the competition metric (IoU > t, t = 0.50..0.95, mean over images), 95% bootstrap CI "
              f"over {_units(rows)}. 'vs best': paired bootstrap on the same images, resampled the same way "
              "(worse = the difference's 95% CI excludes 0).\n\n")
    from bench.report import cellreport

    extra_md = cellreport.cell_markdown(rows) + "\n" + cellreport.taxonomy_markdown(rows)
    section = ""
    if breakdown:
        from bench.report import breakdown_report

        section, files = breakdown_report.write(rows, breakdown, out)
        written += files
        pngs += [f for f in files if f.suffix == ".png"]
    md = header + markdown_table(rows, classes) + "\n\n" + section + extra_md + "\n" + "\n".join(
        f"![{p.stem}]({p.name})" for p in pngs if not p.stem.startswith("breakdown_")) + "\n"
    atomic_write_text(out / "leaderboard.md", md)
    written.append(out / "leaderboard.md")

    buf = io.StringIO()
    cols = COLUMNS[:10] + [f"map_{c}" for c in classes] + cellreport.CSV_COLUMNS + COLUMNS[10:]
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in _flat(r, classes).items()})
    atomic_write_text(out / "leaderboard.csv", buf.getvalue())
    written.append(out / "leaderboard.csv")

    tax_csv = cellreport.write_taxonomy_csv(rows, out)
    written += [tax_csv] if tax_csv else []

    atomic_write_text(out / "leaderboard.html", _html(header + section, rows, classes, pngs, extra_md))
    written.append(out / "leaderboard.html")
    from bench.report.html import write_html_report  # the interactive report (report.html)

    written.append(write_html_report(rows, out, pngs, header, classes))
    return written


def _html(header_md: str, rows: list[dict], classes: list[str], pngs: list[Path], extra_md: str = "") -> str:
    import html

    cols = ["model", "Kaggle mAP", "95% CI", "COCO AP", "AP50", *classes, "vs best", "train s", "ms/img", "peak RSS MB"]
    trs = []
    for r in rows:
        if r["state"] != "done":
            trs.append(f"<tr><td>{html.escape(r['model'])}</td><td colspan={len(cols) - 1}>"
                       f"{html.escape(r['state'])}: {html.escape(r.get('detail', '')[:200])}</td></tr>")
            continue
        ci = r["kaggle_map_ci95"]
        cells = [r["model"], _fmt(r["kaggle_map"]), f"[{ci[0]:.4f}, {ci[1]:.4f}]", _fmt(r["coco_AP"]),
                 _fmt(r["coco_AP50"]), *[_fmt(r["per_class"].get(c)) for c in classes], r.get("vs_best", ""),
                 _fmt(r["train_s"], 1), _fmt(r["infer_ms"], 1), _fmt(r["peak_rss_mb"], 0)]
        trs.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    imgs = embedded_pngs(pngs)
    intro = "".join(f"<p>{html.escape(line)}</p>" for line in header_md.splitlines()[1:] if line.strip())
    return ("<!doctype html><html><head><meta charset='utf-8'><title>cellbench leaderboard</title><style>"
            "body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
            "img{max-width:100%}</style></head><body><h1>cellbench leaderboard</h1>" + intro +
            "<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>" + "".join(trs) +
            "</table>" + (f"<pre>{html.escape(extra_md)}</pre>" if extra_md.strip() else "") + imgs +
            "</body></html>")



def embedded_pngs(pngs: list[Path]) -> str:
    """PNG files as inline <img> elements with a heading each: the html report stays one file."""
    import html

    return "".join(f"<h3>{html.escape(p.stem)}</h3><img alt='{html.escape(p.stem)}' src='data:image/png;base64,"
                   f"{base64.b64encode(p.read_bytes()).decode()}'/>" for p in pngs)
