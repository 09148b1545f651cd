"""Plain-text tables for the terminal (``bench eval``)."""

from __future__ import annotations


def _f(x) -> str:
    return "  n/a " if x is None or x != x else f"{x:.4f}"


def eval_table(res: dict) -> str:
    lo, hi = res["kaggle_map_ci95"]
    lines = [f"images: {res['n_images']}" + (f"  (missing predictions: {len(res['missing_predictions'])}, scored 0)"
                                              if res.get("missing_predictions") else ""),
             f"Kaggle mAP       {res['kaggle_map']:.4f}   95% CI [{lo:.4f}, {hi:.4f}]"]
    c = res.get("coco")
    if c:
        ci = c.get("AP_ci95", [float("nan")] * 2)
        lines.append(f"COCO AP (segm)   {_f(c['AP'])}   95% CI [{_f(ci[0])}, {_f(ci[1])}]   maxDets {c['max_dets']}")
        lines.append(f"  AP50 {_f(c['AP50'])}  AP75 {_f(c['AP75'])}  APs {_f(c['APs'])}  APm {_f(c['APm'])}  "
                     f"APl {_f(c['APl'])}")
    lines.append("")
    lines.append(f"{'class':<10} {'images':>6} {'Kaggle mAP':>10}  {'95% CI':<19} {'COCO AP':>8}")
    for k, v in res["per_class"].items():
        ci = res["per_class_ci95"][k]
        ap = (c or {}).get("per_class_AP", {}).get(k)
        lines.append(f"{k:<10} {res['per_class_n_images'][k]:>6} {v:>10.4f}  [{ci[0]:.4f}, {ci[1]:.4f}] {_f(ap):>8}")
    lines.append("")
    lines.append(f"{'IoU >':<6} {'precision':>9} {'TP':>8} {'FP':>8} {'FN':>8}")
    for t, v in res["per_threshold"].items():
        n = res["counts_per_threshold"][t]
        lines.append(f"{t:<6} {v:>9.4f} {n['tp']:>8} {n['fp']:>8} {n['fn']:>8}")
    return "\n".join(lines)
