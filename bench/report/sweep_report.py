"""``bench report SWEEP_DIR``: one row per variant, seeds and images in the CI, a paired verdict.

Reads the sweep's ``sweep.json`` and the finished ``metrics.json`` / ``val_curve.jsonl``
of its runs; writes ``sweep.md``, ``sweep.csv``, ``sweep.html`` and PNG plots into the
report folder (default ``SWEEP_DIR/report``), never into the runs.

The CI of a variant resamples images and seeds together (both are noise the study could
not see); the verdict against the reference variant pairs images (the same held-out
images) and resamples each side's seeds independently. The study's published figures sit
in their own column, labelled as theirs: they come from the real data and GPU-length
training, ours from whatever this sweep ran on.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from bench.metrics.bootstrap import paired_seeds_images, seeds_images_ci
from bench.report.leaderboard import _mean, embedded_pngs
from bench.store import RunDir, SweepDir
from bench.util import atomic_write_text

COLUMNS = ["variant", "model", "seeds", "kaggle_map", "ci95_low", "ci95_high", "coco_AP", "diff_vs_ref",
           "diff_ci95_low", "diff_ci95_high", "p_better", "verdict", "train_s", "infer_ms_per_image",
           "study_value", "study_reference", "in_sample", "state", "note"]


def load_sweep_results(sweep_dir: Path) -> tuple[dict, list[dict]]:
    """The sweep manifest and one record per variant (in the sweep file's order) with its runs."""
    sweep_dir = Path(sweep_dir)
    manifest = SweepDir(sweep_dir).read_manifest()
    if manifest is None:
        raise FileNotFoundError(f"{sweep_dir}: not a sweep folder (no {SweepDir(sweep_dir).manifest_path.name})")
    cfg = manifest["config"]
    out = []
    for name in manifest.get("variants_run") or list(cfg["variants"]):
        v = cfg["variants"][name]
        model = v.get("model") or (f"ensemble({'+'.join(v['ensemble']['members'])})" if v.get("ensemble")
                                   else cfg["base"]["model"])
        rec = {"variant": name, "model": model, "note": v.get("note", ""),
               "study": v.get("study"), "in_sample": any(st["data"] == "split:train+val"
                                                          for st in v.get("pretrain", [])),
               "runs": [], "states": []}
        for seed in manifest["seeds"]:
            st = manifest["runs"].get(f"{name}/seed{seed}")
            if st is None:
                rec["states"].append("not run")
                continue
            rec["states"].append(st.get("state", "unknown"))
            md = RunDir(sweep_dir / st["run_dir"]).model(st.get("label", rec["model"]))
            if md.has_metrics():
                rec["runs"].append({"seed": seed, "metrics": md.read_metrics(), "curve": md.read_jsonl("val_curve")})
            elif st.get("detail"):
                rec["detail"] = st["detail"]
        out.append(rec)
    return manifest, out


def _matrix(rec: dict, ids: list[str]) -> np.ndarray:
    return np.array([[r["metrics"]["per_image"][i] for i in ids] for r in rec["runs"]])


def summarise(manifest: dict, recs: list[dict], n_resamples: int = 2000) -> list[dict]:
    """Table rows: mean over seeds, CI over seeds and images, paired verdict vs the reference."""
    ref_name = manifest["config"].get("reference", "base")
    done = [r for r in recs if r["runs"]]
    ids = sorted(set.intersection(*(set(run["metrics"]["per_image"]) for r in done for run in r["runs"]))) \
        if done else []
    ref = next((r for r in done if r["variant"] == ref_name), None)
    rows = []
    for r in recs:
        row = {"variant": r["variant"], "model": r["model"], "seeds": len(r["runs"]), "note": r["note"],
               "in_sample": r["in_sample"], "state": _state(r), "detail": r.get("detail", ""),
               "study_value": (r["study"] or {}).get("value"), "study_reference": (r["study"] or {}).get("reference"),
               "study_text": (r["study"] or {}).get("text", ""), "curve": _mean_curve(r)}
        if r["runs"] and ids:
            s = _matrix(r, ids)
            ms = [run["metrics"] for run in r["runs"]]
            row.update(kaggle_map=float(s.mean()), ci95=seeds_images_ci(s, n_resamples),
                       coco_AP=_mean([m.get("coco", {}).get("AP") for m in ms]),
                       train_s=_mean([m.get("timings", {}).get("train_seconds") for m in ms]),
                       infer_ms_per_image=_mean([m.get("timings", {}).get("infer_ms_per_image") for m in ms]))
            if ref is not None and r is not ref:
                t = paired_seeds_images(s, _matrix(ref, ids), n_resamples)
                row.update(diff=t.diff, diff_ci95=t.diff_ci95, p_better=t.p_a_better,
                           verdict=t.verdict + (" (in-sample)" if r["in_sample"] else ""))
            elif r is ref:
                row["verdict"] = "reference"
        rows.append(row)
    return rows


def _state(r: dict) -> str:
    states = set(r["states"])
    return states.pop() if len(states) == 1 else ", ".join(f"{s}" for s in r["states"])


def _mean_curve(r: dict) -> list[tuple[int, float]]:
    """Validation curve averaged over the seeds that have one (at the steps they share)."""
    curves = [{c["step"]: c["kaggle_map"] for c in run["curve"]} for run in r["runs"] if run["curve"]]
    if not curves:
        return []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return [(s, float(np.mean([c[s] for c in curves]))) for s in steps]


def _f(x, nd: int = 4) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _study(row: dict) -> str:
    if row["study_value"] is None:
        return "-"
    ref = f" (vs {row['study_reference']:.4f})" if row["study_reference"] is not None else ""
    return f"{row['study_value']:.4f}{ref}"


def markdown(manifest: dict, rows: list[dict]) -> str:
    head = ("| variant | model | seeds | Kaggle mAP | 95% CI (seeds x images) | COCO AP | diff vs ref [95% CI] "
            "| P(better) | verdict | train s | ms/img | study's val mAP (theirs) | note |\n"
            "|---|---|---:|---:|---|---:|---|---:|---|---:|---:|---:|---|")
    lines = [head]
    for r in rows:
        if "kaggle_map" not in r:
            lines.append(f"| {r['variant']} | {r['model']} | 0 | - | {r['state']}: {r['detail'][:80]} | | | | | | | "
                         f"{_study(r)} | {r['note']} |")
            continue
        diff = (f"{r['diff']:+.4f} [{r['diff_ci95'][0]:+.4f}, {r['diff_ci95'][1]:+.4f}]" if "diff" in r else "-")
        lines.append(f"| {r['variant']} | {r['model']} | {r['seeds']} | {r['kaggle_map']:.4f} | "
                     f"[{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}] | {_f(r['coco_AP'])} | {diff} | "
                     f"{_f(r.get('p_better'), 2)} | {r.get('verdict', '-')} | {_f(r['train_s'], 1)} | "
                     f"{_f(r['infer_ms_per_image'], 1)} | {_study(r)} | {r['note']} |")
    return "\n".join(lines)


def _header(manifest: dict) -> str:
    cfg = manifest["config"]
    return (f"# Sweep `{manifest['name']}`\n\n{cfg.get('description', '').strip()}\n\n"
            f"Data `{manifest['data']}` ({manifest['n_train']} train / {manifest['n_val']} val images, split "
            f"`{manifest['split_hash']}`, the same for every run), preset `{manifest['preset']}`, seeds "
            f"{manifest['seeds']}, device `{manifest['device']}`, git `{manifest.get('git_commit')}`.\n\n"
            f"Kaggle mAP: mean over seeds of the competition metric on the validation images; the 95% CI "
            f"resamples images and seeds. Verdict: paired bootstrap against `{cfg.get('reference', 'base')}` on "
            "the same images (better / worse when the difference's 95% CI excludes 0, else not "
            "distinguishable); `(in-sample)` marks variants that trained on the validation images. "
            "The last column is the study's published validation mAP (theirs, real data, GPU schedules"
            + (f"; {cfg['study_source']}" if cfg.get("study_source") else "") + "), not a result of this sweep."
            + (" With one seed per variant the CIs and verdicts cover the sampling of validation images "
               "only: training noise (seed to seed) is not estimated; run more seeds (--seeds) for that."
               if len(manifest["seeds"]) < 2 else "") + "\n\n")


def write_sweep_report(sweep_dir: Path, out: Path | None = None) -> list[Path]:
    manifest, recs = load_sweep_results(sweep_dir)
    rows = summarise(manifest, recs)
    out = Path(out) if out else Path(sweep_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    pngs = sweep_plots(rows, out)
    header = _header(manifest)
    atomic_write_text(out / "sweep.md", header + markdown(manifest, rows) + "\n\n"
                      + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        ci, dci = r.get("ci95") or (None, None), r.get("diff_ci95") or (None, None)
        w.writerow({k: ("" if v is None else v) for k, v in {
            "variant": r["variant"], "model": r["model"], "seeds": r["seeds"], "kaggle_map": r.get("kaggle_map"),
            "ci95_low": ci[0], "ci95_high": ci[1], "coco_AP": r.get("coco_AP"), "diff_vs_ref": r.get("diff"),
            "diff_ci95_low": dci[0], "diff_ci95_high": dci[1], "p_better": r.get("p_better"),
            "verdict": r.get("verdict"), "train_s": r.get("train_s"),
            "infer_ms_per_image": r.get("infer_ms_per_image"), "study_value": r["study_value"],
            "study_reference": r["study_reference"], "in_sample": r["in_sample"], "state": r["state"],
            "note": r["note"]}.items()})
    atomic_write_text(out / "sweep.csv", buf.getvalue())
    atomic_write_text(out / "sweep.html", _html(header, markdown(manifest, rows), pngs))
    return [out / "sweep.md", out / "sweep.csv", out / "sweep.html", *pngs]


def _html(header: str, table_md: str, pngs: list[Path]) -> str:
    import html

    def row(line: str, tag: str) -> str:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        return "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>"

    lines = table_md.splitlines()
    table = "<table>" + row(lines[0], "th") + "".join(row(x, "td") for x in lines[2:]) + "</table>"
    intro = "".join(f"<p>{html.escape(x)}</p>" for x in header.splitlines()[1:] if x.strip())
    imgs = embedded_pngs(pngs)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>cellbench sweep</title><style>"
            "body{font-family:sans-serif;max-width:1300px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px}img{max-width:100%}</style></head><body>"
            + html.escape(header.splitlines()[0].lstrip("# ")).join(("<h1>", "</h1>")) + intro + table + imgs
            + "</body></html>")


# ---------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------

def sweep_plots(rows: list[dict], out: Path) -> list[Path]:
    from bench.report.plots import _plt, _save, speed_accuracy_points

    done = [r for r in rows if "kaggle_map" in r]
    if not done:
        return []
    plt = _plt()
    paths = []

    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(done) + 2), 4.2))
    x = np.arange(len(done))
    m = np.array([r["kaggle_map"] for r in done])
    lo = m - np.array([r["ci95"][0] for r in done])
    hi = np.array([r["ci95"][1] for r in done]) - m
    colors = [{"better": "#55A868", "worse": "#C44E52", "reference": "#4C72B0"}.get(
        r.get("verdict", "").split(" (")[0], "#8C8C8C") for r in done]
    bars = ax.bar(x, m, yerr=[lo, hi], capsize=4, color=colors)
    ax.scatter(x, m, color=colors, edgecolor="k", linewidth=0.5, s=22, zorder=3)  # a score of 0 stays visible
    for bar, r in zip(bars, done):
        if r["in_sample"]:
            bar.set_hatch("//")
    study = [r["study_value"] if r["study_value"] is not None else np.nan for r in done]
    if np.isfinite(study).any():
        ax.plot(x, study, "k_", markersize=14, mew=2, label="the study's figure (theirs)")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xticks(x, [r["variant"] for r in done], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("Kaggle mAP (95% CI: seeds x images)")
    ax.set_title("Variants (green: better than the reference, red: worse, grey: not distinguishable; "
                 "hatched: trained on the validation images)", fontsize=9)
    paths.append(_save(fig, out / "sweep_variants.png"))

    curved = [r for r in done if r["curve"]]
    if curved:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        cmap = plt.get_cmap("tab20")
        for k, r in enumerate(curved):  # 20 distinct colours, then line styles, so 17+ variants stay apart
            steps, vals = zip(*r["curve"])
            ax.plot(steps, vals, marker="o", markersize=3, label=r["variant"], color=cmap(k % 20),
                    linestyle=("-", "--", ":")[(k // 20) % 3])
        ax.set_xlabel("training step (iterations; epochs for Cellpose)")
        ax.set_ylabel("validation Kaggle mAP")
        ax.set_title("Validation curves during training (mean over seeds)")
        ax.legend(fontsize=7, ncol=2)
        paths.append(_save(fig, out / "sweep_val_curves.png"))

    timed = [(r["variant"], r["infer_ms_per_image"], r["kaggle_map"], r["ci95"]) for r in done
             if r.get("infer_ms_per_image")]
    if timed:
        paths.append(speed_accuracy_points(timed, out / "sweep_speed_accuracy.png",
                                           "inference ms per image (log)", "Speed vs accuracy"))
    return paths
