"""torchvision Mask R-CNN, trained from scratch by default (``maskrcnn-tv``).

From scratch means no ImageNet backbone: frozen BatchNorm (torchvision's default for
fine-tuning) would then be an untrained identity, so the backbone uses GroupNorm, the
standard choice for training detectors from scratch (He et al., 2019). A local
weights file (a torchvision/cellbench state dict) can be given; tensors whose shapes
do not fit (e.g. COCO's 91-class heads) are skipped and counted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Sequence

import numpy as np
from pydantic import Field

from bench.adapters.base import AdapterConfig, Capabilities, FitContext, check_weights_file
from bench.adapters.registry import register
from bench.adapters.trainable import (TrainableAdapter, amp_enabled, build_optimizer, load_matching_state, optimizer_step,
                                     rng_state, set_rng_state, step_lr)
from bench.data.masks import instances_from_masks, masks_to_boxes
from bench.data.normalize import to_rgb
from bench.data.sample import Instances, Sample


class TorchvisionMaskRCNNConfig(AdapterConfig):
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"
    norm: Literal["gn", "bn", "frozen_bn"] = "gn"
    fpn_channels: int = 256          # torchvision's fixed 256; smaller makes CPU smoke runs ~10x cheaper
    mask_head_layers: list[int] = [256, 256, 256, 256]
    box_head_dim: int = 1024
    # one per FPN level; auto: from the training instances' sizes after the resize (bench/anchors.py)
    anchor_sizes: list[int] | Literal["auto"] = [16, 32, 64, 128, 256]
    aspect_ratios: list[float] = [0.5, 1.0, 2.0]
    rpn_pre_nms_top_n_train: int = 4000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 3000
    rpn_post_nms_top_n_test: int = 1500
    rpn_nms_thresh: float = 0.7
    box_batch_size_per_image: int = 512
    detections_per_image: int = 1000
    predict_batch_size: int = Field(1, ge=1)
    # Kaggle mAP counts every returned mask, so detectors return confident ones (Detectron2's demo
    # value); COCO AP is computed on the same set. `bench tune` fits per-class thresholds on top.
    box_score_thresh: float = 0.5
    box_nms_thresh: float = 0.5
    mask_threshold: float = 0.5
    min_size: int = 520            # images are resized so the short side is this (torchvision's default 800)
    min_size_train: list[int] | None = None  # multi-scale training: one short side drawn per image (None: min_size)
    max_size: int = 1333
    # images larger than this train on random crops of it, before the min_size resize (bench/tiling.py)
    # auto: the crop whose resize brings the median training cell to target_cell_px (bench/anchors.py)
    train_crop: Annotated[int, Field(ge=0)] | Literal["auto"] = 0
    target_cell_px: float = Field(20.0, gt=0)    # train_crop/predict_tile=auto: the cell size the anchors suit
    train_crop_min_area: int = Field(10, ge=1)   # with train_crop: smaller clipped instances are dropped
    iterations: int = 3000
    batch_size: int = 2
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.02
    momentum: float = 0.9            # SGD only
    weight_decay: float = 1e-4
    warmup_iters: int = 200
    lr_steps: list[int] = [2000, 2600]
    lr_gamma: float = 0.1
    # none: as is; default: horizontal flip + the min_size_train resize (the study's default);
    # extra: + vertical flip, brightness and contrast x0.8-1.2, resize range widened x0.8-1.2
    augment: Literal["none", "default", "extra"] = "default"
    amp: bool = False                # mixed precision; CUDA only (ignored, and logged, on CPU)
    log_every: int = 10
    checkpoint_every: int = Field(0, ge=0)   # mid-training checkpoint every N iterations (0: off)
    grad_clip: float | None = 10.0
    # data-loader processes that build the training batches (mask decoding, augmentation);
    # 0: in the training process. Pinned memory on CUDA.
    num_workers: int = 0


def build_network(c: TorchvisionMaskRCNNConfig, n_classes: int, mean: float, std: float,
                  anchor_sizes: Sequence[int] | None = None):
    """torchvision's MaskRCNN from the config (torchvision's public API only, untrained): the adapter
    trains it, and `make bench`'s native torchvision loop trains the very same network.
    ``anchor_sizes``: the sizes ``anchor_sizes=auto`` derived (required then)."""
    import torchvision
    from torch import nn
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import misc as misc_nn_ops
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    norm = {"gn": lambda ch: nn.GroupNorm(min(32, ch // 4), ch), "bn": nn.BatchNorm2d,
            "frozen_bn": misc_nn_ops.FrozenBatchNorm2d}[c.norm]
    resnet = getattr(torchvision.models, c.backbone)(weights=None, norm_layer=norm)
    widths = [64, 128, 256, 512] if c.backbone in ("resnet18", "resnet34") else [256, 512, 1024, 2048]
    backbone = BackboneWithFPN(resnet, {f"layer{k}": str(k - 1) for k in range(1, 5)}, widths, c.fpn_channels,
                               extra_blocks=LastLevelMaxPool())
    box_head = TwoMLPHead(c.fpn_channels * 7 * 7, c.box_head_dim)
    mask_head = MaskRCNNHeads(c.fpn_channels, c.mask_head_layers, 1)
    sizes = list(anchor_sizes) if anchor_sizes is not None else c.anchor_sizes
    if sizes == "auto":
        raise ValueError("anchor_sizes=auto: derive them from the training set first (bench.anchors)")
    anchors = AnchorGenerator(sizes=tuple((int(s),) for s in sizes),
                              aspect_ratios=(tuple(c.aspect_ratios),) * len(sizes))
    return MaskRCNN(
        backbone, num_classes=None, rpn_anchor_generator=anchors,
        min_size=c.min_size, max_size=c.max_size, image_mean=[mean] * 3, image_std=[std] * 3,
        rpn_pre_nms_top_n_train=c.rpn_pre_nms_top_n_train, rpn_post_nms_top_n_train=c.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=c.rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test=c.rpn_post_nms_top_n_test,
        rpn_nms_thresh=c.rpn_nms_thresh, box_batch_size_per_image=c.box_batch_size_per_image,
        box_detections_per_img=c.detections_per_image, box_score_thresh=c.box_score_thresh,
        box_nms_thresh=c.box_nms_thresh, box_head=box_head, mask_head=mask_head,
        box_predictor=FastRCNNPredictor(c.box_head_dim, n_classes + 1),
        mask_predictor=MaskRCNNPredictor(c.mask_head_layers[-1], c.mask_head_layers[-1], n_classes + 1),
    )


@register("maskrcnn-tv")
class TorchvisionMaskRCNN(TrainableAdapter):
    framework = "torchvision"
    framework_modules = ("torch", "torchvision", "torchvision.ops")
    install_hint = 'pip install "torch===2.13.0" "torchvision==0.28.0"'
    capabilities = Capabilities(predicts_classes=True, overlapping_masks=True, tta=("flip",),
                                tta_note="it resizes every image to its own fixed size (min_size), which undoes a "
                                         "scale pass before the network sees it")
    Config = TorchvisionMaskRCNNConfig
    warm_start_name = "model.pt"
    resize_short_key = "min_size"
    framework_keys = {"iterations": "training loop length", "lr": "SGD/Adam lr", "batch_size": "images per step",
                      "weight_decay": "weight_decay", "optimizer": "torch.optim.SGD / Adam", "lr_steps": "step decay",
                      "lr_gamma": "step decay factor", "warmup_iters": "linear warm-up", "amp": "torch.autocast",
                      "augment": "flips, brightness/contrast, MaskRCNN.transform.min_size",
                      "eval_every": "validation hook", "log_every": "log interval", "grad_clip": "clip_grad_norm_",
                      "num_workers": "torch DataLoader num_workers",
                      "predict_batch_size": "images per model([...]) call",
                      "checkpoint_every": "torch.save of model, optimizer, GradScaler and RNG states",
                      "train_crop": "cellbench's crop (bench/tiling.random_crop) before MaskRCNN.transform",
                      "train_crop_min_area": "bench/tiling.crop_instances min_area"}
    resumes_mid_training = True

    def __init__(self, cfg, classes, device="cpu"):
        super().__init__(cfg, classes, device)
        self.model = None
        self.pixel_mean: float | None = None
        self.pixel_std: float | None = None
        self.anchors: dict | None = None   # anchor_sizes=auto: what was derived (meta.json)

    # ---- model -----------------------------------------------------------------
    def _build(self):
        import torch

        c: TorchvisionMaskRCNNConfig = self.cfg  # type: ignore[assignment]
        model = build_network(c, len(self.classes), self.pixel_mean or 0.5, self.pixel_std or 0.25,
                              self.anchors["anchor_sizes"] if self.anchors else None)
        if c.weights:
            path = check_weights_file(c.weights)
            self.weights_match = load_matching_state(
                model, torch.load(path, map_location="cpu", weights_only=True), path, "maskrcnn-tv")
        return model.to(self.device)

    def _tensor(self, image: np.ndarray):
        """A raw image -> the 3 x H x W float tensor the network sees (the shared input policy)."""
        import torch

        img = to_rgb(self.model_input(image)).transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(img))

    # ---- training ----------------------------------------------------------------
    def train(self, train: Sequence[Sample], val: Sequence[Sample], ctx: FitContext) -> None:
        import torch

        c: TorchvisionMaskRCNNConfig = self.cfg  # type: ignore[assignment]
        samples = [s for s in train if len(s.instances)]
        if not samples:
            raise ValueError("no training image has any instance")
        images = [self._tensor(s.image) for s in samples]
        vals = torch.cat([im[0].flatten() for im in images])
        self.pixel_mean, self.pixel_std = float(vals.mean()), float(vals.std().clamp(min=1e-3))
        self.anchors = self._auto_anchors(samples) if c.anchor_sizes == "auto" else None
        self.model = self._build()
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = build_optimizer(c, params)
        use_amp = amp_enabled(c, self.device, ctx)
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        train_sizes = self._train_sizes(c)
        self.model.transform.min_size = train_sizes
        start = ctx.resumed_from
        # the loader's iterator draws its base seed from torch's RNG: made before a resumed fit
        # restores the RNG states, so every later draw is the uninterrupted fit's
        batches = iter(self._loader(images, [s.instances for s in samples], ctx.seed, start))
        if start:
            self._restore_resume(self.resume.point.folder, opt, scaler)  # type: ignore[union-attr]
        for it, batch in enumerate(batches, start):
            for g in opt.param_groups:
                g["lr"] = step_lr(c, it)
            imgs = [img.to(self.device, non_blocking=True) for img, _ in batch]
            targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for _, t in batch]
            with torch.autocast("cuda", enabled=use_amp):
                losses = self.model(imgs, targets)
                loss = sum(losses.values())
            optimizer_step(loss, opt, scaler, params, c.grad_clip)
            if it % c.log_every == 0 or it == c.iterations - 1:
                ctx.log_step(it + 1, loss=loss.item(), parts={k: v.item() for k, v in losses.items()}, lr=step_lr(c, it))
            ctx.report(it + 1, c.iterations, loss=loss.item())
            if ctx.validation_due(it + 1, c.iterations):
                ctx.validate(it + 1, self.predict)
                self.model.train()
                self.model.transform.min_size = train_sizes
            self.checkpoint_due(it + 1, c.iterations, ctx, lambda d: self._write_resume(d, opt, scaler))
        self.model.transform.min_size = (c.min_size,)
        self.model.eval()

    def _write_resume(self, folder: Path, opt, scaler) -> None:
        """A mid-training checkpoint: what the next iteration needs (the LR is a function of the
        iteration, :func:`step_lr`, so there is no scheduler state)."""
        import torch

        torch.save({"model": self.model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                    "rng": rng_state()}, folder / "resume.pt")

    def _restore_resume(self, folder: Path, opt, scaler) -> None:
        import torch

        # on the CPU (RNG states must be); load_state_dict moves weights and optimizer state to the model's device
        state = torch.load(folder / "resume.pt", map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if state["scaler"]:  # empty when written without AMP (a disabled GradScaler has no state)
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])

    @staticmethod
    def _auto_anchors_of(c: "TorchvisionMaskRCNNConfig", instances: Sequence[Instances]) -> dict:
        """``anchor_sizes=auto``: from the instances as the network sees them at ``min_size``."""
        from bench.anchors import auto_anchor_sizes, summary, training_sizes

        sizes = training_sizes(instances, c.min_size, c.max_size, c.train_crop)
        return summary(sizes, auto_anchor_sizes(sizes, len(TorchvisionMaskRCNNConfig().anchor_sizes)))

    def _auto_anchors(self, samples: Sequence[Sample]) -> dict:
        return self._auto_anchors_of(self.cfg, [s.instances for s in samples])  # type: ignore[arg-type]

    def _loader(self, images: list, instances: list[Instances], seed: int, start: int = 0):
        """Batches of (image, target): drawn with replacement, one augmentation seed per item, both
        fixed up front, so the batches are the same whatever ``num_workers`` is; a fit resumed at
        iteration ``start`` gets the batches from ``start`` on."""
        import torch

        c: TorchvisionMaskRCNNConfig = self.cfg  # type: ignore[assignment]
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, len(images), c.iterations * c.batch_size)
        seeds = rng.integers(0, 2 ** 31 - 1, c.iterations * c.batch_size)
        skip = start * c.batch_size
        data = _TrainItems(images, instances, picks[skip:], seeds[skip:], c)
        return torch.utils.data.DataLoader(
            data, batch_size=c.batch_size, shuffle=False, num_workers=c.num_workers, collate_fn=list,
            pin_memory=str(self.device).startswith("cuda"), persistent_workers=False)

    @staticmethod
    def _train_sizes(c: "TorchvisionMaskRCNNConfig") -> tuple[int, ...]:
        """Short sides drawn from during training (torchvision's transform picks one per batch)."""
        sizes = list(c.min_size_train or [c.min_size]) if c.augment != "none" else [c.min_size]
        if c.augment == "extra":
            lo, hi = int(round(min(sizes) * 0.8)), int(round(max(sizes) * 1.2))
            sizes = sorted(set(sizes) | set(np.linspace(lo, hi, 5).round().astype(int).tolist()))
        return tuple(int(x) for x in sizes)

    @staticmethod
    def _target(img, inst: Instances, rng, c: TorchvisionMaskRCNNConfig):
        import torch

        if c.train_crop:  # before the flips, as Detectron2's and MMDetection's crops
            from bench.tiling import random_crop

            img, inst = random_crop(img, inst, c.train_crop, rng, c.train_crop_min_area, channels_first=True)
        masks = (np.stack([inst.dense(i) for i in range(len(inst))]) if len(inst)
                 else np.zeros((0, inst.height, inst.width), dtype=bool))
        if c.augment != "none" and rng.random() < 0.5:
            img, masks = img.flip(-1), masks[:, :, ::-1]
        if c.augment == "extra":
            if rng.random() < 0.5:
                img, masks = img.flip(-2), masks[:, ::-1, :]
            contrast, brightness = rng.uniform(0.8, 1.2, size=2)
            m = img.mean()
            img = ((img - m) * float(contrast) + m * float(brightness)).clamp(0, 1)
        masks = np.ascontiguousarray(masks)
        boxes = masks_to_boxes(masks)
        labels = np.clip(inst.classes, 0, None) + 1
        return img, {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels),
                     "masks": torch.from_numpy(masks.astype(np.uint8))}

    # ---- inference -----------------------------------------------------------------
    def score_threshold(self) -> float | None:
        return float(self.cfg.box_score_thresh)  # type: ignore[attr-defined]

    def predict(self, samples: Sequence[Sample]) -> list[Instances]:
        import torch

        if self.model is None:
            raise RuntimeError("maskrcnn-tv: fit() or load() first")
        c: TorchvisionMaskRCNNConfig = self.cfg  # type: ignore[assignment]
        self.model.eval()
        self.model.transform.min_size = (c.min_size,)
        self.model.roi_heads.score_thresh = self.predict_threshold()  # the raw floor while capturing
        out = []
        with torch.inference_mode():
            for start in range(0, len(samples), c.predict_batch_size):
                chunk = samples[start:start + c.predict_batch_size]
                results = self.model([self._tensor(s.image).to(self.device) for s in chunk])
                out += [self._to_instances(r, s.height, s.width, c.mask_threshold) for s, r in zip(chunk, results)]
        return out

    @staticmethod
    def _to_instances(r, h: int, w: int, thr: float) -> Instances:
        masks = (r["masks"][:, 0] > thr).cpu().numpy()
        return instances_from_masks(masks, r["boxes"].cpu().numpy(), r["scores"].cpu().numpy(),
                                    r["labels"].cpu().numpy() - 1, h, w)

    # ---- persistence ----------------------------------------------------------------
    def save_weights(self, directory: Path) -> None:
        import torch

        torch.save(self.model.state_dict(), directory / "model.pt")

    def checkpoint_extra(self) -> dict:
        return {"pixel_mean": self.pixel_mean, "pixel_std": self.pixel_std, "anchors": self.anchors}

    def restore_extra(self, extra: dict) -> None:
        self.pixel_mean, self.pixel_std = extra["pixel_mean"], extra["pixel_std"]
        self.anchors = extra.get("anchors")

    def load_weights(self, directory: Path) -> None:
        import torch

        self.model = self._build()
        self.model.load_state_dict(torch.load(directory / "model.pt", map_location=self.device, weights_only=True))
        self.model.eval()


class _TrainItems:
    """Training items for torch's DataLoader: item k is image ``picks[k]`` augmented with seed
    ``seeds[k]`` (masks decoded here, in the loader's workers when there are any)."""

    def __init__(self, images, instances, picks, seeds, cfg):
        self.images, self.instances, self.picks, self.seeds, self.cfg = images, instances, picks, seeds, cfg

    def __len__(self) -> int:
        return len(self.picks)

    def __getitem__(self, k: int):
        i = int(self.picks[k])
        rng = np.random.default_rng(int(self.seeds[k]))
        return TorchvisionMaskRCNN._target(self.images[i], self.instances[i], rng, self.cfg)
