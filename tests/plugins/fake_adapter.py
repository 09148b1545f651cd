"""A fake adapter for testing the runner itself (crash isolation, resume): no framework.

It "predicts" the ground truth (so its score is known: 1.0) and can crash on demand.
Counters in files let tests see how often each stage really ran.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Literal

import numpy as np

from bench.adapters.base import Adapter, AdapterConfig, Capabilities
from bench.adapters.registry import register


class FakeConfig(AdapterConfig):
    mode: Literal["ok", "crash_fit", "crash_predict", "crash_predict_once", "kill", "kill_fit_once",
                  "drop_half", "disk_full_save_once"] = "ok"
    counter_dir: str = ""
    iterations: int = 3
    fit_sleep: float = 0.0      # seconds to sleep in fit (timeouts, interrupts)
    spawn_child: bool = False   # start a long-lived grandchild in fit, its pid in counter_dir/child.pid
    predict_batch_size: int = 1  # the worker hands predict() this many images at a time


def _bump(cfg: FakeConfig, what: str) -> int:
    if not cfg.counter_dir:
        return 0
    p = Path(cfg.counter_dir) / f"{what}.count"
    n = int(p.read_text()) + 1 if p.is_file() else 1
    p.write_text(str(n))
    return n


@register("fake")
class FakeAdapter(Adapter):
    framework = "numpy"
    framework_modules = ("numpy",)
    capabilities = Capabilities(predicts_classes=True, overlapping_masks=True, devices=("cpu",))
    Config = FakeConfig
    warm_start_name = "fake.json"

    def fit(self, train, val, cfg, ctx):
        self.cfg = cfg
        n_fit = _bump(cfg, "fit")
        if cfg.mode == "crash_fit":
            raise RuntimeError("fake crash in fit")
        if cfg.mode == "kill_fit_once" and n_fit == 1:  # as the OOM killer would, mid-fit
            ctx.log(iteration=0, loss=1.0)
            os.kill(os.getpid(), signal.SIGKILL)
        if cfg.spawn_child:
            import subprocess
            import sys

            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            (Path(cfg.counter_dir) / "child.pid").write_text(str(child.pid))
        if cfg.fit_sleep:
            import time

            if cfg.counter_dir:
                (Path(cfg.counter_dir) / "fit.started").write_text(str(os.getpid()))
            time.sleep(cfg.fit_sleep)
        if cfg.weights:  # a pretrain stage's checkpoint: record what was started from
            ctx.log(started_from=cfg.weights, n_train=len(train))
        for i in range(cfg.iterations):
            ctx.log(iteration=i + 1, loss=1.0 / (i + 1))
            ctx.report(i + 1, cfg.iterations)
            if ctx.validation_due(i + 1, cfg.iterations):
                ctx.validate(i + 1, self.predict)

    def predict(self, samples):
        c = self.cfg
        if c.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if c.mode == "crash_predict" or (c.mode == "crash_predict_once" and _bump(c, "predict_attempt") == 1):
            raise RuntimeError("fake crash in predict")
        if c.counter_dir:
            with open(Path(c.counter_dir) / "predict_calls.txt", "a") as f:
                f.write(f"{len(samples)}\n")
        out = []
        for s in samples:
            inst = s.instances
            keep = np.arange(len(inst)) % 2 == 0 if c.mode == "drop_half" else np.ones(len(inst), bool)
            p = inst.subset(keep)
            p.scores = np.linspace(1, 0.5, len(p))
            out.append(p)
        return out

    def save(self, directory):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "fake.json").write_text(self.cfg.model_dump_json())
        if self.cfg.mode == "disk_full_save_once" and _bump(self.cfg, "save") == 1:
            import errno

            (directory / "weights.part").write_bytes(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")

    def load(self, directory):
        self.cfg = self.Config(**json.loads((directory / "fake.json").read_text()))


# capabilities the runner plans with (bench.runner.devices): one fake per declaration

@register("fake-gpu")
class FakeGpuOnly(FakeAdapter):
    """Runs on CUDA only: refused before training on a CPU run."""

    capabilities = Capabilities(predicts_classes=True, overlapping_masks=True, devices=("cuda",))


@register("fake-frozen")
class FakeFrozen(FakeAdapter):
    """Not trainable: its fit must never be called."""

    capabilities = Capabilities(predicts_classes=True, overlapping_masks=True, devices=("cpu",), trainable=False)

    def fit(self, train, val, cfg, ctx):
        raise AssertionError("fit called on an adapter that declares trainable=False")


@register("fake-weights")
class FakeNeedsWeights(FakeAdapter):
    """Cannot run without a weights file."""

    capabilities = Capabilities(predicts_classes=True, overlapping_masks=True, devices=("cpu", "cuda"),
                                needs_weights=True)


@register("fake-flat")
class FakeFlat(FakeAdapter):
    """Declares non-overlapping masks (a label image), but returns the ground truth, which overlaps."""

    capabilities = Capabilities(predicts_classes=True, overlapping_masks=False, devices=("cpu",))
