"""``python -m bench.benchmarks`` (``make bench``): cellbench's data and metric speed, measured.

A. reading the real 56-image annotation csv into samples, vs a per-mask dense numpy decode +
   pycocotools encode (the usual notebook code), same run;
B. scoring, csv in -> Kaggle score out, vs a pycocotools-IoU pipeline and vs
   ``cellpose.metrics.average_precision`` on label images;
C. peak RSS and time of the full evaluator (Kaggle + COCO AP + bootstrap CIs) on 600 images,
   in a subprocess;
E. ``bench eval`` as a whole process (all metrics, CIs) vs a whole process painting label images
   and calling ``cellpose.metrics.average_precision`` (``--only-e`` runs this section alone);
D. harness overhead (:mod:`bench.overhead`): training s/iter and inference ms/img of every
   trainable adapter through cellbench vs the framework's own loop and predictor, on tiny
   synthetic data (written to results/bench/overhead.json).
F. the interactive HTML report on 600 synthetic images x 5 models (:mod:`bench.report.scale`):
   time to write, size, and time to open / switch images in headless Chromium where installed.
G. executors (:mod:`bench.executor.bench_executors`): a tiny sweep with ``--jobs 1`` and ``--jobs 2``
   on the CPU, and SLURM's per-job scheduling overhead where a cluster answers.

A-C need the real annotations in ../shared/data, D only the frameworks (sections are skipped with
a message when data or packages are absent); nothing is downloaded. ``--no-overhead`` leaves D
out; ``--overhead-args "..."`` passes options to it (e.g. ``"--device cuda"``). Prints a table of figure / target / PASS|FAIL;
exits 0 whatever the figures (timings depend on the machine and its load, printed with them).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np

from bench.util import shared_data

REPO = Path(__file__).resolve().parents[1]
REL = Path("sartorius_gallegi_t4e") / "derived" / "val_fold0_part1_56ids_sartorius_rle.csv"
THRESHOLDS = np.round(np.arange(0.5, 1.0, 0.05), 2)
N_BIG = 600


def load_note() -> str:
    try:
        la = os.getloadavg()
        return f"load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} on {os.cpu_count()} cores"
    except OSError:
        return "load average unknown"


def best_of(n: int, fn):
    """(best wall time in s, result of the last call): the minimum is the least load-disturbed run."""
    best, out = np.inf, None
    for _ in range(n):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


# ---------------------------------------------------------------------------
# the baselines: what one writes without cellbench
# ---------------------------------------------------------------------------

def read_rows(path: Path) -> "OrderedDict[str, dict]":
    out: "OrderedDict[str, dict]" = OrderedDict()
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        pred_col = "annotation" if "annotation" in (r.fieldnames or []) else "predicted"
        for row in r:
            g = out.setdefault(row["id"], {"ann": [], "h": int(row.get("height") or 520),
                                           "w": int(row.get("width") or 704)})
            if row[pred_col].strip():
                g["ann"].append(row[pred_col])
    return out


def dense_decode(ann: str, h: int, w: int) -> np.ndarray:
    """The notebook rle_decode: np.zeros(h*w), fill the runs, reshape."""
    s = ann.split()
    starts, lengths = np.asarray(s[0::2], dtype=np.int64) - 1, np.asarray(s[1::2], dtype=np.int64)
    flat = np.zeros(h * w, dtype=np.uint8)
    for a, n in zip(starts, lengths):
        flat[a:a + n] = 1
    return flat.reshape(h, w)


def baseline_read(path: Path) -> dict[str, list[dict]]:
    """Per-mask dense decode + pycocotools encode: the same COCO RLE currency, the slow way."""
    from pycocotools import mask as mask_util

    out = {}
    for iid, g in read_rows(path).items():
        out[iid] = [mask_util.encode(np.asfortranarray(dense_decode(a, g["h"], g["w"]))) for a in g["ann"]]
    return out


def kaggle_from_iou(iou: np.ndarray, n_pred: int) -> float:
    """The competition's rule on a (gt x pred) IoU matrix."""
    if n_pred == 0:
        return 0.0
    prec = []
    for t in THRESHOLDS:
        m = iou > t
        tp, fn, fp = np.sum(m.sum(1) == 1), np.sum(m.sum(1) == 0), np.sum(m.sum(0) == 0)
        prec.append(tp / (tp + fp + fn))
    return float(np.mean(prec))


def baseline_pycocotools_score(gt_csv: Path, sub_csv: Path) -> tuple[float, dict]:
    from pycocotools import mask as mask_util

    gt, pr = read_rows(gt_csv), read_rows(sub_csv)
    per = {}
    for iid, g in gt.items():
        h, w = g["h"], g["w"]
        G = [mask_util.encode(np.asfortranarray(dense_decode(a, h, w))) for a in g["ann"]]
        P = [mask_util.encode(np.asfortranarray(dense_decode(a, h, w))) for a in pr.get(iid, {"ann": []})["ann"]]
        iou = np.asarray(mask_util.iou(G, P, [0] * len(P))) if G and P else np.zeros((len(G), len(P)))
        per[iid] = kaggle_from_iou(iou.reshape(len(G), len(P)), len(P))
    return float(np.mean(list(per.values()))), per


def label_image(anns: list[str], h: int, w: int) -> np.ndarray:
    """Masks painted in csv order (later ones overwrite earlier ones), straight from the runs."""
    lab = np.zeros(h * w, dtype=np.int32)
    for k, a in enumerate(anns, start=1):
        s = a.split()
        for st, n in zip(s[0::2], s[1::2]):
            st = int(st) - 1
            lab[st:st + int(n)] = k
    return lab.reshape(h, w)


def label_image_dense(anns: list[str], h: int, w: int) -> np.ndarray:
    """The notebook way: decode each mask densely, paint it (later ones overwrite earlier ones)."""
    lab = np.zeros((h, w), dtype=np.int32)
    for k, a in enumerate(anns, start=1):
        lab[dense_decode(a, h, w) > 0] = k
    return lab


def baseline_cellpose_score(gt_csv: Path, sub_csv: Path, painter=label_image) -> tuple[float, dict]:
    from cellpose import metrics as cp_metrics

    gt, pr = read_rows(gt_csv), read_rows(sub_csv)
    ids = list(gt)
    gl = [painter(gt[i]["ann"], gt[i]["h"], gt[i]["w"]) for i in ids]
    pl = [painter(pr.get(i, {"ann": []})["ann"], gt[i]["h"], gt[i]["w"]) for i in ids]
    with warnings.catch_warnings():  # 0/0 IoU rows of gt labels painted over completely
        warnings.simplefilter("ignore", RuntimeWarning)
        ap, _, _, _ = cp_metrics.average_precision(gl, pl, threshold=list(THRESHOLDS))
    per = dict(zip(ids, ap.mean(axis=1).astype(float)))
    return float(np.mean(list(per.values()))), per


# ---------------------------------------------------------------------------
# perturbed predictions (non-overlapping, as a Kaggle submission)
# ---------------------------------------------------------------------------

def perturbed_predictions(ds, seed: int = 0) -> dict:
    """Per image: gt label image shifted 1 px, a third of the cells eroded by their boundary,
    10 % dropped, a few false blobs; random scores."""
    from scipy import ndimage as ndi

    from bench.data.sample import Instances

    rng = np.random.default_rng(seed)
    out = {}
    for s in ds:
        lab = s.instances.to_label_image()
        h, w = lab.shape
        lab = np.roll(lab, (1, 1), axis=(0, 1))
        lab[0, :] = 0
        lab[:, 0] = 0
        n = int(lab.max())
        edge = ndi.maximum_filter(lab, 3) != ndi.minimum_filter(lab, 3)
        eroded = np.concatenate(([False], rng.random(n) < 0.3))
        lab[edge & eroded[lab]] = 0
        dropped = np.concatenate(([False], rng.random(n) < 0.1))
        lab[dropped[lab]] = 0
        yy, xx = np.ogrid[:h, :w]
        for k in range(5):
            cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(4, 10)
            lab[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (lab == 0)] = n + 1 + k
        out[s.image_id] = Instances.from_label_image(lab, scores=rng.random(n + 5))
    return out


# ---------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------

def section_a(csv_path: Path, rows: list) -> None:
    from bench.data import rle
    from bench.data.io import read_sartorius

    print("\n== A. reading the 56-image annotation csv into samples ==")
    best, ds = best_of(3, lambda: read_sartorius(csv_path, require_images=False))
    n = sum(len(s.instances) for s in ds)
    tb_s, base = best_of(2, lambda: baseline_read(csv_path))
    # same result: every mask's compressed string equal to pycocotools'
    same = all(rle.to_coco_rle(c, s.height, s.width)["counts"] == b["counts"].decode()
               for s in ds for c, b in zip(s.instances.counts, base[s.image_id]))
    print(f"masks: {n} in {len(ds)} images; results identical to the baseline: {same}")
    print(f"cellbench read_sartorius            {best:8.3f} s  {n / best:10.0f} masks/s  (best of 3)")
    print(f"per-mask numpy decode + pycocotools {tb_s:8.3f} s  {n / tb_s:10.0f} masks/s  (best of 2)")
    ratio = tb_s / best
    print(f"speed-up {ratio:.1f}x")
    rows.append(("A read csv: masks/s", f"{n / best:,.0f}", "", None))
    rows.append(("A speed-up vs per-mask decode+encode", f"{ratio:.1f}x", ">= 5x", ratio >= 5 and same))


def section_b(csv_path: Path, rows: list, workdir: Path) -> tuple[Path, object]:
    from bench.data.io import read_sartorius
    from bench.data.predictions import read_submission, write_submission
    from bench.metrics.evaluator import evaluate_predictions

    print("\n== B. scoring: csv in -> Kaggle mAP out (56 images) ==")
    ds = read_sartorius(csv_path, require_images=False)
    preds = perturbed_predictions(ds)
    sub = workdir / "submission.csv"
    write_submission(sub, preds, ds.classes)
    n_pred = sum(len(p) for p in preds.values())
    print(f"predictions: {n_pred} masks (gt shifted 1 px, 30 % eroded, 10 % dropped, 5 blobs per image)")

    def ours():
        g = read_sartorius(csv_path, require_images=False)
        p = read_submission(sub, {s.image_id: (s.height, s.width) for s in g}, g.classes)
        gtd = {s.image_id: (s.instances, s.cell_type(g.classes)) for s in g}
        return evaluate_predictions(gtd, p, g.classes, with_coco=False, with_cell=False)  # Kaggle only, as the peers

    best, res = best_of(2, ours)
    print(f"cellbench (read gt + read submission + Kaggle mAP)  {best:7.2f} s   mAP {res['kaggle_map']:.6f}")
    tp_s, (m_pc, per_pc) = best_of(2, lambda: baseline_pycocotools_score(csv_path, sub))
    agree = max(abs(per_pc[i] - v) for i, v in res["per_image"].items())
    print(f"numpy decode + pycocotools iou + same TP/FP/FN rule {tp_s:7.2f} s   mAP {m_pc:.6f} "
          f"(max per-image difference {agree:.1e})")
    rows.append(("B scoring 56 images (cellbench)", f"{best:.2f} s", "", None))
    rows.append(("B speed-up vs pycocotools pipeline", f"{tp_s / best:.1f}x", ">= 10x",
                 tp_s / best >= 10 and agree <= 1e-12))
    try:
        from cellpose import metrics as cp_metrics

        cp_metrics.average_precision(np.eye(4, dtype=np.int32), np.eye(4, dtype=np.int32), [0.5])  # numba JIT
    except Exception as e:  # noqa: BLE001 (any import problem: skip the section)
        print(f"cellpose not importable ({type(e).__name__}: {e}): cellpose comparison skipped")
        rows.append(("B speed-up vs cellpose average_precision", "skipped", ">= 3x", None))
    else:
        tc_s, (m_cp, per_cp) = best_of(2, lambda: baseline_cellpose_score(csv_path, sub))
        d = np.array([res["per_image"][i] - per_cp[i] for i in res["per_image"]])
        print(f"label images + cellpose.metrics.average_precision   {tc_s:7.2f} s   mAP {m_cp:.6f}")
        print(f"  (label images painted straight from the runs; numba JIT compiled before timing; not the "
              f"Kaggle metric: per-image difference mean {d.mean():+.4f}, max |d| {np.abs(d).max():.4f})")
        td_s, _ = best_of(1, lambda: baseline_cellpose_score(csv_path, sub, label_image_dense))
        print(f"  same, label images from per-mask dense decodes     {td_s:7.2f} s   ({td_s / best:.1f}x cellbench's time)")
        rows.append(("B speed-up vs cellpose average_precision", f"{tc_s / best:.1f}x", ">= 3x", tc_s / best >= 3))
    return sub, ds


def _repeat_csv(src: Path, dst: Path, n_images: int, id_col: str = "id") -> None:
    """Repeat the images of a csv under new ids (<id>_r<k>) until there are n_images."""
    with open(src, newline="") as f:
        r = csv.reader(f)
        header = next(r)
        body = list(r)
    k_id = header.index(id_col)
    by: "OrderedDict[str, list]" = OrderedDict()
    for row in body:
        by.setdefault(row[k_id], []).append(row)
    ids = list(by)
    with open(dst, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        for j in range(n_images):
            iid = ids[j % len(ids)]
            new = f"{iid}_r{j // len(ids)}"
            for row in by[iid]:
                row = list(row)
                row[k_id] = new
                w.writerow(row)


def start_child() -> tuple[subprocess.Popen, Path, float]:
    """Start section C's scorer now, while this process is small: a child's ru_maxrss starts from
    the RSS of the process that forked it (Linux keeps the pre-exec image's high-water mark), so a
    child forked later, from a parent holding the data and cellpose/torch, would report the
    parent's size. It waits for the csv paths on stdin."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    err = Path(tempfile.mkstemp(prefix="cellbench-bench-child-", suffix=".err")[1])
    with open(err, "wb") as err_f:
        proc = subprocess.Popen([sys.executable, "-m", "bench.benchmarks", "--child-score"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err_f, env=env, cwd=str(REPO))
    return proc, err, _vm("VmRSS")


def _vm(key: str) -> float:
    """VmRSS / VmHWM of this process in MB (Linux), NaN elsewhere."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def finish_child(child, paths: list[Path] | None) -> tuple[int, str, object]:
    proc, err, _ = child
    data = ("\n".join(map(str, paths)) + "\n").encode() if paths else b""
    try:
        proc.stdin.write(data)
        proc.stdin.close()
    except BrokenPipeError:
        pass
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, ru = os.wait4(proc.pid, 0)  # reap it ourselves to get its own rusage
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = err.read_text()
    err.unlink(missing_ok=True)
    return proc.returncode, out.decode() if proc.returncode == 0 else text, ru


def section_c(csv_path: Path, sub: Path, rows: list, workdir: Path, child) -> None:
    print(f"\n== C. full evaluator (Kaggle + COCO AP + bootstrap CIs) on {N_BIG} images, in a subprocess ==")
    big_gt, big_sub = workdir / "gt600.csv", workdir / "sub600.csv"
    _repeat_csv(csv_path, big_gt, N_BIG)
    _repeat_csv(sub, big_sub, N_BIG)
    code, out, ru = finish_child(child, [big_gt, big_sub])
    if code != 0:
        print(f"child failed ({code}):\n{out[-2000:]}")
        rows.append((f"C peak RSS, {N_BIG} images", "failed", "< 1024 MB", False))
        return
    r = json.loads(out.strip().splitlines()[-1])
    rss_mb = ru.ru_maxrss / 1024  # KiB on Linux
    print(f"images {r['n_images']}, gt masks {r['n_gt']}, predicted masks {r['n_pred']}")
    print(f"read csvs {r['read_s']:.2f} s, evaluate {r['eval_s']:.2f} s (Kaggle per image "
          f"{r['process_s']:.2f} s, COCO + bootstrap {r['eval_s'] - r['process_s']:.2f} s), "
          f"total {r['total_s']:.2f} s")
    print(f"Kaggle mAP {r['kaggle_map']:.6f}, COCO AP {r['AP']:.6f} (maxDets {r['max_dets']}, "
          f"{r['n_resamples']} bootstrap resamples)")
    print(f"peak RSS {rss_mb:.0f} MB (child's ru_maxrss from wait4; its own VmHWM {r['vmhwm_mb']:.0f} MB; "
          f"it was forked from a {child[2]:.0f} MB parent)")
    rows.append((f"C peak RSS, {N_BIG} images, full evaluator", f"{rss_mb:.0f} MB", "< 1024 MB", rss_mb < 1024))
    rows.append((f"C time, {N_BIG} images, full evaluator", f"{r['total_s']:.1f} s", "", None))


def child_score() -> None:
    """The subprocess of section C: csv paths from stdin, read both, full evaluator, print JSON."""
    import resource

    paths = sys.stdin.read().split()
    if len(paths) != 2:
        return  # the parent gave up before section C
    gt_csv, sub_csv = paths
    from bench.data.io import read_sartorius
    from bench.data.predictions import read_submission
    from bench.metrics.evaluator import InstanceSegEvaluator

    t0 = time.perf_counter()
    g = read_sartorius(gt_csv, require_images=False)
    p = read_submission(sub_csv, {s.image_id: (s.height, s.width) for s in g}, g.classes)
    t1 = time.perf_counter()
    ev = InstanceSegEvaluator(g.classes)
    for s in g:
        ev.process(s.image_id, s.instances, p[s.image_id], s.cell_type(g.classes))
    t2 = time.perf_counter()
    res = ev.evaluate()
    t3 = time.perf_counter()
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"n_images": res["n_images"], "n_gt": sum(len(s.instances) for s in g),
                      "n_pred": sum(len(v) for v in p.values()), "read_s": t1 - t0, "process_s": t2 - t1,
                      "eval_s": t3 - t1, "total_s": t3 - t0, "kaggle_map": res["kaggle_map"],
                      "AP": res["coco"]["AP"], "max_dets": res["coco"]["max_dets"],
                      "n_resamples": ev.n_resamples, "maxrss_mb": rss_kb / 1024, "vmhwm_mb": _vm("VmHWM")}))


def _timed_process(cmd: list[str]) -> tuple[float, float, str]:
    """(wall s, CPU s of the child, stdout) of one whole process."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    out = proc.stdout.read().decode()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{out[-1500:]}")
    return wall, ru.ru_utime + ru.ru_stime, out


def section_e(csv_path: Path, sub: Path, rows: list, workdir: Path, reps: int = 3) -> None:
    """``bench eval`` (Kaggle + COCO AP + F1/PQ/AJI/mean IoU + taxonomy + 2000-resample CIs) as a
    whole process vs a whole process that paints label images and calls
    ``cellpose.metrics.average_precision`` (the Kaggle-style number only), alternately."""
    print("\n== E. bench eval vs label images + cellpose.metrics.average_precision, whole processes (56 images) ==")
    try:
        import cellpose.metrics  # noqa: F401
    except Exception as e:  # noqa: BLE001
        print(f"cellpose not importable ({type(e).__name__}: {e}): section E skipped")
        rows.append(("E bench eval vs cellpose process", "skipped", ">= 5x", None))
        return
    ours_cmd = [sys.executable, "-m", "bench", "eval", "--gt", str(csv_path), "--pred", str(sub), "--json",
                str(workdir / "eval.json")]
    peer_cmd = [sys.executable, "-m", "bench.benchmarks", "--child-cellpose", str(csv_path), str(sub)]
    ours, peer = [], []
    for _ in range(reps):   # alternately, so that a load change hits both
        ours.append(_timed_process(ours_cmd)[:2])
        peer.append(_timed_process(peer_cmd)[:2])
    (ow, oc), (pw, pc) = min(ours), min(peer)
    res = json.loads((workdir / "eval.json").read_text())
    print(f"bench eval process           wall {ow:6.2f} s  CPU {oc:6.2f} s  (best of {reps}; Kaggle mAP "
          f"{res['kaggle_map']:.4f}, COCO AP {res['coco']['AP']:.4f}, F1 {res['cell']['f1_50']:.4f}, "
          f"PQ {res['cell']['pq']:.4f}, AJI {res['cell']['aji']:.4f}, {res['bootstrap']['n_resamples']} resamples)")
    print(f"label images + cellpose      wall {pw:6.2f} s  CPU {pc:6.2f} s  (best of {reps}; imports cellpose, "
          "compiles its numba overlap, Kaggle-style mAP only)")
    print(f"ratio: wall {pw / ow:.1f}x, CPU {pc / oc:.1f}x; every repetition (wall, CPU): ours "
          f"{[(round(a, 2), round(b, 2)) for a, b in ours]}, cellpose {[(round(a, 2), round(b, 2)) for a, b in peer]}")
    rows.append(("E bench eval process (all metrics + CIs)", f"{ow:.2f} s", "", None))
    rows.append(("E speed-up vs label images + cellpose process", f"{pw / ow:.1f}x", ">= 5x", pw / ow >= 5))


def child_cellpose(gt_csv: str, sub_csv: str) -> None:
    """Section E's peer, as a whole process: label images from the csv runs + cellpose's AP."""
    m, _ = baseline_cellpose_score(Path(gt_csv), Path(sub_csv))
    print(f"{m:.6f}")


def data_sections(rows: list) -> None:
    """A-C: need the real annotations and pycocotools."""
    shared = shared_data()
    csv_path = shared / REL if shared else None
    if csv_path is None or not csv_path.is_file():
        print(f"real annotations not found ({REL} under ../shared/data): sections A-C skipped")
        return
    try:
        import pycocotools  # noqa: F401
    except ImportError:
        print("pycocotools not importable: sections A-C skipped")
        return
    child = start_child()
    try:
        with tempfile.TemporaryDirectory(prefix="cellbench-bench-") as tmp:
            work = Path(tmp)
            section_a(csv_path, rows)
            sub, _ = section_b(csv_path, rows, work)
            section_c(csv_path, sub, rows, work, child)
            section_e(csv_path, sub, rows, work)
    finally:
        if child[0].returncode is None:
            finish_child(child, None)


def section_d(rows: list, extra_args: list[str]) -> None:
    import shlex

    from bench import overhead

    print("\n== D. harness overhead: cellbench vs each framework's own training loop and predictor ==")
    overhead.run(shlex.split(" ".join(extra_args)), out_rows=rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child-score"]:
        child_score()
        return 0
    if argv[:1] == ["--child-cellpose"]:
        child_cellpose(*argv[1:3])
        return 0
    if argv[:1] == ["--only-e"]:   # section E alone (python -m bench.benchmarks --only-e)
        rows: list = []
        shared = shared_data()
        with tempfile.TemporaryDirectory(prefix="cellbench-bench-") as tmp:
            from bench.data.io import read_sartorius
            from bench.data.predictions import write_submission

            ds = read_sartorius(shared / REL, require_images=False)
            sub = Path(tmp) / "submission.csv"
            write_submission(sub, perturbed_predictions(ds), ds.classes)
            section_e(shared / REL, sub, rows, Path(tmp))
        return 0
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.benchmarks", description="make bench: cellbench's speed, measured")
    p.add_argument("--no-overhead", action="store_true", help="leave out section D (harness overhead)")
    p.add_argument("--no-report", action="store_true", help="leave out section F (the HTML report at scale)")
    p.add_argument("--overhead-args", default="", help='options for python -m bench.overhead, e.g. "--device cuda"')
    p.add_argument("--no-executors", action="store_true", help="leave out section G (--jobs 1 vs 2, SLURM overhead)")
    a = p.parse_args(argv)
    t_all = time.perf_counter()
    print(f"cellbench benchmarks; {load_note()} (other processes may be loading the CPU)")
    rows: list[tuple[str, str, str, bool | None]] = []
    data_sections(rows)
    if not a.no_report:
        from bench.report.scale import section_f

        section_f(rows, REPO / "results" / "cache")
    if not a.no_overhead:
        section_d(rows, [a.overhead_args] if a.overhead_args else [])
    if not a.no_executors:
        from bench.executor import bench_executors

        bench_executors.run(rows)
    if not rows:
        return 0
    print(f"\n== summary ({time.perf_counter() - t_all:.0f} s in all; {load_note()}) ==")
    w = max(len(r[0]) for r in rows)
    print(f"{'figure':<{w}}  {'value':>12}  {'target':>10}  result")
    for name, val, target, ok in rows:
        print(f"{name:<{w}}  {val:>12}  {target:>10}  {'-' if ok is None else 'PASS' if ok else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
