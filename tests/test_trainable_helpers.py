"""The training helpers of the trainable base that cellbench's own loops share, each in isolation."""

from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from bench.adapters.trainable import build_optimizer, load_matching_state, optimizer_step, step_lr
from bench.data.masks import masks_to_boxes


class _Cfg:
    lr, lr_gamma, lr_steps, warmup_iters = 1.0, 0.1, [6, 8], 4
    weight_decay, momentum, optimizer = 0.0, 0.0, "sgd"


def test_step_lr_warms_up_linearly_then_steps_down():
    got = [step_lr(_Cfg, it) for it in range(10)]
    np.testing.assert_allclose(got, [0.25, 0.5, 0.75, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])


def _nets():
    src = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Linear(4, 5))    # a 5-class head
    dst = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Linear(4, 3))    # a 3-class head
    return src, dst


def test_load_matching_state_loads_what_fits_and_reports_the_rest(tmp_path):
    src, dst = _nets()
    wrapped = {"model": {"module." + k: v for k, v in src.state_dict().items()}, "iteration": 7}
    m = load_matching_state(dst, wrapped, tmp_path / "w.pth", "toy")
    assert (m.loaded, m.total) == (2, 4) and m.reshaped == ("1.bias", "1.weight") and not m.absent
    assert torch.equal(dst[0].weight, src[0].weight) and not torch.equal(dst[1].bias[:3], src[1].bias[:3])
    assert "2 of 4 model tensors loaded" in m.message("toy", Path("w.pth")) and "another shape" in m.message("toy", Path("w.pth"))


def test_load_matching_state_reads_a_bare_backbone_and_refuses_a_foreign_file(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Conv2d(1, 4, 3)
            self.head = torch.nn.Linear(4, 2)

    backbone = torch.nn.Conv2d(1, 4, 3)
    net = Net()
    m = load_matching_state(net, backbone.state_dict(), tmp_path / "bb.pth", "toy")
    assert m.loaded == 2 and set(m.absent) == {"head.weight", "head.bias"}
    assert torch.equal(net.backbone.weight, backbone.weight)
    with pytest.raises(ValueError, match=r"toy: no parameter in .*other\.pth matches"):
        load_matching_state(net, {"x": torch.zeros(1)}, tmp_path / "other.pth", "toy")
    with pytest.raises(ValueError, match="holds no state dict"):
        load_matching_state(net, [1, 2], tmp_path / "list.pth", "toy")


def test_optimizer_step_clips_gradients_and_stops_on_a_non_finite_loss():
    w = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer(_Cfg, [w])
    assert isinstance(opt, torch.optim.SGD)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    optimizer_step((w * torch.tensor([300.0, 400.0, 0.0])).sum(), opt, scaler, [w], grad_clip=0.5)
    np.testing.assert_allclose(w.detach().numpy(), [-0.3, -0.4, 0.0], rtol=1e-5)  # |step| = lr * 0.5
    before = w.detach().clone()
    with pytest.raises(FloatingPointError, match="nan"):
        optimizer_step(w.sum() * float("nan"), opt, scaler, [w], grad_clip=None)
    assert torch.equal(w.detach(), before)


def test_build_optimizer_follows_the_vocabulary():
    class Adam(_Cfg):
        optimizer = "adamw"

    assert isinstance(build_optimizer(Adam, [torch.nn.Parameter(torch.zeros(1))]), torch.optim.AdamW)


def test_masks_to_boxes_agrees_with_pycocotools():
    rng = np.random.default_rng(0)
    masks = np.zeros((5, 37, 41), bool)
    for m in masks:
        y, x = rng.integers(0, 30, 2)
        m[y:y + rng.integers(1, 7), x:x + rng.integers(1, 11)] = True
        m[rng.integers(0, 37), rng.integers(0, 41)] = True   # a stray pixel widens the box
    ref = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))))
    ref[:, 2:] += ref[:, :2]
    np.testing.assert_array_equal(masks_to_boxes(masks), ref)
    with pytest.raises(ValueError, match="mask 1 is empty"):
        masks_to_boxes(np.stack([masks[0], np.zeros_like(masks[0])]))
