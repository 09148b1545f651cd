"""On a CUDA GPU (`make test-gpu`): each trainable adapter trains two iterations with AMP and
predicts on the GPU, and the compiled ops of mmcv and Detectron2 really run CUDA kernels.

Skipped cleanly where torch sees no GPU (the CI machine, laptops); each model's test also
skips where its framework is not installed. scripts/gpu-check.sh runs these on a lent GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.adapters import registry
from bench.adapters.base import FitContext
from bench.data.io import read_sartorius


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not _cuda(), reason="no CUDA GPU visible to torch")]

TWO_ITERATIONS = {
    "maskrcnn-tv": {"iterations": 2, "batch_size": 2, "min_size": 128, "max_size": 128, "warmup_iters": 1,
                    "lr_steps": [], "amp": True, "num_workers": 2},
    "maskrcnn": {"iterations": 2, "batch_size": 2, "lr_steps": [], "warmup_iters": 1, "amp": True,
                 "num_workers": 2, "min_size_train": [128], "max_size_train": 128, "min_size_test": 128,
                 "max_size_test": 128},
    "cascade": {"iterations": 2, "batch_size": 2, "warmup_iters": 1, "lr_steps": [], "amp": True, "num_workers": 2},
    "cellpose": {"epochs": 2, "batch_size": 4, "nimg_per_epoch": 4, "bsize": 64, "min_train_masks": 1},
}


def _ready(name: str):
    cls = registry.get(name)
    avail = cls.available()
    if not avail.ok:
        pytest.skip(f"{name}: {avail.hint}")
    return cls


@pytest.mark.parametrize("name", sorted(TWO_ITERATIONS))
def test_two_amp_iterations_train_and_predict_on_cuda(name, tiny_synth, tmp_path):
    import torch

    _ready(name)
    ds = read_sartorius(tiny_synth)
    train, val = ds.samples[:8], ds.samples[8:10]
    cfg = registry.make_config(name, "smoke", TWO_ITERATIONS[name])
    adapter = registry.get(name)(cfg, ds.classes, "cuda")
    log = []
    torch.cuda.reset_peak_memory_stats()
    adapter.fit(train, val, cfg, FitContext(tmp_path / "work", "cuda", 0, None, log.append))
    assert torch.cuda.max_memory_allocated() > 0, "nothing was allocated on the GPU while training"
    assert log and all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    preds = adapter.predict(val)
    assert len(preds) == len(val)
    for p, s in zip(preds, val):
        assert (p.height, p.width) == (s.height, s.width) and p.scores is not None
    adapter.save(tmp_path / "ckpt")
    again = registry.get(name)(cfg, ds.classes, "cuda")
    again.load(tmp_path / "ckpt")
    for p, q in zip(preds, again.predict(val)):
        assert len(p) == len(q)


def test_mmcv_ops_run_cuda_kernels():
    import torch

    _ready("cascade")
    from mmcv.ops import RoIAlign, get_compiling_cuda_version

    assert get_compiling_cuda_version() != "not available", "mmcv was built without CUDA ops: rebuild (make setup)"
    x = torch.rand(1, 2, 8, 8, device="cuda")
    out = RoIAlign(2, 1.0, 2)(x, torch.tensor([[0, 0.0, 0.0, 7.0, 7.0]], device="cuda"))
    assert out.is_cuda and out.shape == (1, 2, 2, 2)


def test_detectron2_ops_run_cuda_kernels():
    import torch

    _ready("maskrcnn")
    from detectron2 import _C
    from detectron2.layers import ROIAlign

    assert _C.has_cuda(), "detectron2 was built without CUDA ops"
    x = torch.rand(1, 2, 8, 8, device="cuda")
    out = ROIAlign((2, 2), 1.0, 2, aligned=True)(x, torch.tensor([[0, 0.0, 0.0, 7.0, 7.0]], device="cuda"))
    assert out.is_cuda and out.shape == (1, 2, 2, 2)
