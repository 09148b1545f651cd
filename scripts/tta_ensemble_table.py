"""Does TTA help, does an ensemble beat its members? One table for a finished run (README figures).

    python scripts/tta_ensemble_table.py RUN [--tta flip] [--out results/tta-ensemble/NAME.md]

For every plain model of RUN (no ensemble, no tta): ``bench tta RUN --model M --tta flip`` unless
done (refused adapters are listed as such). Then ``bench ensemble`` (score-average, weights and
threshold by 5-fold CV) of every pair and triple of plain models that predicted something. The
table: each model raw and with TTA (paired test TTA vs raw, ms/img and the factor), the
ensemble of the two and of the three best single models (a rule fixed before looking at any
ensemble), and the best pair and triple over all combinations, marked: choosing the best of
many on the same validation images is itself optimistic.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from bench.store import RunDir


def _metrics(run: RunDir, label: str) -> dict | None:
    md = run.model(label)
    return md.read_metrics() if md.is_dir() else None


def _ci(m: dict) -> str:
    lo, hi = m["kaggle_map_ci95"]
    return f"{m['kaggle_map']:.4f} [{lo:.4f}, {hi:.4f}]"


def _test(p: dict | None) -> str:
    if not p:
        return "-"
    lo, hi = p["diff_ci95"]
    return f"{p['diff']:+.4f} [{lo:+.4f}, {hi:+.4f}] {p['verdict']}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--tta", default="flip")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--max-members", type=int, default=3)
    ap.add_argument("--tta-models", default=None, help="comma-separated labels to predict with TTA now "
                                                       "(default: all; the others only if already done)")
    a = ap.parse_args()
    from bench.ensemble import build_ensemble
    from bench.tta_run import tta_model, tta_spec

    run = RunDir(a.run)
    plain = [md.label for md in run.models() if md.has_metrics() and "tta=" not in md.label
             and not (md.ensemble_record.is_file())]
    rows, tta_rows = [], {}
    for label in plain:
        spec = run.model(label).read_job().spec
        tlabel = run.model_for(tta_spec(spec, a.tta)).label
        wanted = a.tta_models is None or label in a.tta_models.split(",")
        if _metrics(run, tlabel) is None and not wanted:
            tta_rows[label] = "refused: not run (--tta-models)"
            continue
        if _metrics(run, tlabel) is None:
            try:
                tta_model(run.path, label, a.tta, "cpu")
            except (ValueError, RuntimeError, OSError) as e:
                tta_rows[label] = f"refused: {e}"
                continue
        tta_rows[label] = tlabel
    raw = {lb: _metrics(run, lb) for lb in plain}
    from bench.tune import tune_run

    to_tune = [lb for lb in plain if run.model(lb).read_tuning() is None]
    to_tune += [t for t in tta_rows.values() if not t.startswith("refused") and run.model(t).read_tuning() is None]
    if to_tune:  # the thresholds' CV number: TTA adds low-score instances that untuned Kaggle mAP counts
        tune_run(run.path, to_tune, echo=lambda *_: None)
    order = sorted(plain, key=lambda lb: -raw[lb]["kaggle_map"])
    useful = [lb for lb in order if raw[lb]["kaggle_map"] > 0]
    ens: dict[tuple[str, ...], dict] = {}
    for k in range(2, a.max_members + 1):
        for combo in itertools.combinations(useful, k):
            name = "ens-" + "+".join(combo)
            m = _metrics(run, name)
            if m is None:
                m = build_ensemble(run.path, list(combo), name, "score-average", None, True, echo=lambda *_: None)
            ens[combo] = m
    from bench.ensemble import member_cv_scores
    from bench.metrics.bootstrap import paired_bootstrap

    def cvs(label: str) -> dict | None:
        return member_cv_scores(run.model(label))

    def cv(label: str) -> str:
        s = cvs(label)
        return f"{sum(s.values()) / len(s):.4f}" if s else ""

    def paired_cv(a_scores: dict | None, b_label: str) -> str:
        b = cvs(b_label)
        return _test(paired_bootstrap(a_scores, b).as_dict()) if a_scores and b else "-"

    lines = ["| row | Kaggle mAP [95% CI] | vs | paired diff, untuned [95% CI] | tuned CV | paired diff, both tuned "
             "(CV) [95% CI] | ms/img | inference cost |",
             "|---|---|---|---|---:|---|---:|---|"]
    for lb in order:
        m = raw[lb]
        ms = m["timings"].get("infer_ms_per_image") or 0
        lines.append(f"| {lb} | {_ci(m)} | | | {cv(lb)} | | {ms:.1f} | 1x |")
        t = tta_rows.get(lb, "")
        if t.startswith("refused"):
            lines.append(f"| {lb} + tta={a.tta} | {t} | | | | | | |")
            continue
        tm = _metrics(run, t)
        tt = tm["timings"]
        f = tt.get("tta_factor") or 0
        lines.append(f"| {lb} + tta={a.tta} | {_ci(tm)} | {lb} | {_test(tm.get('paired_vs_source', {}).get(lb))} | "
                     f"{cv(t)} | {paired_cv(cvs(t), lb)} | ~{f * ms:.0f} | {f:.2f}x (passes / identity pass, "
                     f"same process) |")

    def ens_line(title: str, combo: tuple[str, ...]) -> str:
        m = ens[combo]
        best = max(combo, key=lambda lb: raw[lb]["kaggle_map"])
        best_cv = max(combo, key=lambda lb: float(cv(lb) or raw[lb]["kaggle_map"]))
        t = m["timings"]
        tun = m.get("tuning", {})
        return (f"| {title}: {' + '.join(combo)} | {_ci(m)} (CV; in-sample {tun.get('tuned_in_sample', 0):.4f}) | "
                f"best member {best} (tuned: {best_cv}) | {_test(m['paired_vs_members'].get(best))} | (is CV) | "
                f"{paired_cv(m['per_image'], best_cv)} | {t.get('infer_ms_per_image') or 0:.1f} | members' sum + "
                f"fusion {t['fusion_ms_per_image']:.1f} ms |")

    for k in range(2, a.max_members + 1):
        top = tuple(useful[:k])
        if top in ens:
            lines.append(ens_line(f"top-{k} ensemble", top))
        cands = [c for c in ens if len(c) == k]
        if cands:
            best = max(cands, key=lambda c: ens[c]["kaggle_map"])
            if best != top:
                lines.append(ens_line(f"best {k}-model ensemble (picked on these images: optimistic)", best))
    table = "\n".join(lines)
    print(table)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(table + "\n")
        all_ens = {"+".join(c): {"kaggle_map": m["kaggle_map"], "ci95": m["kaggle_map_ci95"],
                                 "tuning": m.get("tuning"), "paired_vs_members": m["paired_vs_members"],
                                 "timings": m["timings"]} for c, m in ens.items()}
        a.out.with_suffix(".json").write_text(json.dumps({"run": str(run.path), "ensembles": all_ens}, indent=1))


if __name__ == "__main__":
    main()
