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
    lines += cell_lines(res)
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
    if res.get("taxonomy", {}).get("if_fixed"):
        from bench.metrics.taxonomy import taxonomy_table

        lines += ["", taxonomy_table(res["taxonomy"])]
    return "\n".join(lines)


def cell_lines(res: dict) -> list[str]:
    """The neighbouring benchmarks' numbers and the bootstrap unit (``bench eval``)."""
    c = res.get("cell")
    if not c:
        return []
    def ci(k):
        lo, hi = c.get(f"{k}_ci95", [None, None])
        return f"[{_f(lo)}, {_f(hi)}]"
    out = [f"F1 @ IoU 0.5     {_f(c['f1_50'])}   95% CI {ci('f1_50')}   precision {_f(c['precision_50'])}  "
           f"recall {_f(c['recall_50'])}  (NeurIPS-CellSeg; boundary cells {c['f1_boundary_cells']})"]
    if "f1_50_boundary_removed" in c:
        out.append(f"  F1 without boundary cells {_f(c['f1_50_boundary_removed'])}   95% CI "
                   f"{ci('f1_50_boundary_removed')}")
    out += [f"PQ               {_f(c['pq'])}   95% CI {ci('pq')}   SQ {_f(c['sq'])}  DQ {_f(c['dq'])}",
            f"AJI (cellpose)   {_f(c['aji'])}   95% CI {ci('aji')}",
            f"mean matched IoU {_f(c['mean_matched_iou'])}   95% CI {ci('mean_matched_iou')}"]
    b = res.get("bootstrap")
    if b:
        out.append(f"95% CIs: {b['n_resamples']} bootstrap resamples of {b['unit']}")
    return out
