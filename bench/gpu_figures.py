"""The GPU check's figures from a finished run folder: ``python -m bench.gpu_figures RUN --out PREFIX``.

Writes ``PREFIX.json`` and ``PREFIX.md`` (one row per model: where it ran, s/iter, train s,
ms/img, peak CUDA memory in training and inference, Kaggle mAP with its CI) with the card's
name, the software versions and the commit, so the README can quote them with their origin.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path


def _gpu(device: str = "cuda") -> dict:
    """The card the run used (``cuda:N`` keeps its index; ``cuda``: the current device)."""
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(torch.device(device if device.startswith("cuda") else "cuda"))
            return {"name": p.name, "memory_gib": round(p.total_memory / 2 ** 30, 1),
                    "capability": f"{p.major}.{p.minor}", "torch": torch.__version__, "cuda": torch.version.cuda}
    except ImportError:
        pass
    return {}


def collect(run: Path) -> dict:
    from bench.store import RunDir

    manifest = RunDir(run).read_manifest().to_dict()
    rows = []
    for label in manifest.get("models_state", {}):
        state = manifest["models_state"][label]
        m = RunDir(run).model(label).read_metrics()
        if m is None:
            rows.append({"model": label, "state": state.get("state"), "detail": state.get("detail", "")[:300]})
            continue
        t = m.get("timings", {})
        rows.append({
            "model": label, "state": "done", "device": m.get("device") or t.get("device") or manifest.get("device"),
            "iterations": t.get("iterations"), "train_s": t.get("train_seconds"),
            "s_per_iter": t.get("seconds_per_iteration"), "ms_per_img": t.get("infer_ms_per_image"),
            "fit_cuda_peak_mb": t.get("fit_cuda_peak_mb"), "predict_cuda_peak_mb": t.get("predict_cuda_peak_mb"),
            "kaggle_map": m.get("kaggle_map"), "kaggle_map_ci95": m.get("kaggle_map_ci95"),
            "coco_ap": (m.get("coco") or {}).get("AP"),
        })
    return {"gpu": _gpu(manifest.get("device") or "cuda"), "host": platform.node(), "git_commit": manifest.get("git_commit"),
            "packages": manifest.get("packages"), "preset": manifest.get("preset"),
            "split_hash": manifest.get("split_hash"), "n_train": manifest.get("n_train"),
            "n_val": manifest.get("n_val"), "command": manifest.get("command"), "models": rows}


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown(fig: dict) -> str:
    g = fig["gpu"]
    lines = [f"GPU check on {g.get('name', '?')} ({g.get('memory_gib', '?')} GiB), torch {g.get('torch')} "
             f"CUDA {g.get('cuda')}, commit {fig['git_commit']}, preset {fig['preset']}, "
             f"{fig['n_train']} train / {fig['n_val']} val images (split {fig['split_hash']})", "",
             "| model | ran on | iterations | s/iter | train s | ms/img | peak CUDA MB (fit / predict) | Kaggle mAP [95% CI] | COCO AP |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in fig["models"]:
        if r["state"] != "done":
            lines.append(f"| {r['model']} | {r['state']}: {r.get('detail', '')[:80]} | | | | | | | |")
            continue
        ci = r["kaggle_map_ci95"] or [None, None]
        lines.append(f"| {r['model']} | {r['device']} | {r['iterations']} | {_f(r['s_per_iter'], '.3f')} | "
                     f"{_f(r['train_s'], '.1f')} | {_f(r['ms_per_img'], '.1f')} | "
                     f"{_f(r['fit_cuda_peak_mb'], '.0f')} / {_f(r['predict_cuda_peak_mb'], '.0f')} | "
                     f"{_f(r['kaggle_map'], '.4f')} [{_f(ci[0], '.3f')}, {_f(ci[1], '.3f')}] | {_f(r['coco_ap'], '.3f')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="prefix of the .json and .md written")
    a = ap.parse_args(argv)
    fig = collect(a.run)
    a.out.with_suffix(".json").write_text(json.dumps(fig, indent=1))
    md = markdown(fig)
    a.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
