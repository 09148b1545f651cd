"""``make bench`` section G: what the executors cost and gain, measured in one run.

1. A tiny sweep (watershed and a few-iteration torchvision Mask R-CNN, two seeds each: four jobs)
   run with ``--jobs 1`` (the environment's thread count, then one thread) and ``--jobs 2`` (one
   core and one thread per job) on the CPU: wall times and the gain. On a loaded machine most
   of the gain over the first can be the thread count (DEVELOPERS.md: Threads on small machines).
2. The per-job scheduling overhead of ``--executor slurm``: one watershed job as a one-job sweep
   through the local executor (its own process, as on a node) and through SLURM (probe off), the
   difference being what SLURM and submitit add (target: under 5 s on the local cluster).
   Skipped with a message where no SLURM answers (scripts/slurm-up.sh starts one).

Runs in a temporary folder on the built-in-style synthetic data; prints the figures and appends
rows to ``make bench``'s summary.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

TV = {"iterations": 3, "min_size": 128, "max_size": 128, "box_score_thresh": 0.0, "detections_per_image": 30,
      "rpn_post_nms_top_n_test": 60, "rpn_pre_nms_top_n_test": 120, "warmup_iters": 1, "lr_steps": [2]}


def _sweep(folder: Path, variants: dict, seeds: list[int]) -> Path:
    p = folder / f"sweep-{len(variants)}x{len(seeds)}.yaml"
    p.write_text(yaml.safe_dump({"name": "executor-bench", "base": {"model": "maskrcnn-tv", "options": TV},
                                 "seeds": seeds, "reference": next(iter(variants)), "variants": variants}))
    return p


def _timed(cfg: Path, data: Path, out: Path, spec) -> tuple[float, dict]:
    from bench.sweep import run_sweep

    t = time.perf_counter()
    _, states = run_sweep(cfg, data=str(data), out=out, results=out.parent / "results", echo=lambda *_: None,
                          executor=spec, device="cpu")
    return time.perf_counter() - t, states


@contextlib.contextmanager
def _one_thread():
    """``OMP_NUM_THREADS=1`` for the workers started meanwhile (they inherit this process's environment)."""
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old


def slurm_answers() -> bool:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    return any(s.rstrip("*") in ("idle", "mixed") for s in out.stdout.split())


def run(rows: list) -> None:
    from bench.data.synth import generate
    from bench.executor import ExecutorSpec, SlurmOptions

    print("\n== G. executors: --jobs 1 vs --jobs 2 on the CPU; SLURM's per-job overhead ==")
    with tempfile.TemporaryDirectory(prefix="cellbench-exec-bench-") as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        generate(data, n_images=12, size=(128, 128), seed=0)
        cfg = _sweep(tmp, {"tv": {}, "ws": {"model": "watershed"}}, [0, 1])
        threads = os.environ.get("OMP_NUM_THREADS") or f"torch's default ({os.cpu_count()})"
        t1, s1 = _timed(cfg, data, tmp / "jobs1", ExecutorSpec(jobs=1))
        with _one_thread():
            t1b, s1b = _timed(cfg, data, tmp / "jobs1-1thread", ExecutorSpec(jobs=1))
        t2, s2 = _timed(cfg, data, tmp / "jobs2", ExecutorSpec(jobs=2))
        ok = all(s["state"] == "done" for s in (*s1.values(), *s1b.values(), *s2.values()))
        print(f"tiny sweep (4 jobs): --jobs 1 {t1:.1f} s (threads: {threads}), --jobs 1 with OMP_NUM_THREADS=1 "
              f"{t1b:.1f} s, --jobs 2 {t2:.1f} s (one core and thread each): x{t1 / t2:.2f} and x{t1b / t2:.2f}"
              + ("" if ok else "  (some runs failed!)"))
        rows.append(("E. tiny sweep --jobs 1 (s)", f"{t1:.1f}", "-", None))
        rows.append(("E. tiny sweep --jobs 1, 1 thread (s)", f"{t1b:.1f}", "-", None))
        rows.append(("E. tiny sweep --jobs 2 (s)", f"{t2:.1f}", "< jobs 1", ok and t2 < min(t1, t1b)))
        if not slurm_answers():
            print("SLURM overhead: skipped (no SLURM answers here; scripts/slurm-up.sh starts a one-node cluster)")
            return
        one = _sweep(tmp, {"ws": {"model": "watershed"}}, [0])
        tl, _ = _timed(one, data, tmp / "one-local", ExecutorSpec(jobs=2))
        ts, st = _timed(one, data, tmp / "one-slurm", ExecutorSpec(name="slurm", slurm=SlurmOptions(probe=False)))
        over = ts - tl
        print(f"one watershed job: local process {tl:.1f} s, SLURM {ts:.1f} s: {over:.1f} s of scheduling overhead")
        rows.append(("E. SLURM overhead per job (s)", f"{over:.1f}", "< 5", over < 5))
