"""The interactive report: one self-contained HTML file that opens offline (``report.html``).

What it shows: a sortable leaderboard; a per-image browser (the image, its ground truth and each
model's masks coloured by outcome, zoom and pan shared by all panels, hover for IoU and score); a
pair view ranking images and cells by how much two models disagree; the outcome charts; the PNG
plots of ``bench report``.

Why it is built this way: the page must stay fast at 600 images x 5 models, so nothing is drawn
at full resolution. Each image becomes a JPEG thumbnail and each (image, model) one small palette
PNG whose colours are the outcomes (:mod:`bench.report.outcomes`); hover works on one marker per
instance. Every image's payload sits in its own inert ``<script type="application/json">`` block
and is parsed only when that image is opened. Plotly (its bundled ``plotly.min.js``, inlined)
draws everything, so the page needs no network; the hand-written JavaScript (``report.js``) only
wires the controls. Past ``max_bytes`` (50 MB) the payloads move to ``report/images/<k>.js``
files next to ``report/index.html``, loaded by ``<script>`` tags on demand (which, unlike
``fetch``, works from ``file://``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np

from bench.data import rle
from bench.data.sample import Instances
from bench.report.outcomes import ImageOutcomes, model_table, per_image
from bench.util import atomic_write_text

MAX_BYTES = 50_000_000
THUMB_PX = 384
TOP_CELLS = 300
# the match table's outcomes (bench.metrics.matches); gt cells are drawn on a model's panel only when missed
OUTCOME_COLORS = {"matched": (44, 160, 44), "missed": (214, 39, 40), "split": (148, 103, 189),
                  "merge": (31, 119, 180), "poor_boundary": (188, 189, 34), "duplicate": (227, 119, 194),
                  "spurious": (255, 127, 14)}
GT_ORDER = ("matched", "missed", "split", "merge", "poor_boundary")
PRED_ORDER = ("matched", "spurious", "split", "merge", "poor_boundary", "duplicate")
GT_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
             (227, 119, 194), (188, 189, 34), (23, 190, 207), (127, 127, 127)]
FILL_ALPHA, EDGE_ALPHA = 90, 255


@dataclass
class BrowserModel:
    """A model shown in the image browser: its predictions, per-image Kaggle scores, outcomes
    per image (from its match table) and its error taxonomy."""

    label: str
    preds: dict[str, Instances]
    per_image: dict[str, float]
    outcomes: dict[str, ImageOutcomes]
    taxonomy: dict


@dataclass
class Browser:
    """What the browser needs: the samples, the models on their split and the models left out (why)."""

    samples: list = field(default_factory=list)
    models: list[BrowserModel] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    note: str = ""


# ---------------------------------------------------------------------------------------------
# which images and models


def collect_browser(done: list[dict]) -> Browser:
    """The first run of each finished model, restricted to those on the best model's split.

    Models evaluated on another split cannot be compared image by image: they are left out and
    named with both split hashes, as the pair view must refuse them.
    """
    from bench.data.io import load_dataset
    from bench.data.predictions import read_predictions
    from bench.store import ModelDir, RunDir

    if not done:
        return Browser(note="no finished model")
    ref = done[0]["runs"][0]
    ref_hash = ref["metrics"].get("split_hash")
    b = Browser()
    try:
        ds = load_dataset(ref["manifest"]["data"])
    except Exception as e:  # data moved away: the tables and charts still stand
        b.note = f"images not shown: the run's data {ref['manifest'].get('data')} cannot be read ({e})"
        return b
    ids = json.loads(RunDir(ref["run"]).split.read_text())["val"]
    by_id = ds.by_id()
    b.samples = [by_id[i] for i in ids if i in by_id]
    for r in done:
        run = r["runs"][0]
        h = run["metrics"].get("split_hash")
        if h != ref_hash:
            b.left_out.append(f"{r['model']}: split {h} differs from {done[0]['model']}'s split {ref_hash}")
            continue
        p = ModelDir(run["dir"]).predictions
        if not p.is_file():
            b.left_out.append(f"{r['model']}: no stored predictions ({p})")
            continue
        preds = read_predictions(p)[0]
        table = model_table(run["run"], r["model"], b.samples, preds, ds.classes)
        b.models.append(BrowserModel(r["model"], preds, run["metrics"].get("per_image", {}),
                                     per_image(table, b.samples, preds), _taxonomy(r, table, ds.classes)))
    return b


def _taxonomy(row: dict, table, classes: list[str]) -> dict:
    """The leaderboard row's taxonomy (metrics.json's, or computed for an older run), else from the table."""
    tax = row.get("taxonomy")
    if tax and "counts" in tax:
        return tax
    from bench.metrics.taxonomy import taxonomy

    return taxonomy(table.images(classes))


# ---------------------------------------------------------------------------------------------
# pixels: thumbnails, label images, overlays


def _thumb_grid(h: int, w: int, px: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of a nearest-neighbour thumbnail at most ``px`` on its longer side."""
    s = min(1.0, px / max(h, w))
    th, tw = max(1, round(h * s)), max(1, round(w * s))
    return ((np.arange(th) + 0.5) * h / th).astype(np.int64), ((np.arange(tw) + 0.5) * w / tw).astype(np.int64)


def _data_uri(img, fmt: str, **kw) -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def thumbnail_uri(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> str:
    """The image, percentile-normalised as the models see it, as a JPEG thumbnail."""
    from PIL import Image

    from bench.data.normalize import normalize, to_uint8

    small = np.ascontiguousarray(image[rows][:, cols])
    return _data_uri(Image.fromarray(to_uint8(normalize(small))), "JPEG", quality=70)


def label_image(inst: Instances, order: np.ndarray | None = None) -> np.ndarray:
    """H x W labels 1..N from the runs; with ``order``, masks later in it are painted on top."""
    lab = np.zeros(inst.height * inst.width, dtype=np.int32)
    if len(inst):
        starts, lengths, owner = inst.runs()
        if order is not None:  # paint runs in the given mask order: the last write wins
            rank = np.empty(len(inst), np.int64)
            rank[order] = np.arange(len(inst))
            k = np.argsort(rank[owner], kind="stable")
            starts, lengths, owner = starts[k], lengths[k], owner[k]
        lab[rle.expand_runs(starts, lengths)] = np.repeat(owner + 1, lengths)
    return lab.reshape(inst.width, inst.height).T


def _edges(lab: np.ndarray) -> np.ndarray:
    """Pixels of a label image whose right or lower neighbour has another label (instance outlines)."""
    e = np.zeros(lab.shape, bool)
    e[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    e[:-1, :] |= lab[:-1, :] != lab[1:, :]
    e[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    e[1:, :] |= lab[1:, :] != lab[:-1, :]
    return e & (lab > 0)


def overlay_uri(lab: np.ndarray, color_of: np.ndarray, palette: list[tuple[int, int, int]]) -> str:
    """A palette PNG: each label's fill in ``palette[color_of[label]]`` (translucent), outlines opaque.

    ``color_of`` maps label (0 = background) to a palette index, -1 for transparent.
    """
    from PIL import Image

    n = len(palette)
    col = color_of[lab]
    idx = np.where(col < 0, 0, col + 1)
    idx = np.where(_edges(lab) & (col >= 0), col + 1 + n, idx).astype(np.uint8)
    img = Image.fromarray(idx, mode="P")
    img.putpalette([0, 0, 0] + [v for c in palette for v in c] * 2)
    alpha = bytes([0] + [FILL_ALPHA] * n + [EDGE_ALPHA] * n)
    return _data_uri(img, "PNG", transparency=alpha, optimize=False)


def anchor_points(lab_small: np.ndarray, inst: Instances, grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """One point (full-resolution x, y) inside each instance: its centroid when that lies inside,
    else its pixel nearest to the centroid. Found on the thumbnail's labels (an eighth of the
    pixels of a 1024 x 1024 image); instances too small or too hidden to reach the thumbnail fall
    back to their full-resolution pixels."""
    n = len(inst)
    th, tw = lab_small.shape
    flat = lab_small.ravel()
    order = np.argsort(flat, kind="stable")  # pixels grouped by label
    bounds = np.searchsorted(flat[order], np.arange(n + 2))
    area = np.diff(bounds)[1:n + 1].astype(float)
    yy, xx = np.divmod(np.arange(flat.size), tw)
    cy = np.bincount(flat, weights=yy, minlength=n + 1)[1:n + 1] / np.maximum(area, 1)
    cx = np.bincount(flat, weights=xx, minlength=n + 1)[1:n + 1] / np.maximum(area, 1)
    iy, ix = np.clip(np.round(cy).astype(int), 0, th - 1), np.clip(np.round(cx).astype(int), 0, tw - 1)
    for k in np.flatnonzero((area > 0) & (lab_small[iy, ix] != np.arange(1, n + 1))):  # not convex
        pix = order[bounds[k + 1]:bounds[k + 2]]
        j = np.argmin((yy[pix] - cy[k]) ** 2 + (xx[pix] - cx[k]) ** 2)
        iy[k], ix[k] = yy[pix[j]], xx[pix[j]]
    pts = np.stack([grid[1][ix], grid[0][iy]], 1).astype(float)
    for k in np.flatnonzero(area == 0):
        pix = rle.pixel_indices(inst.counts[k])
        if pix.size:
            x, y = np.divmod(pix[pix.size // 2], inst.height)
            pts[k] = x, y
    return pts


# ---------------------------------------------------------------------------------------------
# one image's payload


def _points(pts: np.ndarray, **cols) -> dict:
    """Hover points as compact columns (the page writes the hover text): x, y in full-resolution
    pixels, plus per point e.g. k (instance index), o (outcome index), i (IoU), s (score), a (area)."""
    out = {"x": np.round(pts[:, 0]).astype(int).tolist(), "y": np.round(pts[:, 1]).astype(int).tolist()}
    for name, v in cols.items():
        v = np.asarray(v)
        out[name] = [None if x != x else x for x in np.round(v, 2).tolist()] if v.dtype.kind == "f" else v.tolist()
    return out


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % rgb


def gt_panel(gt: Instances, gt_lab_small: np.ndarray, gt_pts: np.ndarray) -> dict:
    """Ground truth: every cell in its own colour (cycling ``GT_COLORS``); hover: index, class, area."""
    color_of = np.r_[-1, np.arange(len(gt)) % len(GT_COLORS)]
    return {"ov": overlay_uri(gt_lab_small, color_of, GT_COLORS),
            "pts": _points(gt_pts, k=np.arange(len(gt)), c=gt.classes, a=gt.areas)}


def model_panel(gt: Instances, pred: Instances, oc: ImageOutcomes, grid, gt_lab_small: np.ndarray,
                gt_pts: np.ndarray) -> dict:
    """Predictions coloured by outcome; ground-truth cells no prediction found drawn as missed."""
    names = list(OUTCOME_COLORS)
    palette = [OUTCOME_COLORS[k] for k in names]
    order = None if pred.scores is None else np.argsort(pred.scores, kind="stable")  # best score on top
    lab = label_image(pred, order)
    pred_lab_small = lab[grid[0]][:, grid[1]]
    pred_col = np.r_[-1, [names.index(o) if o else -1 for o in oc.pred_outcome]].astype(np.int64)
    missed = np.array([o == "missed" for o in oc.gt_outcome], bool)
    gt_col = np.r_[-1, np.where(missed, names.index("missed"), -1)].astype(np.int64)
    # one label space: predictions 1..P, missed cells P+1..P+G where no prediction is drawn
    combo = np.where(pred_lab_small > 0, pred_lab_small,
                     np.where(gt_lab_small > 0, gt_lab_small + len(pred), 0)).astype(np.int64)
    color_of = np.r_[pred_col, gt_col[1:]]
    pts = anchor_points(pred_lab_small, pred, grid)
    scores = pred.scores if pred.scores is not None else np.full(len(pred), np.nan)
    areas = pred.areas
    drawn = np.array([k for k, o in enumerate(oc.pred_outcome) if o], np.int64)  # "": resolved away, never scored
    gk = np.flatnonzero(missed)
    # hover points: the drawn predictions, then the missed cells (their outcome says which side)
    o = np.r_[pred_col[1:][drawn], np.full(len(gk), names.index("missed"))]
    return {"ov": overlay_uri(combo, color_of, palette),
            "pts": _points(np.concatenate([pts[drawn], gt_pts[gk]]).reshape(-1, 2), k=np.r_[drawn, gk], o=o,
                           i=np.r_[oc.pred_iou[drawn], oc.gt_iou[gk]], s=np.r_[scores[drawn], np.full(len(gk), np.nan)],
                           a=np.r_[areas[drawn], gt.areas[gk]],
                           p=np.r_[oc.pred_partner[drawn], oc.gt_partner[gk]])}


def image_payload(sample, models: list[BrowserModel], thumb_px: int
                  ) -> tuple[dict, dict[str, ImageOutcomes]]:
    """The lazily parsed part of one image (thumbnail, overlays, hover points) and its outcomes."""
    gt = sample.instances
    grid = _thumb_grid(gt.height, gt.width, thumb_px)
    gt_lab = label_image(gt)
    gt_lab_small = gt_lab[grid[0]][:, grid[1]]
    gt_pts = anchor_points(gt_lab_small, gt, grid)
    payload = {"img": thumbnail_uri(sample.image, *grid), "w": gt.width, "h": gt.height,
               "tw": len(grid[1]), "th": len(grid[0]),
               "gt": gt_panel(gt, gt_lab_small, gt_pts), "models": {}}
    outcomes = {}
    for m in models:
        pred = m.preds.get(sample.image_id, Instances.empty(gt.height, gt.width))
        oc = outcomes[m.label] = m.outcomes.get(sample.image_id) or ImageOutcomes.empty(len(gt), len(pred))
        payload["models"][m.label] = model_panel(gt, pred, oc, grid, gt_lab_small, gt_pts)
    return payload, outcomes


# ---------------------------------------------------------------------------------------------
# the always-loaded summary: image table, pair rankings, charts


def pair_rankings(samples: list, models: list[BrowserModel], outcomes: list[dict[str, ImageOutcomes]],
                  anchors: list[np.ndarray]) -> dict:
    """For each pair of models: per image the score difference and the cells one matched and the other
    did not; the cells whose best IoU differs most (the ``TOP_CELLS`` largest)."""
    out = {}
    for a, b in combinations([m.label for m in models], 2):
        imgs, cells = [], []
        for k, (s, oc) in enumerate(zip(samples, outcomes)):
            ma = np.array([o == "matched" for o in oc[a].gt_outcome], bool)
            mb = np.array([o == "matched" for o in oc[b].gt_outcome], bool)
            ia, ib = oc[a].gt_iou, oc[b].gt_iou
            imgs.append([k, int((ma != mb).sum()), int((ma & ~mb).sum()), int((mb & ~ma).sum())])
            for g in np.flatnonzero(ma != mb):
                cells.append([k, int(g), round(float(ia[g]), 3), round(float(ib[g]), 3),
                              round(float(anchors[k][g, 0]), 1), round(float(anchors[k][g, 1]), 1)])
        cells.sort(key=lambda c: -abs(c[2] - c[3]))
        out[f"{a}\t{b}"] = {"images": imgs, "cells": cells[:TOP_CELLS], "n_cells": len(cells)}
    return out


def _bars(title: str, ytitle: str, models: list[str], series: list[tuple[str, list, str | None]],
          barmode: str = "stack") -> dict:
    data = [{"type": "bar", "name": name.replace("_", " "), "x": models, "y": ys,
             **({"marker": {"color": color}} if color else {})} for name, ys, color in series]
    return {"data": data, "layout": {"barmode": barmode, "title": {"text": title}, "height": 380,
                                     "yaxis": {"title": {"text": ytitle}}, "margin": {"t": 50}}}


def taxonomy_charts(models: list[BrowserModel]) -> list[dict]:
    """The error taxonomy per model: gt and prediction outcomes, the Kaggle mAP each error type
    costs (mAP if fixed minus actual), and the share of cells found per size bin."""
    labels = [m.label for m in models]
    tax = [m.taxonomy for m in models]
    thr = tax[0].get("iou_threshold", 0.5)
    out = [_bars(f"Ground-truth cells by outcome (IoU {thr:g})", "cells", labels,
                 [(k, [t["counts"]["gt"].get(k, 0) for t in tax], _hex(OUTCOME_COLORS[k])) for k in GT_ORDER]),
           _bars(f"Predictions by outcome (IoU {thr:g})", "predictions", labels,
                 [(k, [t["counts"]["pred"].get(k, 0) for t in tax], _hex(OUTCOME_COLORS[k])) for k in PRED_ORDER])]
    if all("gain_if_fixed" in t for t in tax):
        fixes = list(tax[0]["gain_if_fixed"])
        out.append(_bars("What each error type costs: Kaggle mAP if fixed minus actual", "Kaggle mAP gain", labels,
                         [(f, [t["gain_if_fixed"][f] for t in tax],
                           _hex(OUTCOME_COLORS.get(f, (127, 127, 127)))) for f in fixes], "group"))
    bins = ("small", "medium", "large")
    share = [[_matched_share(t.get("per_size", {}).get(b)) for t in tax] for b in bins]
    out.append(_bars("Share of ground-truth cells matched, by size (LIVECell bins)", "matched / cells", labels,
                     [(b, share[k], None) for k, b in enumerate(bins)], "group"))
    return out


def _matched_share(c: dict | None) -> float | None:
    n = sum((c or {}).get("gt", {}).values())
    return c["gt"].get("matched", 0) / n if n else None


def score_chart(models: list[BrowserModel], ids: list[str]) -> dict:
    """Per-image Kaggle scores per model as box plots with every image drawn (hover names it)."""
    data = [{"type": "box", "name": m.label, "y": [m.per_image.get(i) for i in ids], "text": ids,
             "boxpoints": "all", "jitter": 0.4, "pointpos": 0, "hovertemplate": "%{text}: %{y:.3f}"}
            for m in models]
    return {"data": data, "layout": {"title": {"text": "Per-image Kaggle score"}, "showlegend": False,
                                     "yaxis": {"title": {"text": "score"}}, "height": 380, "margin": {"t": 50}}}


def precision_chart(done: list[dict]) -> dict:
    data = []
    for r in done:
        t = sorted(r["per_threshold"])
        data.append({"type": "scatter", "mode": "lines+markers", "name": r["model"], "x": [float(k) for k in t],
                     "y": [r["per_threshold"][k] for k in t]})
    return {"data": data, "layout": {"title": {"text": "TP / (TP + FP + FN) vs IoU threshold"}, "height": 380,
                                     "xaxis": {"title": {"text": "IoU threshold t"}}, "margin": {"t": 50}}}


def leaderboard_table(rows: list[dict], classes: list[str], totals: dict[str, dict]) -> dict:
    """Columns and cells of the sortable leaderboard (numbers stay numbers so that they sort); the
    outcome counts are over the images of the browser (``totals``: model -> {"gt"|"pred": counts})."""
    counted = [("gt", k) for k in GT_ORDER] + [("pred", k) for k in ("spurious", "duplicate")]
    cell_keys = (("f1_50", "F1@0.5"), ("pq", "PQ"), ("aji", "AJI"), ("mean_matched_iou", "mean IoU"))
    cols = ["model", "Kaggle mAP", "CI low", "CI high", "COCO AP", "AP50", *[n for _, n in cell_keys], *classes,
            "vs best",
            *[k.replace("_", " ") for _, k in counted], "train s", "ms/img", "peak RSS MB", "device"]
    out = []
    for r in rows:
        if r["state"] != "done":
            out.append([r["model"], None, None, None, None, None, *[None] * (len(cell_keys) + len(classes)),
                        f"{r['state']}: {r.get('detail', '')[:160]}", *[None] * (len(counted) + 4)])
            continue
        ci = r["kaggle_map_ci95"]
        t = totals.get(r["model"], {})
        out.append([r["model"], r["kaggle_map"], ci[0], ci[1], r["coco_AP"], r["coco_AP50"],
                    *[(r.get("cell") or {}).get(k) for k, _ in cell_keys],
                    *[r["per_class"].get(c) for c in classes], r.get("vs_best", ""),
                    *[t[side].get(k, 0) if t else None for side, k in counted],
                    r["train_s"], r["infer_ms"], r["peak_rss_mb"], r.get("device")])
    return {"cols": cols, "rows": out}


# ---------------------------------------------------------------------------------------------
# the page


def _json_script(obj, id_: str) -> str:
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False, default=_jsonable, ensure_ascii=False
                      ).replace("</", "<\\/")
    return f'<script type="application/json" id="{id_}">{text}</script>'


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON: {type(x)}")


def _clean(x):
    """NaN/inf -> None, recursively (JSON has no NaN; Plotly draws None as a gap)."""
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _asset(name: str) -> str:
    return (Path(__file__).with_name(name)).read_text()


def plotly_js() -> str:
    """plotly.js as shipped inside the plotly Python package (offline; no CDN)."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def page(summary: dict, payload_scripts: str, intro_html: str, pngs_html: str) -> str:
    return ("<!doctype html><html><head><meta charset='utf-8'><title>cellbench report</title>"
            f"<style>{_asset('report.css')}</style>"
            f"<script>{plotly_js()}</script></head><body>"
            f"<h1>cellbench report</h1>{intro_html}{_asset('report_body.html')}"
            f"<section id='plots'><h2>Plots</h2>{pngs_html}</section>"
            f"{_json_script(_clean(summary), 'cb-summary')}{payload_scripts}"
            f"<script>{_asset('report.js')}</script></body></html>")


def write_html_report(rows: list[dict], out: Path, pngs: list[Path], intro_md: str, classes: list[str],
                      thumb_px: int = THUMB_PX, max_bytes: int = MAX_BYTES) -> Path:
    """Write ``out/report.html`` (or ``out/report/index.html`` with one file per image past
    ``max_bytes``) and return its path."""
    from bench.report.leaderboard import embedded_pngs

    t0 = time.perf_counter()
    done = [r for r in rows if r["state"] == "done"]
    b = collect_browser(done)
    ds_classes = done[0]["runs"][0]["manifest"].get("classes", []) if done else []
    payloads, all_outcomes, anchors = [], [], []
    for s in b.samples:
        p, oc = image_payload(s, b.models, thumb_px)
        payloads.append(p)
        all_outcomes.append(oc)
        anchors.append(np.array([p["gt"]["pts"]["x"], p["gt"]["pts"]["y"]]).T.reshape(-1, 2))
    labels = [m.label for m in b.models]
    images, totals = image_table(b, all_outcomes, ds_classes)
    charts = taxonomy_charts(b.models) + [score_chart(b.models, [s.image_id for s in b.samples])] if labels else []
    if done:
        charts.append(precision_chart(done))
    summary = {"models": labels, "images": images, "pairs": pair_rankings(b.samples, b.models, all_outcomes, anchors),
               "leaderboard": leaderboard_table(rows, classes, totals), "charts": charts,
               "notes": ([b.note] if b.note else []) + [f"left out of the image browser: {x}" for x in b.left_out],
               "colors": {k: _hex(v) for k, v in OUTCOME_COLORS.items()}, "gt_colors": [_hex(c) for c in GT_COLORS],
               "classes": ds_classes, "split": "inline"}
    intro = "".join(f"<p>{html.escape(line)}</p>" for line in intro_md.splitlines()[1:] if line.strip())
    pngs_html = embedded_pngs(pngs)
    scripts = [_json_script(p, f"cb-img-{k}") for k, p in enumerate(payloads)]
    text = page(summary, "".join(scripts), intro, pngs_html)
    if len(text.encode()) <= max_bytes:
        _remove_folder_layout(out / "report")
        path = out / "report.html"
        atomic_write_text(path, text)
    else:
        (out / "report.html").unlink(missing_ok=True)  # an earlier, smaller report's: stale now
        path = _write_folder(out / "report", summary, payloads, intro, pngs_html)
    _log_timing(path, len(b.samples), len(labels), time.perf_counter() - t0)
    return path


def image_table(b: Browser, all_outcomes: list[dict[str, ImageOutcomes]], classes: list[str]
                ) -> tuple[list[dict], dict[str, dict]]:
    """The always-loaded row of each image (id, class, cells, each model's score) and each model's
    outcome counts over all images (``{"gt": {...}, "pred": {...}}``)."""
    totals: dict[str, dict] = {m.label: {"gt": {}, "pred": {}} for m in b.models}
    images = []
    for s, oc in zip(b.samples, all_outcomes):
        for m in b.models:
            for side, counts in oc[m.label].counts().items():
                for k, v in counts.items():
                    totals[m.label][side][k] = totals[m.label][side].get(k, 0) + v
        images.append({"id": s.image_id, "cls": s.cell_type(classes), "n_gt": len(s.instances),
                       "m": {m.label: {"score": m.per_image.get(s.image_id)} for m in b.models}})
    return images, totals


def _remove_folder_layout(folder: Path) -> None:
    """An earlier, larger report's folder layout (index.html + images/*.js), stale once one file is written."""
    if not (folder / "index.html").is_file():
        return
    for f in (folder / "images").glob("*.js"):
        f.unlink()
    (folder / "index.html").unlink()
    for d in (folder / "images", folder):
        try:
            d.rmdir()
        except OSError:  # absent, or something else lives there: leave it
            pass


def _write_folder(folder: Path, summary: dict, payloads: list[dict], intro: str, pngs_html: str) -> Path:
    """Too big for one file: ``index.html`` plus ``images/<k>.js`` per image, loaded on demand."""
    img_dir = folder / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for f in img_dir.glob("*.js"):  # an earlier report's images
        f.unlink()
    for k, p in enumerate(payloads):
        atomic_write_text(img_dir / f"{k}.js", f"cbRegister({k},{json.dumps(p, separators=(',', ':'))});")
    summary = {**summary, "split": "folder"}
    atomic_write_text(folder / "index.html", page(summary, "", intro, pngs_html))
    return folder / "index.html"


LAST_TIMING: dict = {}


def _log_timing(path: Path, n_images: int, n_models: int, seconds: float) -> None:
    """Kept for ``make bench`` and the README figures: how long the last report took and its size."""
    size = sum(p.stat().st_size for p in path.parent.rglob("*")) if path.name == "index.html" else path.stat().st_size
    LAST_TIMING.update(path=str(path), images=n_images, models=n_models, seconds=seconds, bytes=size)
