"""What one mid-training checkpoint (``checkpoint_every``) costs: its size and the time to write it.

    python scripts/checkpoint_cost.py [--preset cpu] [--models maskrcnn-tv,maskrcnn,cascade]

For each model that resumes mid-training: a 2-iteration fit on 4 tiny synthetic images with
``checkpoint_every=1`` (one checkpoint, after iteration 1), timing :meth:`FitResume.save` and
summing the files it wrote. The size depends on the network (weights + optimizer state), not on
the images; the time on the disk and on how busy the machine is. README figures (Running on a
cluster) come from this script.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def measure(name: str, preset: str, root: Path) -> tuple[float, float]:
    """(megabytes, seconds) of the one checkpoint of a 2-iteration fit of ``name``."""
    from bench.adapters import trainable
    from bench.adapters.base import FitContext
    from bench.adapters.registry import build, make_config
    from bench.data.io import read_sartorius

    ds = read_sartorius(root / "data")
    opts = {"iterations": 2, "checkpoint_every": 1, "warmup_iters": 1, "lr_steps": [], "batch_size": 1}
    if "num_workers" in build(name, ds.classes, preset).Config.model_fields:
        opts["num_workers"] = 0
    cfg = make_config(name, preset, opts)
    resume_dir, seen = root / f"{name}-resume", {}
    save = trainable.FitResume.save

    def timed(self, done, seconds, write):
        t0 = time.perf_counter()
        save(self, done, seconds, write)
        seen["s"] = time.perf_counter() - t0
        seen["mb"] = sum(p.stat().st_size for p in resume_dir.rglob("*") if p.is_file()) / 2 ** 20

    trainable.FitResume.save = timed
    try:
        build(name, ds.classes, preset).fit(ds.samples[:4], ds.samples[4:5], cfg,
                                            FitContext(root / f"{name}-work", "cpu", 0, resume_dir=resume_dir))
    finally:
        trainable.FitResume.save = save
    return seen["mb"], seen["s"]


def main() -> None:
    from bench.adapters import registry
    from bench.data.synth import generate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu")
    p.add_argument("--models", default="maskrcnn-tv,maskrcnn,cascade")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(root / "data", n_images=6, size=(160, 128), seed=0)
        for name in args.models.split(","):
            avail = registry.get(name).available()
            if not avail.ok:
                print(f"{name}: not installed ({avail.hint})")
                continue
            mb, s = measure(name, args.preset, root)
            print(f"{name} ({args.preset}): one checkpoint {mb:.1f} MB, written in {s:.2f} s")


if __name__ == "__main__":
    main()
