"""The match table, the error taxonomy, the neighbouring benchmarks' metrics, the clustered and
vectorised bootstrap.

The metrics are cross-checked against independent dense implementations written here from the
benchmarks' own code (NeurIPS-CellSeg's compute_metric.py, HoVer-Net's get_fast_pq) and against
``cellpose.metrics`` where it imports, on real Sartorius annotations and on suite-generated data
(so the dense checks never all skip).
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from typer.testing import CliRunner

from bench.cli import app
from bench.data.errors import DataError
from bench.data.sample import Instances
from bench.metrics.bootstrap import bootstrap_ci, resample_weights
from bench.metrics.evaluator import evaluate_predictions
from bench.metrics.matches import MatchTable, image_matches, load_matches, outcomes
from bench.metrics.resample import cluster_weights, count_at_most, groups_from_meta, weighted_ap_many
from bench.metrics.taxonomy import taxonomy

runner = CliRunner()


def _out(r) -> str:
    text = r.output
    try:
        text += r.stderr
    except (ValueError, AttributeError):
        pass
    return text


# ---------------------------------------------------------------------------
# the README's worked example
# ---------------------------------------------------------------------------

def _boxes(items, h=20, w=30):
    lab = np.zeros((h, w), np.int32)
    for k, (y0, y1, x0, x1) in enumerate(items, 1):
        lab[y0:y1, x0:x1] = k
    return lab


def worked_example():
    """5 cells: g0 found, g1 cut in two, g2+g3 covered by one prediction, g4 hit by a small piece;
    plus a prediction on background."""
    gt = Instances.from_label_image(_boxes([(0, 10, 0, 10), (0, 10, 12, 22), (12, 18, 0, 6), (12, 18, 8, 14),
                                            (12, 18, 20, 28)]))
    p = np.zeros((20, 30), np.int32)
    p[0:10, 0:9] = 1       # g0: IoU 0.9
    p[0:10, 12:17] = 2     # g1's left half
    p[0:10, 17:22] = 3     # g1's right half
    p[12:18, 0:14] = 4     # g2 and g3 and the gap between them
    p[12:15, 20:25] = 5    # g4: IoU 15/48
    p[19:20, 0:30] = 6     # background
    return gt, Instances.from_label_image(p, scores=np.linspace(1, 0.5, 6))


def test_worked_example_outcomes_and_round_trip(tmp_path):
    gt, pred = worked_example()
    im = image_matches("a", gt, pred, image_class="x")
    o = outcomes(im)
    assert o.gt.tolist() == ["matched", "split", "merge", "merge", "poor_boundary"]
    assert o.pred.tolist() == ["matched", "split", "split", "merge", "poor_boundary", "spurious"]
    t = MatchTable.from_images("m", [im], ["x"])
    t.write(tmp_path / "i.csv.gz", tmp_path / "p.csv.gz")
    back = MatchTable.read(tmp_path / "i.csv.gz", tmp_path / "p.csv.gz")
    rows = back.rows("gt")
    assert [r["partner"] for r in rows] == [0, 1, 3, 3, 4]
    assert rows[0]["iou"] == pytest.approx(0.9) and rows[0]["match"] == 0 and rows[1]["match"] == -1
    assert rows[4]["iou"] == pytest.approx(15 / 48) and rows[4]["size_bin"] == "small"
    assert back.rows("pred")[5]["partner"] == -1 and back.rows("pred")[5]["n_overlaps"] == 0
    im2 = back.images(["x"])[0]
    assert np.array_equal(im2.inter, im.inter) and np.array_equal(im2.gi, im.gi) and np.array_equal(im2.pj, im.pj)


def test_worked_example_kaggle_if_fixed():
    gt, pred = worked_example()
    tax = taxonomy([image_matches("a", gt, pred, image_class="x")])
    # actual: g0 (IoU 0.9) is the one TP at t = 0.50..0.85 (8 of 10 thresholds): 1 / (1 + 5 FP + 4 FN)
    assert tax["kaggle_map"] == pytest.approx(0.8 * 0.1)
    # split fixed: the two halves become g1 exactly (IoU 1): 2 TP, 3 FP, 3 FN at 8 thresholds, 1/9 at 0.90, 0.95
    assert tax["if_fixed"]["split"] == pytest.approx((8 * 2 / 8 + 2 * 1 / 9) / 10)
    # merge fixed: the prediction is cut into g2 and g3 exactly (7 predictions): 3 TP, 4 FP, 2 FN up to 0.85,
    # then g2 and g3 only: 2 TP, 5 FP, 3 FN
    assert tax["if_fixed"]["merge"] == pytest.approx((8 * 3 / 9 + 2 * 2 / 10) / 10)
    # spurious fixed: the background prediction removed: 1 / (1 + 4 + 4) at 8 thresholds
    assert tax["if_fixed"]["spurious"] == pytest.approx(0.8 / 9)
    assert tax["if_fixed"]["missed"] == pytest.approx(tax["kaggle_map"])  # nothing was missed
    assert tax["counts"]["gt"] == {"matched": 1, "merge": 2, "split": 1, "poor_boundary": 1, "missed": 0}


def test_duplicate_and_missed():
    gt = Instances.from_label_image(_boxes([(0, 10, 0, 10), (12, 18, 20, 28)]))
    p = np.zeros((20, 30), np.int32)
    p[0:10, 0:8] = 1       # g0 matched (IoU 0.8)
    p[0:10, 8:12] = 2      # a second prediction on the found cell
    t = outcomes(image_matches("a", gt, Instances.from_label_image(p, scores=np.ones(2))))
    assert t.gt.tolist() == ["matched", "missed"] and t.pred.tolist() == ["matched", "duplicate"]


# ---------------------------------------------------------------------------
# independent dense references (from the benchmarks' own code)
# ---------------------------------------------------------------------------

def dense_iou(gl: np.ndarray, pl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, m = int(gl.max()), int(pl.max())
    ov = np.bincount(gl.ravel() * (m + 1) + pl.ravel(), minlength=(n + 1) * (m + 1)).reshape(n + 1, m + 1)
    union = ov.sum(0, keepdims=True) + ov.sum(1, keepdims=True) - ov
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.nan_to_num(ov / union)
    return iou[1:, 1:], ov[1:, 1:]


def neurips_tp(iou: np.ndarray, th: float = 0.5) -> int:
    """cellpose's _true_positive, which NeurIPS-CellSeg's compute_metric.py calls."""
    if iou.size == 0:
        return 0
    n_min = min(iou.shape)
    costs = -(iou >= th).astype(float) - iou / (2 * n_min)
    r, c = linear_sum_assignment(costs)
    return int((iou[r, c] >= th).sum())


def neurips_f1(gl, pl) -> float:
    iou, _ = dense_iou(gl, pl)
    tp = neurips_tp(iou)
    if tp == 0:
        return 0.0
    p, r = tp / pl.max(), tp / gl.max()
    return 2 * p * r / (p + r)


def remove_boundary_cells(mask: np.ndarray) -> np.ndarray:
    """NeurIPS-CellSeg's remove_boundary_cells (2-pixel frame), then relabelled 1..N."""
    from skimage.segmentation import relabel_sequential

    W, H = mask.shape
    bd = np.ones((W, H))
    bd[2:W - 2, 2:H - 2] = 0
    mask = mask.copy()
    for i in np.unique(mask * bd)[1:]:
        mask[mask == i] = 0
    return relabel_sequential(mask)[0]


def hovernet_pq(gl, pl) -> float:
    """HoVer-Net's get_fast_pq at match_iou 0.5 (pairs with IoU > 0.5 are unique)."""
    iou, _ = dense_iou(gl, pl)
    g, p = np.nonzero(iou > 0.5)
    tp, fp, fn = len(g), pl.max() - len(g), gl.max() - len(g)
    if tp + fp + fn == 0:
        return float("nan")
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = iou[g, p].sum() / (tp + 1.0e-6)
    return dq * sq


def dense_aji_cellpose(gl, pl) -> float:
    """cellpose.metrics.aggregated_jaccard_index, densely: assigned intersections / foreground union."""
    iou, ov = dense_iou(gl, pl)
    union = np.logical_or(gl > 0, pl > 0).sum()
    if iou.size == 0:
        return 0.0
    n_min = min(iou.shape)
    r, c = linear_sum_assignment(-(iou >= 0.5).astype(float) - iou / (2 * n_min))
    return ov[r, c].sum() / union


def perturb(gl: np.ndarray, seed: int) -> np.ndarray:
    """Predictions with every error type: shifted, eroded, dropped, two cells merged, one split, blobs."""
    from scipy import ndimage as ndi
    from skimage.segmentation import relabel_sequential

    rng = np.random.default_rng(seed)
    lab = np.roll(gl, (1, 1), axis=(0, 1))
    n = int(lab.max())
    edge = ndi.maximum_filter(lab, 3) != ndi.minimum_filter(lab, 3)
    lab[edge & np.r_[False, rng.random(n) < 0.3][lab]] = 0
    lab[np.r_[False, rng.random(n) < 0.1][lab]] = 0
    for k in rng.choice(np.arange(1, n), size=min(3, n - 1), replace=False):
        lab[lab == k + 1] = k                                # merge neighbours in label order
    for k in rng.choice(np.arange(1, n + 1), size=min(3, n), replace=False):
        ys, xs = np.nonzero(lab == k)
        if len(xs):
            lab[ys[xs > np.median(xs)], xs[xs > np.median(xs)]] = n + 10 + k   # split in two halves
    h, w = lab.shape
    yy, xx = np.ogrid[:h, :w]
    for k in range(3):
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        lab[((yy - cy) ** 2 + (xx - cx) ** 2 <= 25) & (lab == 0)] = 3 * n + 100 + k
    return relabel_sequential(lab)[0]


def label_pairs(samples) -> list[tuple[str, np.ndarray, np.ndarray]]:
    from skimage.segmentation import relabel_sequential

    out = []
    for k, s in enumerate(samples):
        gl = relabel_sequential(s.instances.to_label_image())[0]
        out.append((s.image_id, gl, perturb(gl, k)))
    return out


def check_against_references(pairs) -> dict:
    gt = {i: (Instances.from_label_image(g), "c") for i, g, _ in pairs}
    pr = {i: Instances.from_label_image(p, scores=np.linspace(1, 0.1, p.max())) for i, _, p in pairs}
    res = evaluate_predictions(gt, pr, ["c"], with_coco=False, remove_boundary_cells=True, n_resamples=50)
    per = res["per_image_cell"]
    f1 = [neurips_f1(g, p) for _, g, p in pairs]
    f1b = [neurips_f1(remove_boundary_cells(g), remove_boundary_cells(p)) for _, g, p in pairs]
    pq = [hovernet_pq(g, p) for _, g, p in pairs]
    aji = [dense_aji_cellpose(g, p) for _, g, p in pairs]
    for (i, _, _), a, b, c in zip(pairs, f1, pq, aji):
        assert per[i]["f1_50"] == pytest.approx(a, abs=1e-12), i
        assert per[i]["pq"] == pytest.approx(b, abs=1e-5), i     # HoVer-Net's SQ has a 1e-6 in its denominator
        assert per[i]["aji"] == pytest.approx(c, abs=1e-12), i
    assert res["cell"]["f1_50"] == pytest.approx(np.mean(f1), abs=1e-12)
    assert res["cell"]["f1_50_boundary_removed"] == pytest.approx(np.mean(f1b), abs=1e-12)
    assert res["cell"]["aji"] == pytest.approx(np.mean(aji), abs=1e-12)
    # mean matched IoU: the pairs of the same assignment with IoU >= 0.5, pooled
    s = n = 0
    for _, g, p in pairs:
        iou, _ = dense_iou(g, p)
        r, c = linear_sum_assignment(-(iou >= 0.5).astype(float) - iou / (2 * min(iou.shape)))
        ok = iou[r, c] >= 0.5
        s, n = s + iou[r, c][ok].sum(), n + ok.sum()
    assert res["cell"]["mean_matched_iou"] == pytest.approx(s / n, abs=1e-12)
    return res


def test_cell_metrics_match_references_on_generated_data(tiny_synth):
    from bench.data.io import load_dataset

    ds = load_dataset(tiny_synth)
    res = check_against_references(label_pairs(list(ds)[:6]))
    assert 0 < res["cell"]["f1_50"] < 1 and 0 < res["cell"]["pq"] < 1


def test_cell_metrics_match_references_on_real_annotations(real_csv):
    from bench.data.io import read_sartorius

    ds = read_sartorius(real_csv, require_images=False)
    samples = [s for s in ds][:4]
    check_against_references(label_pairs(samples))


def test_cell_metrics_match_cellpose_on_real_annotations(real_csv):
    cp = pytest.importorskip("cellpose.metrics")
    from bench.data.io import read_sartorius

    ds = read_sartorius(real_csv, require_images=False)
    pairs = label_pairs([s for s in ds][:3])
    gt = {i: (Instances.from_label_image(g), "c") for i, g, _ in pairs}
    pr = {i: Instances.from_label_image(p, scores=np.ones(p.max())) for i, _, p in pairs}
    res = evaluate_predictions(gt, pr, ["c"], with_coco=False, n_resamples=20)
    gl, pl = [g for _, g, _ in pairs], [p for _, _, p in pairs]
    aji = cp.aggregated_jaccard_index(gl, pl)
    _, tp, fp, fn = cp.average_precision(gl, pl, threshold=[0.5])
    for k, (i, _, _) in enumerate(pairs):
        assert res["per_image_cell"][i]["aji"] == pytest.approx(aji[k], abs=1e-12)
        assert res["per_image_cell"][i]["tp50"] == int(tp[k, 0])
        prec, rec = tp[k, 0] / (tp[k, 0] + fp[k, 0]), tp[k, 0] / (tp[k, 0] + fn[k, 0])
        assert res["per_image_cell"][i]["f1_50"] == pytest.approx(2 * prec * rec / (prec + rec), abs=1e-6)


# ---------------------------------------------------------------------------
# bootstrap: vectorised COCO AP, clusters
# ---------------------------------------------------------------------------

def test_count_at_most_is_searchsorted():
    thr = np.linspace(0.0, 1.00, 101, endpoint=True)
    x = np.concatenate([np.random.default_rng(0).random(5000), thr, np.nextafter(thr, 2), np.nextafter(thr[1:], -1),
                        np.arange(0, 701) / 700, np.arange(0, 1001) / 1000])
    assert np.array_equal(count_at_most(thr, x), np.searchsorted(thr, x, side="right"))


def test_weighted_ap_many_equals_the_per_resample_loop(tiny_synth):
    from bench.data.io import load_dataset
    from bench.metrics.coco import coco_eval, match_table, weighted_ap

    ds = load_dataset(tiny_synth)
    pairs = label_pairs(list(ds))
    images = [(i, Instances.from_label_image(g), Instances.from_label_image(p, scores=np.random.default_rng(k).random(
        p.max()))) for k, (i, g, p) in enumerate(pairs)]
    _, E = coco_eval(images)
    mt = match_table(E)
    W = np.vstack([resample_weights(len(images), 40, 3), np.zeros((1, len(images)), np.int64),
                   cluster_weights([str(k // 3) for k in range(len(images))], 20, 1)])
    W[-1] = 0
    W[-1, 0] = 1   # a resample of one image
    many = weighted_ap_many(mt, W, max_cells=500)   # small blocks: the block loop is exercised
    loop = np.array([weighted_ap(mt, w) for w in W])
    assert np.allclose(many, loop, atol=1e-12, equal_nan=True)
    assert np.isnan(many[40]).all()   # no image drawn: undefined, as the loop says


def test_cluster_bootstrap_resamples_whole_groups():
    vals = np.random.default_rng(0).random(7)
    dup = np.repeat(vals, 2)   # every image twice, both copies in one group
    from bench.metrics.resample import make_resamples, mean_ci

    ids = [f"i{k}" for k in range(14)]
    rs = make_resamples(ids, {i: f"g{k // 2}" for k, i in enumerate(ids)}, "sample_id", 300, 5)
    assert rs.unit == "sample_id (7 groups)"
    assert (rs.weights[:, 0::2] == rs.weights[:, 1::2]).all()   # a group is drawn whole
    # drawing 7 groups of 2 equal images = drawing the 7 images: the same interval
    assert mean_ci(dup, rs.weights) == pytest.approx(bootstrap_ci(vals, 300, 5), abs=1e-12)
    assert make_resamples(ids, {i: i for i in ids}, "x", 10, 0).unit == "images"   # singleton groups


def test_cluster_attribute_missing_is_a_clear_error(tiny_synth):
    from bench.data.io import load_dataset

    ds = load_dataset(tiny_synth)
    assert len(set(groups_from_meta(list(ds), "sample_id").values())) < len(ds)
    samples = list(ds)
    samples[1].meta.pop("sample_id")
    with pytest.raises(DataError, match=r"1 of 12 image\(s\) have no 'sample_id' \(e.g. " + samples[1].image_id):
        groups_from_meta(samples, "sample_id")


def test_eval_cli_cluster_option(tiny_synth, tmp_path):
    from bench.data.io import load_dataset
    from bench.data.predictions import write_predictions

    ds = load_dataset(tiny_synth)
    preds = {s.image_id: Instances.from_label_image(perturb(s.instances.to_label_image(), k), cls_id=-1)
             for k, s in enumerate(ds)}
    for p in preds.values():
        p.scores = np.ones(len(p))
    f = tmp_path / "p.jsonl.gz"
    write_predictions(f, preds, ds.classes)
    r = runner.invoke(app, ["eval", "--gt", str(tiny_synth), "--pred", str(f), "--cluster", "nosuch"])
    assert r.exit_code == 2 and "have no 'nosuch'" in _out(r) and "sample_id" in _out(r)
    r = runner.invoke(app, ["eval", "--gt", str(tiny_synth), "--pred", str(f), "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, _out(r)
    assert "resamples of sample_id/well" in _out(r) and "F1 @ IoU 0.5" in _out(r) and "if fixed" in _out(r)
    import json

    res = json.loads((tmp_path / "r.json").read_text())
    assert res["bootstrap"]["unit"].startswith("sample_id/well") and "pq_ci95" in res["cell"]


# ---------------------------------------------------------------------------
# in a run: written by the worker, computed on demand for older runs, bench matches
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from bench.data.synth import generate
    from bench.runner.run import run_benchmark

    tmp = tmp_path_factory.mktemp("matches")
    generate(tmp / "synth", n_images=16, size=(128, 128), seed=1)
    run_dir, outcomes = run_benchmark(["watershed"], str(tmp / "synth"), "smoke", "cpu", 0, tmp / "run",
                                      val_fraction=0.5, results=tmp / "results", echo=lambda *_: None)
    assert [o.state for o in outcomes] == ["done"], [o.detail for o in outcomes]
    return Path(run_dir)


def test_run_writes_match_table_and_taxonomy(run):
    from bench.store import RunDir

    md = RunDir(run).model("watershed")
    t = MatchTable.read(md.matches, md.match_pairs)
    m = md.read_metrics()
    n_gt = sum(1 for r in t.rows("gt"))
    assert n_gt == sum(m["taxonomy"]["counts"]["gt"].values()) > 0
    assert m["taxonomy"]["kaggle_map"] == pytest.approx(m["kaggle_map"], abs=1e-12)   # the same scoring
    assert set(t.instances["outcome"]) <= {"matched", "merge", "split", "poor_boundary", "missed", "duplicate",
                                           "spurious"}
    assert "f1_50" in m["cell"] and m["bootstrap"]["n_resamples"] == 2000


def test_older_run_gets_its_table_on_demand_and_bench_matches(run, tmp_path):
    from bench.store import RunDir

    old = tmp_path / "old"
    shutil.copytree(run, old)
    md = RunDir(old).model("watershed")
    want = MatchTable.read(md.matches, md.match_pairs)
    md.matches.unlink()
    md.match_pairs.unlink()
    r = runner.invoke(app, ["matches", str(old), "--model", "watershed", "--out", str(tmp_path / "m.csv")])
    assert r.exit_code == 0, _out(r)
    assert md.matches.is_file() and "Kaggle mAP if fixed" in _out(r)
    got = load_matches(old, "watershed")
    # the same table (scores: the predictions file keeps 6 decimals, the worker had them unrounded)
    assert all(np.array_equal(got.instances[c], want.instances[c]) for c in want.instances if c != "score")
    assert np.allclose(got.instances["score"], want.instances["score"], atol=1e-6, equal_nan=True)
    text = (tmp_path / "m.csv").read_text()
    assert text.startswith("model,image_id,image_class,side,idx") and text.count("\n") == len(want) + 1
    r = runner.invoke(app, ["matches", str(old), "--out", str(tmp_path / "p.csv.gz"), "--pairs"])
    assert r.exit_code == 0 and gzip.decompress((tmp_path / "p.csv.gz").read_bytes()).startswith(b"model,image_id,gt")


def test_bench_matches_bad_input(run, tmp_path):
    from bench.store import RunDir

    r = runner.invoke(app, ["matches", str(run), "--model", "cellpose"])
    assert r.exit_code == 2 and "no model 'cellpose' in this run" in _out(r)
    broken = tmp_path / "b"
    shutil.copytree(run, broken)
    md = RunDir(broken).model("watershed")
    for p in (md.matches, md.match_pairs, md.predictions):
        p.unlink()
    r = runner.invoke(app, ["matches", str(broken), "--model", "watershed"])
    assert r.exit_code == 2 and "has no stored predictions" in _out(r) and "predictions.jsonl.gz" in _out(r)
    r = runner.invoke(app, ["matches", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "run folder does not exist" in _out(r)
    md.matches.write_bytes(b"not gzip")
    md.match_pairs.write_bytes(b"x")
    with pytest.raises(DataError, match="not a readable gzip csv"):
        load_matches(broken, "watershed")


def test_report_shows_cell_metrics_and_taxonomy(run, tmp_path):
    r = runner.invoke(app, ["report", str(run), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, _out(r)
    md = (tmp_path / "rep" / "leaderboard.md").read_text()
    assert "F1 @ IoU 0.5" in md and "Why models lose" in md and "bootstrap CI over" in md
    csv_head = (tmp_path / "rep" / "leaderboard.csv").read_text().splitlines()[0]
    assert "f1_50" in csv_head and "aji_lo" in csv_head and "bootstrap_unit" in csv_head
    assert (tmp_path / "rep" / "taxonomy.csv").read_text().startswith("model,error,gt_cells")


def test_pair_of_models_on_different_splits_is_refused(run, tmp_path):
    import json

    from bench.metrics.matches import paired_tables

    other = tmp_path / "other"
    shutil.copytree(run, other)
    a, b = paired_tables(run, "watershed", other, "watershed")
    assert len(a) == len(b) > 0
    man = json.loads((other / "manifest.json").read_text())
    real = man["split_hash"]
    man["split_hash"] = "0123456789abcdef"
    (other / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DataError, match=f"different splits.*split {real}.*split 0123456789abcdef"):
        paired_tables(run, "watershed", other, "watershed")


def test_paired_clustered_resamples_whole_groups():
    from bench.metrics.bootstrap import paired_bootstrap
    from bench.metrics.resample import paired_clustered

    rng = np.random.default_rng(2)
    a, b = rng.random(9), rng.random(9)
    plain = paired_bootstrap({f"i{k}": v for k, v in enumerate(a)}, {f"i{k}": v for k, v in enumerate(b)}, 400, 3)
    # every image twice in one group: drawing the 9 groups is drawing the 9 images
    ids = [f"i{k}c{c}" for k in range(9) for c in (0, 1)]
    aa = {i: a[int(i[1:].split("c")[0])] for i in ids}
    bb = {i: b[int(i[1:].split("c")[0])] for i in ids}
    groups = {i: i.split("c")[0] for i in ids}
    clustered = paired_clustered(aa, bb, groups, 400, 3)
    assert clustered.diff == pytest.approx(plain.diff)
    assert clustered.diff_ci95 == pytest.approx(plain.diff_ci95, abs=1e-12)
    assert clustered.p_a_better == pytest.approx(plain.p_a_better)


def test_report_of_an_older_run_computes_the_taxonomy_without_writing(run, tmp_path):
    import json

    from bench.store import RunDir

    old = tmp_path / "old"
    shutil.copytree(run, old)
    md = RunDir(old).model("watershed")
    md.matches.unlink()
    md.match_pairs.unlink()
    m = json.loads(md.metrics.read_text())
    for k in ("cell", "taxonomy", "bootstrap", "image_group", "per_image_cell"):
        m.pop(k, None)
    md.metrics.write_text(json.dumps(m))
    r = runner.invoke(app, ["report", str(old), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, _out(r)
    text = (tmp_path / "rep" / "leaderboard.md").read_text()
    assert "Not in the metrics of watershed" in text and "### watershed" in text and "Kaggle mAP if fixed" in text
    assert not md.matches.exists()   # the report reads run folders, never writes into them
