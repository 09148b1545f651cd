"""The interactive HTML report: per-instance outcomes, the page's data, and the page in a real browser."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from bench.adapters import registry
from bench.data.sample import Instances

FAKE = str(Path(__file__).parent / "plugins" / "fake_adapter.py")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _boxes(h: int, w: int, boxes: list[tuple[int, int, int, int]]) -> Instances:
    """One instance per (y0, y1, x0, x1) rectangle."""
    masks = np.zeros((len(boxes), h, w), bool)
    for k, (y0, y1, x0, x1) in enumerate(boxes):
        masks[k, y0:y1, x0:x1] = True
    return Instances.from_masks(masks, scores=np.linspace(0.9, 0.5, len(boxes)))


def test_outcomes_per_image_follow_the_match_table():
    """gt 0 found; gt 1 cut in two halves (split); gts 2 and 3 covered by one box (merge); gt 4 not
    found; a prediction on empty background (spurious); one hidden under a higher-scoring mask."""
    from bench.data.sample import Sample
    from bench.metrics.matches import MatchTable, images_for_predictions
    from bench.report.outcomes import per_image

    gt = _boxes(60, 60, [(0, 10, 0, 10), (0, 10, 20, 40), (20, 30, 0, 10), (20, 30, 12, 22), (45, 55, 45, 55)])
    pred = _boxes(60, 60, [(0, 10, 1, 10), (0, 10, 20, 30), (0, 10, 30, 40), (19, 31, 0, 22), (40, 44, 0, 4),
                           (40, 44, 1, 3)])
    samples = [Sample("a", gt), Sample("b", gt)]
    preds = {"a": pred}  # no predictions for b
    table = MatchTable.from_images("m", images_for_predictions({s.image_id: (s.instances, "x") for s in samples},
                                                               preds), ["x"])
    oc = per_image(table, samples, preds)
    assert oc["a"].gt_outcome == ["matched", "split", "merge", "merge", "missed"]
    assert oc["a"].pred_outcome == ["matched", "split", "split", "merge", "spurious", ""]  # the last: resolved away
    assert oc["a"].gt_iou[0] == pytest.approx(0.9) and oc["a"].gt_partner[0] == 0 and oc["a"].pred_partner[0] == 0
    assert oc["a"].gt_partner[4] == -1 and oc["a"].gt_iou[4] == 0
    assert oc["a"].counts() == {"gt": {"matched": 1, "split": 1, "merge": 2, "missed": 1},
                                "pred": {"matched": 1, "split": 2, "merge": 1, "spurious": 1}}
    assert oc["b"].gt_outcome == ["missed"] * 5 and oc["b"].pred_outcome == []


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_synth):
    """A finished run: the fake adapter (predicts the ground truth) and it with half the cells dropped."""
    from bench.runner.run import run_benchmark

    tmp = tmp_path_factory.mktemp("htmlrun")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CELLBENCH_PLUGINS", FAKE)
        registry.load_plugins()
        run_dir, out = run_benchmark(["fake", "fake:mode=drop_half"], str(tiny_synth), "smoke", "cpu", 0,
                                     tmp / "run", results=tmp / "results", echo=lambda *_: None)
    assert [o.state for o in out] == ["done"] * 2
    return run_dir


def _summary(text: str) -> dict:
    m = re.search(r'<script type="application/json" id="cb-summary">(.*?)</script>', text, re.S)
    return json.loads(m.group(1))


def _report(run_dir: Path, out: Path, **kw) -> Path:
    from bench.report import html as report_html
    from bench.report.leaderboard import aggregate, load_runs

    rows = aggregate(load_runs([run_dir]))
    return report_html.write_html_report(rows, out, [], "# t\n\nintro", ["astro", "cort", "shsy5y"], **kw)


def test_report_is_one_offline_file_with_the_runs_outcomes(tiny_run, tmp_path):
    from bench.report.leaderboard import write_report

    paths = write_report([tiny_run], tmp_path / "rep")
    page = tmp_path / "rep" / "report.html"
    assert page in paths
    text = page.read_text()
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=\S*http", text)  # nothing fetched from elsewhere
    s = _summary(text)
    n_val = len(json.loads((tiny_run / "split.json").read_text())["val"])
    assert len(s["images"]) == n_val and text.count('id="cb-img-') == n_val
    assert s["models"] == ["fake", "fake--mode=drop_half"]
    by_model = {r[0]: dict(zip(s["leaderboard"]["cols"], r)) for r in s["leaderboard"]["rows"]}
    n_gt = sum(im["n_gt"] for im in s["images"])
    assert by_model["fake"]["matched"] == n_gt and by_model["fake"]["spurious"] == 0  # it predicts the gt
    dropped = by_model["fake--mode=drop_half"]
    assert dropped["missed"] == n_gt - dropped["matched"] > 0 and dropped["spurious"] == 0
    pair = s["pairs"]["fake\tfake--mode=drop_half"]
    assert sum(r[1] for r in pair["images"]) == dropped["missed"]  # every dropped cell disagrees
    assert all(r[3] == 0 for r in pair["images"])  # drop_half never matches a cell fake misses
    assert "data:image/png;base64," in text  # the existing plots are embedded


def test_report_refuses_models_of_another_split_and_splits_into_a_folder(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoint", "work", "run.lock"))
    mfile = run / "models" / "fake--mode=drop_half" / "metrics.json"
    m = json.loads(mfile.read_text())
    ref = m["split_hash"]
    m["split_hash"] = "0123456789abcdef"
    mfile.write_text(json.dumps(m))
    path = _report(run, tmp_path / "rep", max_bytes=1)
    assert path == tmp_path / "rep" / "report" / "index.html"
    s = _summary(path.read_text())
    assert s["split"] == "folder" and s["models"] == ["fake"] and s["pairs"] == {}
    assert any("0123456789abcdef" in n and ref in n for n in s["notes"])
    files = sorted((path.parent / "images").glob("*.js"))
    assert len(files) == len(s["images"]) and files[0].read_text().startswith("cbRegister(0,")
    # written again small enough for one file: the folder layout goes, and back
    assert _report(run, tmp_path / "rep") == tmp_path / "rep" / "report.html"
    assert not (tmp_path / "rep" / "report").exists()
    _report(run, tmp_path / "rep", max_bytes=1)
    assert not (tmp_path / "rep" / "report.html").exists()


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)")
@pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="playwright is not installed")
def test_report_in_a_headless_browser(tiny_run, tmp_path):
    """One file: switch model and image, toggle masks, sort, pair view, charts; then the folder layout."""
    from playwright import sync_api as pw

    page_path = _report(tiny_run, tmp_path / "rep")
    folder_path = _report(tiny_run, tmp_path / "big", max_bytes=1)
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            _check_single_file(browser, page_path)
            _check_folder(browser, folder_path)
        finally:
            browser.close()


def _open(browser, path: Path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=20_000)
    return page, errors


def _images_drawn(page, n: int) -> None:
    """Wait until the browser plot holds ``n`` drawn images (thumbnails + mask overlays)."""
    page.wait_for_function(f"document.querySelectorAll('#browser-plot .imagelayer image').length === {n}",
                           timeout=10_000)


def _check_single_file(browser, page_path: Path) -> None:
    page, errors = _open(browser, page_path)
    _images_drawn(page, 2 * 3)  # gt + 2 models, each an image and its overlay
    hrefs = page.eval_on_selector_all("#browser-plot .imagelayer image", "els => els.map(e => e.getAttribute('href'))")
    assert all(h.startswith("data:image/") for h in hrefs) and len(set(hrefs)) == 4  # 1 thumbnail, 3 overlays
    traces = page.locator("#browser-plot .scatterlayer .trace")
    assert traces.count() == 3 and traces.nth(0).locator(".point").count() > 0
    box = traces.nth(1).locator(".point").first.bounding_box()  # the fake model's first prediction
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_function("(document.querySelector('#browser-plot .hoverlayer') || {}).textContent"
                           "?.match(/pred \\d+ · matched · IoU \\d\\.\\d\\d · score/)", timeout=5_000)
    page.select_option("#model", "fake--mode=drop_half")
    _images_drawn(page, 2 * 2)
    assert "fake--mode=drop_half" in page.inner_text("#browser-plot")
    first = page.input_value("#image")
    page.click("#next")
    page.wait_for_function(f"document.getElementById('image').value !== '{first}'")
    _images_drawn(page, 2 * 2)
    page.uncheck("#show-ov")
    _images_drawn(page, 2)
    # sortable leaderboard: a click on "Kaggle mAP" puts the best model first, a second the worst
    page.click("#lb th:has-text('Kaggle mAP')")
    assert page.inner_text("#lb tr:nth-child(2) td:first-child") == "fake"
    page.click("#lb th:has-text('Kaggle mAP')")
    assert page.inner_text("#lb tr:nth-child(2) td:first-child") == "fake--mode=drop_half"
    # pair view: ranked images, and a click opens the image with both models
    assert page.locator("#pair-images tr").count() > 1 and page.locator("#pair-plot .main-svg").count() > 0
    page.click("#pair-images tr:nth-child(2)")
    page.wait_for_function("document.getElementById('model').value === '__pair__'")
    # charts: every spec drawn
    n_charts = len(_summary(page_path.read_text())["charts"])
    assert page.locator("#chart-list .chart .main-svg").count() >= n_charts >= 3
    assert errors == []
    page.close()


def _check_folder(browser, page_path: Path) -> None:
    """Past the size limit: images/<k>.js files, loaded only when their image is opened."""
    page, errors = _open(browser, page_path)
    _images_drawn(page, 2 * 3)
    page.select_option("#image", "1")
    page.wait_for_function("document.querySelectorAll('script[src]').length === 2")
    _images_drawn(page, 2 * 3)
    loaded = page.eval_on_selector_all("script[src]", "els => els.map(e => e.getAttribute('src'))")
    assert loaded == ["images/0.js", "images/1.js"]
    assert errors == []
    page.close()


def test_report_without_the_images_keeps_tables_and_says_why(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoint", "work", "run.lock"))
    m = json.loads((run / "manifest.json").read_text())
    m["data"] = str(tmp_path / "moved-away")
    (run / "manifest.json").write_text(json.dumps(m))
    s = _summary(_report(run, tmp_path / "rep").read_text())
    assert s["images"] == [] and s["models"] == [] and len(s["leaderboard"]["rows"]) == 2
    assert any("moved-away" in n and "cannot be read" in n for n in s["notes"])
