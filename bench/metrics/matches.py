"""The match table: every ground-truth and predicted instance of every image, with its best partner.

Why: the leaderboard says which model wins, the match table says why. Every figure of the error
taxonomy (:mod:`bench.metrics.taxonomy`) and of the report's per-image browser comes from it,
without re-running inference.

Stable API (the HTML report and ``bench matches`` use only this)::

    from bench.metrics.matches import load_matches, MatchTable, OUTCOMES
    t = load_matches(run_dir, "cellpose")   # reads RUN/models/<label>/matches.csv.gz, or computes it
                                             # from the stored predictions (older runs) and saves it
    t.instances["outcome"]                   # numpy column arrays, one row per instance (table below)
    t.pairs["iou"]                           # every overlapping gt/pred pair (for the taxonomy's fixes)
    t.image_ids(); t.for_image("abc"); t.rows("gt")   # a list of dicts per row
    MatchTable.concat([t1, t2])              # several models in one table (the ``model`` column)
    a, b = paired_tables(run_a, "cellpose", run_b, "maskrcnn")   # DataError naming both split hashes
                                             # when the two were scored on different splits

Instance table (``matches.csv.gz``), one row per instance:

============  =====  ==========================================================================
column        type   meaning
============  =====  ==========================================================================
model         str    the model's label (its folder under ``models/``)
image_id      str    the image
image_class   str    the image's ground-truth cell type (the class the leaderboard breaks down by)
side          str    ``gt`` or ``pred``
idx           int    gt: position in the image's annotations; pred: position in the model's
                     predictions file (``predictions.jsonl.gz``), so masks can be looked up there
class         str    the instance's own class name ("" when the model predicts none)
score         float  prediction score (NaN for gt)
area          int    pixels; for predictions after overlap resolution (what the metrics scored)
size_bin      str    ``small`` (< 18² px), ``medium`` (18²..31²), ``large`` (>= 31²): LIVECell's
                     cell-sized COCO ranges, by this instance's own area
partner       int    ``idx`` on the other side with the highest IoU (-1: overlaps nothing)
iou           float  IoU with ``partner`` (0.0 when none)
inter         int    pixels shared with ``partner``
match         int    ``idx`` of the one-to-one partner at IoU > ``threshold`` (-1: unmatched)
n_overlaps    int    instances of the other side it shares at least one pixel with
outcome       str    taxonomy label at ``threshold`` (:data:`OUTCOMES`; see the README)
threshold     float  the IoU threshold ``match`` and ``outcome`` were computed at (default 0.5)
============  =====  ==========================================================================

Pair table (``match_pairs.csv.gz``): ``model, image_id, gt, pred, inter, iou``, one row per
gt/pred pair sharing at least one pixel (``gt``/``pred`` as ``idx`` above).

An image with neither ground truth nor predictions has no rows (the Kaggle metric scores it 0;
a taxonomy computed from the table leaves it out). Predictions are taken as the metrics score them: overlaps resolved by score when the run
resolved them (``job.json``); a predicted mask that lost all its pixels to higher-scoring ones
is not in the table. Outcomes (each instance exactly one, first that applies; t = threshold,
tb = :data:`BACKGROUND_IOU`; "p lies in g" means more than half of p's pixels are in g):

* gt: ``matched`` | ``merge`` (it lies in a prediction in which another gt lies too) |
  ``split`` (two or more predictions lie in it) | ``poor_boundary`` (best IoU in [tb, t]) | ``missed``
* pred: ``matched`` | ``merge`` (two or more gts lie in it) | ``split`` (it lies in an unmatched gt
  in which another prediction lies too) | ``duplicate`` (it lies in, or best overlaps with IoU >= tb,
  a gt already matched by another prediction) | ``poor_boundary`` (best IoU in [tb, t]) | ``spurious``
"""

from __future__ import annotations

import csv
import gzip
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from bench.data.errors import DataError
from bench.data.sample import Instances

DEFAULT_IOU = 0.5
BACKGROUND_IOU = 0.1   # TIDE's background threshold: below it, an overlap is not "meaningful"
SIZE_BINS = (("small", 0, 18 ** 2), ("medium", 18 ** 2, 31 ** 2), ("large", 31 ** 2, math.inf))
OUTCOMES_GT = ("matched", "merge", "split", "poor_boundary", "missed")
OUTCOMES_PRED = ("matched", "merge", "split", "duplicate", "poor_boundary", "spurious")
OUTCOMES = {"gt": OUTCOMES_GT, "pred": OUTCOMES_PRED}

INSTANCE_COLUMNS: tuple[tuple[str, type], ...] = (
    ("model", str), ("image_id", str), ("image_class", str), ("side", str), ("idx", int), ("class", str),
    ("score", float), ("area", int), ("size_bin", str), ("partner", int), ("iou", float), ("inter", int),
    ("match", int), ("n_overlaps", int), ("outcome", str), ("threshold", float))
PAIR_COLUMNS: tuple[tuple[str, type], ...] = (
    ("model", str), ("image_id", str), ("gt", int), ("pred", int), ("inter", int), ("iou", float))


# ---------------------------------------------------------------------------
# one image
# ---------------------------------------------------------------------------

@dataclass
class ImageMatches:
    """One image's instances and every overlapping gt/pred pair (pred indices 0..n_pred-1 here)."""

    image_id: str
    image_class: str
    gt_area: np.ndarray
    pred_area: np.ndarray
    gt_class: np.ndarray       # class index, -1 none
    pred_class: np.ndarray
    pred_score: np.ndarray
    pred_index: np.ndarray     # position of each prediction in the predictions file
    gi: np.ndarray             # pair -> gt
    pj: np.ndarray             # pair -> pred
    inter: np.ndarray          # pair -> shared pixels

    n_gt = property(lambda self: len(self.gt_area))
    n_pred = property(lambda self: len(self.pred_area))

    @property
    def iou(self) -> np.ndarray:
        return self.inter / (self.gt_area[self.gi] + self.pred_area[self.pj] - self.inter)


def image_matches(image_id: str, gt: Instances, pred: Instances, pred_index: np.ndarray | None = None,
                  image_class: str = "", overlaps=None) -> ImageMatches:
    """From ground truth and (already overlap-checked or resolved) predictions of one image."""
    from bench.metrics.matching import overlaps_disjoint_pred

    ov = overlaps if overlaps is not None else overlaps_disjoint_pred(
        gt.counts, pred.counts, gt.height, gt.width, gt.runs(), pred.runs())
    scores = pred.scores if pred.scores is not None else np.ones(len(pred))
    idx = np.arange(len(pred)) if pred_index is None else np.asarray(pred_index, np.int64)
    return ImageMatches(image_id, image_class, ov.gt_area.astype(np.int64), ov.pred_area.astype(np.int64),
                        gt.classes.copy(), pred.classes.copy(), np.asarray(scores, float), idx,
                        ov.gt_idx, ov.pred_idx, ov.inter.astype(np.int64))


def one_to_one(gi: np.ndarray, pj: np.ndarray, iou: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Pairs (indices into gi/pj) of a one-to-one matching among the pairs where ``keep``.

    With non-overlapping predictions and IoU > 0.5 every gt and prediction has at most one
    candidate and all are taken; otherwise (overlapping masks) the highest IoU goes first."""
    cand = np.flatnonzero(keep)
    if not len(cand) or (np.bincount(gi[cand]).max() <= 1 and np.bincount(pj[cand]).max() <= 1):
        return cand
    cand = cand[np.argsort(-iou[cand], kind="stable")]
    used_g, used_p, out = set(), set(), []
    for k in cand:
        g, p = int(gi[k]), int(pj[k])
        if g not in used_g and p not in used_p:
            used_g.add(g)
            used_p.add(p)
            out.append(k)
    return np.array(sorted(out), dtype=np.int64)


def best_partner(side: np.ndarray, other: np.ndarray, iou: np.ndarray, n: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per instance of one side: the pair index of its highest-IoU partner (-1), that IoU, overlap count."""
    pair = np.full(n, -1, dtype=np.int64)
    best = np.zeros(n)
    if len(side):
        order = np.lexsort((other, -iou, side))   # by instance, best IoU first (ties: lower index)
        first = order[np.r_[True, side[order][1:] != side[order][:-1]]]
        pair[side[first]] = first
        best[side[first]] = iou[first]
    return pair, best, np.bincount(side, minlength=n)


@dataclass
class Outcomes:
    """The taxonomy of one image at one threshold (see the module docstring)."""

    gt: np.ndarray          # (n_gt,) label
    pred: np.ndarray        # (n_pred,) label
    gt_match: np.ndarray    # (n_gt,) matched pred or -1
    pred_match: np.ndarray  # (n_pred,) matched gt or -1
    p_in_g: np.ndarray      # (pairs,) the prediction lies in the gt
    g_in_p: np.ndarray      # (pairs,) the gt lies in the prediction


def outcomes(im: ImageMatches, thr: float = DEFAULT_IOU, tb: float = BACKGROUND_IOU) -> Outcomes:
    gi, pj, iou = im.gi, im.pj, im.iou
    ng, npd = im.n_gt, im.n_pred
    m = one_to_one(gi, pj, iou, iou > thr)
    gt_match = np.full(ng, -1, np.int64)
    pred_match = np.full(npd, -1, np.int64)
    gt_match[gi[m]], pred_match[pj[m]] = pj[m], gi[m]
    p_in_g = 2 * im.inter > im.pred_area[pj]
    g_in_p = 2 * im.inter > im.gt_area[gi]
    preds_in_g = np.bincount(gi[p_in_g], minlength=ng)
    gts_in_p = np.bincount(pj[g_in_p], minlength=npd)
    _, g_best, _ = best_partner(gi, pj, iou, ng)
    p_pair, p_best, _ = best_partner(pj, gi, iou, npd)

    gl = np.full(ng, "missed", dtype=object)
    gl[g_best >= tb] = "poor_boundary"
    gl[preds_in_g >= 2] = "split"
    merged = g_in_p & (gts_in_p[pj] >= 2)
    gl[gi[merged]] = "merge"
    gl[gt_match >= 0] = "matched"

    pl = np.full(npd, "spurious", dtype=object)
    pl[p_best >= tb] = "poor_boundary"
    g_matched = gt_match >= 0
    dup = np.zeros(npd, bool)
    dup[pj[p_in_g & g_matched[gi]]] = True
    has = p_pair >= 0
    dup[np.flatnonzero(has)[(p_best[has] >= tb) & g_matched[gi[p_pair[has]]]]] = True
    pl[dup] = "duplicate"
    split = p_in_g & ~g_matched[gi] & (preds_in_g[gi] >= 2)
    pl[pj[split]] = "split"
    pl[gts_in_p >= 2] = "merge"
    pl[pred_match >= 0] = "matched"
    return Outcomes(gl, pl, gt_match, pred_match, p_in_g, g_in_p)


def size_bin(area: np.ndarray) -> np.ndarray:
    out = np.empty(len(area), dtype=object)
    for name, lo, hi in SIZE_BINS:
        out[(area >= lo) & (area < hi)] = name
    return out


# ---------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------

def _empty(columns) -> dict[str, np.ndarray]:
    return {c: np.zeros(0, dtype=object if t is str else t) for c, t in columns}


def _names(cls: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    names = np.array([""] + list(classes), dtype=object)
    return names[np.where((cls >= 0) & (cls < len(classes)), cls + 1, 0)]


@dataclass
class MatchTable:
    """Instance rows and pair rows as numpy columns (see the module docstring for the columns)."""

    instances: dict[str, np.ndarray] = field(default_factory=lambda: _empty(INSTANCE_COLUMNS))
    pairs: dict[str, np.ndarray] = field(default_factory=lambda: _empty(PAIR_COLUMNS))

    def __len__(self) -> int:
        return len(self.instances["image_id"])

    @classmethod
    def from_images(cls, model: str, images: Iterable[ImageMatches], classes: Sequence[str],
                    thr: float = DEFAULT_IOU, tb: float = BACKGROUND_IOU) -> "MatchTable":
        inst: dict[str, list] = {c: [] for c, _ in INSTANCE_COLUMNS}
        prs: dict[str, list] = {c: [] for c, _ in PAIR_COLUMNS}
        for im in images:
            _add_image(inst, prs, model, im, classes, thr, tb)
        return cls({c: _cat(inst[c], t) for c, t in INSTANCE_COLUMNS}, {c: _cat(prs[c], t) for c, t in PAIR_COLUMNS})

    @classmethod
    def concat(cls, tables: Sequence["MatchTable"]) -> "MatchTable":
        if not tables:
            return cls()
        return cls({c: np.concatenate([t.instances[c] for t in tables]) for c, _ in INSTANCE_COLUMNS},
                   {c: np.concatenate([t.pairs[c] for t in tables]) for c, _ in PAIR_COLUMNS})

    def image_ids(self) -> list[str]:
        """Images in table order (each once)."""
        return list(dict.fromkeys(self.instances["image_id"].tolist()))

    def models(self) -> list[str]:
        return list(dict.fromkeys(self.instances["model"].tolist()))

    def select(self, model: str | None = None, image_id: str | None = None) -> "MatchTable":
        def keep(cols):
            k = np.ones(len(cols["image_id"]), bool)
            if model is not None:
                k &= cols["model"] == model
            if image_id is not None:
                k &= cols["image_id"] == image_id
            return {c: v[k] for c, v in cols.items()}

        return MatchTable(keep(self.instances), keep(self.pairs))

    def for_image(self, image_id: str) -> "MatchTable":
        return self.select(image_id=image_id)

    def rows(self, side: str | None = None) -> list[dict]:
        """Instance rows as dicts (``side``: "gt", "pred" or both)."""
        k = np.ones(len(self), bool) if side is None else self.instances["side"] == side
        cols = {c: v[k].tolist() for c, v in self.instances.items()}
        return [dict(zip(cols, vals)) for vals in zip(*cols.values())]

    def images(self, classes: Sequence[str] = ()) -> list[ImageMatches]:
        """Back to per-image structures (one model's table), for the taxonomy and its fixes."""
        if len(self.models()) > 1:
            raise ValueError(f"images() needs one model's table, this one holds {self.models()}")
        cls_index = {c: k for k, c in enumerate(classes)}
        pair_rows = _group(self.pairs["image_id"])
        out = []
        for iid, rows in _group(self.instances["image_id"]).items():
            I = {c: v[rows] for c, v in self.instances.items()}
            g, p = I["side"] == "gt", I["side"] == "pred"
            g_idx, p_idx = I["idx"][g], I["idx"][p]
            go, po = np.argsort(g_idx), np.argsort(p_idx)
            pr = pair_rows.get(iid, np.zeros(0, np.int64))
            gpos = np.searchsorted(g_idx[go], self.pairs["gt"][pr])
            ppos = np.searchsorted(p_idx[po], self.pairs["pred"][pr])
            out.append(ImageMatches(
                iid, str(I["image_class"][0]), I["area"][g][go], I["area"][p][po],
                np.array([cls_index.get(c, -1) for c in I["class"][g][go]], np.int64),
                np.array([cls_index.get(c, -1) for c in I["class"][p][po]], np.int64),
                I["score"][p][po], p_idx[po], gpos.astype(np.int64), ppos.astype(np.int64),
                self.pairs["inter"][pr].astype(np.int64)))
        return out

    # ---- files ------------------------------------------------------------------
    def write(self, instances_path: Path, pairs_path: Path) -> None:
        from bench.util import atomic_write_bytes

        atomic_write_bytes(instances_path, _csv_gz(self.instances, INSTANCE_COLUMNS))
        atomic_write_bytes(pairs_path, _csv_gz(self.pairs, PAIR_COLUMNS))

    @classmethod
    def read(cls, instances_path: Path, pairs_path: Path) -> "MatchTable":
        return cls(_read_csv_gz(instances_path, INSTANCE_COLUMNS), _read_csv_gz(pairs_path, PAIR_COLUMNS))

    def to_csv_gz(self, which: str = "instances") -> bytes:
        return _csv_gz(self.instances, INSTANCE_COLUMNS) if which == "instances" else _csv_gz(self.pairs, PAIR_COLUMNS)


def _group(keys: np.ndarray) -> dict[str, np.ndarray]:
    """Row indices per key, keys in order of first appearance."""
    out: dict[str, list[int]] = {}
    for k, v in enumerate(keys.tolist()):
        out.setdefault(v, []).append(k)
    return {k: np.array(v, np.int64) for k, v in out.items()}


def _cat(parts: list, typ: type) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype=object if typ is str else typ)
    return np.concatenate([np.asarray(p, dtype=object if typ is str else typ) for p in parts])


def _add_image(inst: dict, prs: dict, model: str, im: ImageMatches, classes: Sequence[str], thr: float,
               tb: float) -> None:
    o = outcomes(im, thr, tb)
    iou = im.iou
    for side, n, area, cls, this, other, match, lab in (
            ("gt", im.n_gt, im.gt_area, im.gt_class, im.gi, im.pj, o.gt_match, o.gt),
            ("pred", im.n_pred, im.pred_area, im.pred_class, im.pj, im.gi, o.pred_match, o.pred)):
        pair, best, n_ov = best_partner(this, other, iou, n)
        other_index = im.pred_index if side == "gt" else np.arange(im.n_gt)
        own_index = np.arange(n) if side == "gt" else im.pred_index
        has = pair >= 0
        partner = np.full(n, -1, np.int64)
        partner[has] = other_index[other[pair[has]]]
        shared = np.zeros(n, np.int64)
        shared[has] = im.inter[pair[has]]
        mt = np.full(n, -1, np.int64)
        mt[match >= 0] = other_index[match[match >= 0]]
        for c, v in (("model", [model] * n), ("image_id", [im.image_id] * n), ("image_class", [im.image_class] * n),
                     ("side", [side] * n), ("idx", own_index), ("class", _names(cls, classes)),
                     ("score", im.pred_score if side == "pred" else np.full(n, np.nan)), ("area", area),
                     ("size_bin", size_bin(area)), ("partner", partner), ("iou", best), ("inter", shared),
                     ("match", mt), ("n_overlaps", n_ov), ("outcome", lab), ("threshold", np.full(n, thr))):
            inst[c].append(v)
    npairs = len(im.gi)
    for c, v in (("model", [model] * npairs), ("image_id", [im.image_id] * npairs), ("gt", im.gi),
                 ("pred", im.pred_index[im.pj]), ("inter", im.inter), ("iou", iou)):
        prs[c].append(v)


def _fmt(v, typ) -> str:
    if typ is float:
        return "" if not np.isfinite(v) else repr(float(v))
    return str(v)


def _csv_gz(cols: dict[str, np.ndarray], spec) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([c for c, _ in spec])
    lists = [[_fmt(v, t) for v in cols[c].tolist()] if t is float else cols[c].tolist() for c, t in spec]
    w.writerows(zip(*lists))
    return gzip.compress(buf.getvalue().encode(), compresslevel=6, mtime=0)


def _read_csv_gz(path: Path, spec) -> dict[str, np.ndarray]:
    try:
        text = gzip.decompress(Path(path).read_bytes()).decode()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(path, f"not a readable gzip csv ({e})") from None
    rows = list(csv.reader(io.StringIO(text)))
    want = [c for c, _ in spec]
    if not rows or rows[0] != want:
        raise DataError(path, f"not a cellbench match table (header {rows[0] if rows else 'missing'}, "
                              f"expected {','.join(want)})")
    body = rows[1:]
    out = {}
    for k, (c, t) in enumerate(spec):
        vals = [r[k] for r in body]
        try:
            if t is str:
                out[c] = np.array(vals, dtype=object)
            elif t is float:
                out[c] = np.array([float(v) if v else np.nan for v in vals], dtype=float)
            else:
                out[c] = np.array(vals, dtype=np.int64) if vals else np.zeros(0, np.int64)
        except ValueError as e:
            raise DataError(path, f"column {c}: {e}") from None
    return out


# ---------------------------------------------------------------------------
# a run's models
# ---------------------------------------------------------------------------

def images_for_predictions(gt: dict[str, tuple[Instances, str]], preds: dict[str, Instances],
                           resolve: bool = True) -> list[ImageMatches]:
    """Per image of the ground truth, as the evaluator scores them (missing predictions: none)."""
    from bench.metrics.kaggle import check_or_resolve_overlaps, resolve_overlaps_index
    from bench.metrics.matching import overlapping_pixels

    out = []
    for iid, (g, ct) in gt.items():
        p = preds.get(iid)
        if p is None:
            p = Instances.empty(g.height, g.width)
        if overlapping_pixels(p.counts, p.runs()):
            if not resolve:
                check_or_resolve_overlaps(p, iid, False)  # raises, naming the image
            p, kept = resolve_overlaps_index(p)
        else:
            kept = np.arange(len(p))
        out.append(image_matches(iid, g, p, kept, ct))
    return out


def build_for_model(run_dir: Path, label: str, gt=None, classes=None, save: bool = True) -> MatchTable:
    """Compute one model's table from its stored predictions (no inference); save it unless not."""
    from bench.data.predictions import read_predictions
    from bench.store import RunDir
    from bench.tune import validation_ground_truth

    run = RunDir(run_dir)
    md = run.resolve(label)
    if not md.predictions.is_file():
        raise DataError(md.predictions, f"model {md.label} has no stored predictions (it did not finish "
                                        "predicting), so it has no match table")
    if gt is None:
        gt, classes = validation_ground_truth(run.path, run.read_manifest())
    preds, _ = read_predictions(md.predictions)
    resolve = True
    if md.job.is_file():
        resolve = bool(md.read_job().resolve_overlaps)
    table = MatchTable.from_images(md.label, images_for_predictions(gt, preds, resolve), classes)
    if save:
        table.write(md.matches, md.match_pairs)
    return table


def load_matches(run_dir: Path, label: str, save: bool = True) -> MatchTable:
    """A model's match table: read from its folder, else computed from its stored predictions (a
    run of an older cellbench) and saved there (unless ``save=False``)."""
    from bench.store import RunDir

    md = RunDir(run_dir).resolve(label)
    if md.matches.is_file() and md.match_pairs.is_file():
        return MatchTable.read(md.matches, md.match_pairs)
    return build_for_model(run_dir, md.label, save=save)


def load_run_matches(run_dir: Path, labels: Sequence[str] | None = None, save: bool = True) -> MatchTable:
    """Every model of a run with predictions (or ``labels``), concatenated; the ground truth is
    read once for the models whose table must be computed."""
    from bench.store import RunDir
    from bench.tune import validation_ground_truth

    run = RunDir(run_dir)
    mds = [run.resolve(m) for m in labels] if labels else [m for m in run.models() if m.predictions.is_file()
                                                           or m.matches.is_file()]
    if not mds:
        raise DataError(run.models_dir, "no model with stored predictions in this run")
    gt = classes = None
    tables = []
    for md in mds:
        if md.matches.is_file() and md.match_pairs.is_file():
            tables.append(MatchTable.read(md.matches, md.match_pairs))
            continue
        if gt is None:
            gt, classes = validation_ground_truth(run.path, run.read_manifest())
        tables.append(build_for_model(run.path, md.label, gt, classes, save=save))
    return MatchTable.concat(tables)


def paired_tables(run_a: Path, model_a: str, run_b: Path, model_b: str) -> tuple[MatchTable, MatchTable]:
    """Two models' tables for a side-by-side comparison (the report's pair view): only models
    scored on the same validation split are comparable; otherwise an error naming both split hashes."""
    from bench.store import RunDir

    ha, hb = RunDir(run_a).read_manifest().split_hash, RunDir(run_b).read_manifest().split_hash
    if ha != hb:
        raise DataError(f"{model_a} vs {model_b}", f"trained and scored on different splits ({model_a}: split "
                                                   f"{ha or 'unknown'} in {run_a}; {model_b}: split "
                                                   f"{hb or 'unknown'} in {run_b}); a pair view needs the same "
                                                   "validation images")
    return load_matches(run_a, model_a), load_matches(run_b, model_b)
