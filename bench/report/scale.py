"""``make bench`` section F: the interactive report at the scale issue 16 names, 600 images x 5 models.

Why a made-up run: no stored run has 600 validation images and five models, and training five
models for it would take hours. The images are the synthetic Sartorius-sized ones (704 x 520,
``bench.data.synth``); each "model" is the ground truth perturbed with its own seed (shifted,
eroded, dropped and spurious cells: :func:`bench.benchmarks.perturbed_predictions`), scored by
the real evaluator and stored in an ordinary run folder, so the report reads it as any other.
Data and run are cached under ``results/cache`` (minutes to make once).

Measured: the report's generation time and size, and in headless Chromium (when it and
Playwright are installed) the time until the page is ready with its first image drawn and the
mean time to switch to the next image.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

N_IMAGES, N_MODELS, SIZE = 600, 5, (704, 520)


def build_run(cache: Path, n_images: int = N_IMAGES, n_models: int = N_MODELS) -> Path:
    """The cached run folder (made on first use): synthetic images, perturbed predictions, metrics."""
    from bench.data.io import load_dataset
    from bench.data.predictions import write_predictions
    from bench.data.split import split_hash
    from bench.data.synth import generate
    from bench.metrics.evaluator import evaluate_predictions
    from bench.store import Manifest, RunDir
    from bench.util import atomic_write_text

    data = cache / f"report-scale-synth-{n_images}"
    if not (data / "train.csv").is_file():
        tmp = data.with_name(data.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        generate(tmp, n_images=n_images, size=SIZE, seed=0)
        tmp.rename(data)
    run = RunDir(cache / f"report-scale-run-{n_images}x{n_models}")
    labels = [f"perturbed-{k}" for k in range(n_models)]
    if run.exists() and all(run.model(m).has_metrics() for m in labels):
        return run.path
    from bench.benchmarks import perturbed_predictions

    ds = load_dataset(data)
    ids = [s.image_id for s in ds]
    h = split_hash([], ids, "report-scale")
    run.mkdir()
    atomic_write_text(run.split, json.dumps({"train": [], "val": ids, "hash": h, "seed": 0}))
    gt = {s.image_id: (s.instances, s.cell_type(ds.classes)) for s in ds}
    for k, label in enumerate(labels):
        preds = perturbed_predictions(ds, seed=k)
        md = run.model(label).mkdir()
        write_predictions(md.predictions, preds, ds.classes)
        m = evaluate_predictions(gt, preds, ds.classes)
        md.write_metrics({**m, "framework": {"name": "perturbed ground truth"}, "timings": {}, "split_hash": h,
                          "seed": 0, "label": label, "device": "cpu"})
    run.write_manifest(Manifest(models=labels, preset="report-scale", seed=0, data=str(data), dataset=ds.name,
                                classes=ds.classes, split_hash=h, n_val=len(ids)))
    return run.path


def measure(run: Path, out: Path) -> dict:
    """Generation time and size of the report of ``run``; browser timings where a browser exists."""
    from bench.report import html as report_html
    from bench.report.leaderboard import aggregate, load_runs

    rows = aggregate(load_runs([run]))
    classes = sorted({c for r in rows for c in r.get("per_class", {})})
    t = time.perf_counter()
    path = report_html.write_html_report(rows, out, [], "# scale\n\n", classes)
    res = {"seconds": time.perf_counter() - t, "bytes": report_html.LAST_TIMING["bytes"], "path": str(path),
           "page_bytes": path.stat().st_size, "layout": "folder" if path.name == "index.html" else "one file"}
    res.update(browser_timings(path))
    return res


def browser_timings(path: Path, switches: int = 10) -> dict:
    """Seconds to open the page (summary parsed, first image drawn) and per switch to the next image."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return {"browser": "playwright not installed"}
    if chromium is None:
        return {"browser": "no chromium on PATH"}
    drawn = "document.querySelectorAll('#browser-plot .imagelayer image').length > 0"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            t = time.perf_counter()
            page.goto(path.as_uri(), timeout=120_000)
            page.wait_for_selector("body[data-ready='1']", timeout=120_000)
            page.wait_for_function(drawn, timeout=120_000)
            open_s = time.perf_counter() - t
            t = time.perf_counter()
            for k in range(1, switches + 1):
                page.click("#next")
                page.wait_for_function(f"document.getElementById('image').value === '{k}' && {drawn}")
                page.evaluate("new Promise(r => requestAnimationFrame(() => r()))")
            switch_s = (time.perf_counter() - t) / switches
        finally:
            browser.close()
    return {"open_s": open_s, "switch_s": switch_s, "browser": "chromium"}


def section_f(rows: list, cache: Path) -> None:
    """Add the report's figures to make bench's summary table."""
    print(f"\n== F. interactive report, {N_IMAGES} synthetic {SIZE[0]}x{SIZE[1]} images x {N_MODELS} models ==")
    t = time.perf_counter()
    run = build_run(cache)
    print(f"run folder {run} ready in {time.perf_counter() - t:.0f} s (cached after the first time)")
    with tempfile.TemporaryDirectory(prefix="cellbench-report-") as tmp:
        r = measure(run, Path(tmp))
    mb, page_mb = r["bytes"] / 1e6, r["page_bytes"] / 1e6
    print(f"report: {r['seconds']:.1f} s to write, {mb:.1f} MB in all ({r['layout']}, the page {page_mb:.1f} MB); "
          "browser: "
          + (f"open {r['open_s']:.2f} s, next image {r['switch_s'] * 1000:.0f} ms" if "open_s" in r else r["browser"]))
    rows.append(("F report: write s (600 img x 5 models)", f"{r['seconds']:.1f}", "<= 300", r["seconds"] <= 300))
    # one file up to 50 MB, else a folder: the page itself stays small, the images load on demand
    rows.append(("F report: page MB (folder past 50 MB)", f"{page_mb:.1f}", "<= 50", page_mb <= 50))
    if "open_s" in r:
        rows.append(("F report: open in chromium s", f"{r['open_s']:.2f}", "<= 10", r["open_s"] <= 10))
        rows.append(("F report: switch image ms", f"{r['switch_s'] * 1000:.0f}", "<= 500", r["switch_s"] <= 0.5))


if __name__ == "__main__":  # python -m bench.report.scale [CACHE]: section F alone
    import sys

    from bench.runner.run import RESULTS

    cache = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / "cache"
    rows: list = []
    section_f(rows, cache)
    for row in rows:
        print(*row, sep="  ")
