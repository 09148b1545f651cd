"""Cascade Mask R-CNN through MMDetection 3.x (mmdet 3.3.0 / mmengine 0.10.7 / mmcv 2.1.0).

The model starts from MMDetection's own ``cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py``
(read from the installed package, never from the network) and changes only what cells
need: ``len(classes)`` classes in the three box heads and the mask head, cell-sized
anchors, proposal and detection limits for ~780 cells per image, a from-scratch
backbone (no ``torchvision://resnet50`` download), and the pixel mean/std of the
training images (after the shared input policy). Training runs through mmengine's
``Runner``; seeds, cuDNN flags, the checkpoint's ``meta.json`` and the log schema are
:class:`~bench.adapters.trainable.TrainableAdapter`'s.

Input: every image goes through the shared input policy (``self.model_input``, float
[0, 1]), then ``to_rgb`` and ``to_uint8``: the H x W x 3 uint8 array that is written as a
training PNG and fed as an array at prediction. Output: ``instances_from_masks``.

Data hand-over: the training samples are written as a COCO json (compressed RLE
masks) plus 3-channel PNGs under ``ctx.workdir/data``, read by mmdet's stock
``CocoDataset``/``LoadAnnotations``. Chosen over an in-memory dataset because it needs
no new class in mmdet's global registries (nothing to leak into other adapters or to
collide between two fits), it survives forked dataloader workers without pickling the
samples, and the dumped config in the work dir can be re-run with mmdet's own tools on
exactly the data the model saw. The cost (a few seconds of PNG/json writing) is
negligible next to training. Prediction feeds arrays directly (``LoadImageFromNDArray``);
the PNG round trip is lossless (cv2 writes and reads the same channel order), so the
model sees identical pixels in training and prediction.

Global state: mmengine keeps process-wide singletons (DefaultScope, MMLogger,
MessageHub, Visualizer), re-seeds the global RNGs and sets OpenCV's thread count. Every
train/predict runs inside :func:`_mm_isolation`, which restores all of that afterwards
(the RNGs as the base's seeding left them), and every Runner gets a unique experiment
name, so two fits in one process (or an mmengine-using neighbour) never see each other's
scope, logger or visualizer.

Compatibility notes (mmdet 3.3.0 with torch 2.13 / numpy 2.0), each handled here:

* torch >= 2.6 defaults ``torch.load(weights_only=True)``; mmengine 0.10.7's
  ``load_from_local`` calls ``torch.load`` without the argument, so MMDetection/mmengine
  checkpoints (whose ``meta``/``message_hub`` hold numpy and mmengine objects) fail to
  load. The user-named ``weights`` file is loaded by :func:`_load_weights` with an
  explicit ``weights_only=False`` (only that file); cellbench's own saved model is a
  plain state dict and is loaded with ``weights_only=True``.
* mmengine's Runner moves the model to ``get_device()`` (CUDA whenever it exists),
  ignoring the device cellbench asked for; :func:`_mm_isolation` pins it.
* mmdet 3.3.0's ``FCNMaskHead.predict_by_feat`` calls ``tensor.new_tensor(tensor)``, which
  torch 2.x answers with a UserWarning per image; silenced in :meth:`predict` only.
* mmdet builds detectors from attribute-style configs (``train_cfg.rpn``): the model dict
  is wrapped in mmengine's ``ConfigDict`` before ``MODELS.build``.
* mmdet 3.3.0's ``CascadeRoIHead`` never initialises its mask heads (they sit in a torch
  ``nn.ModuleList``): :func:`_init_cascade_mask_heads` applies ``FCNMaskHead``'s own init.
* numpy 2.0: no incompatibility showed up on the code paths used here (CocoDataset,
  LoadAnnotations with RLE masks, the transforms below, training and inference).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import random
import shutil
import sys
import uuid
import warnings
from pathlib import Path
from typing import Annotated, Callable, Literal, Sequence

import numpy as np
from pydantic import Field, field_validator, model_validator

from bench.adapters.base import AdapterConfig, Capabilities, FitContext, check_weights_file
from bench.adapters.registry import register
from bench.adapters.trainable import TrainableAdapter, amp_enabled, load_matching_state, rng_state, set_rng_state
from bench.anchors import FPN_STRIDES  # the strides the anchor floor and auto scale assume
from bench.data import rle
from bench.data.masks import instances_from_masks
from bench.data.normalize import to_rgb, to_uint8
from bench.data.sample import Instances, Sample

BASE_CONFIG = "cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py"
_WEIGHTS_FILE = "model.pth"


class CascadeConfig(AdapterConfig):
    # --- architecture -------------------------------------------------------
    depth: Literal[18, 34, 50, 101] = 50          # ResNet depth of the backbone
    base_channels: int = Field(64, ge=8)          # ResNet width (64 = standard; 32 = a quarter of the FLOPs)
    norm: Literal["BN", "GN"] = "GN"              # GN: backbone, FPN and mask head (mmdet's from-scratch
    #                                               recipe); BN: backbone only (mmdet's ImageNet-pretrained configs)
    norm_eval: bool = False                       # freeze BN statistics (only with pretrained weights)
    frozen_stages: int = Field(-1, ge=-1, le=4)   # -1: train every stage (from scratch)
    fpn_channels: int = Field(256, ge=32)
    bbox_fc_channels: int = Field(1024, ge=16)    # the two shared FCs of each cascade box head
    mask_convs: int = Field(4, ge=1)              # 3x3 convs of the FCN mask head
    # --- anchors / proposals / detections -----------------------------------
    # x FPN stride (4..64): 8..128 px; auto: from the training instances' sizes (bench/anchors.py)
    anchor_scales: list[float] | Literal["auto"] = Field(default_factory=lambda: [2.0])
    anchor_ratios: list[float] = Field(default_factory=lambda: [0.33, 1.0, 3.0])
    rpn_sample_num: int = Field(256, ge=16)       # anchors sampled per image for the RPN loss
    rcnn_sample_num: int = Field(512, ge=16)      # RoIs sampled per image per cascade stage
    rpn_train_nms_pre: int = Field(2000, ge=1)    # per FPN level, training
    rpn_train_max_per_img: int = Field(2000, ge=1)
    rpn_nms_pre: int = Field(3000, ge=1)          # per FPN level, inference
    rpn_max_per_img: int = Field(3000, ge=1)      # proposals kept after RPN NMS, inference
    max_per_img: int = Field(1000, ge=1)          # detections per image (mmdet's 100 would cap AP)
    score_thr: float = Field(0.05, ge=0.0, lt=1.0)
    nms_iou: float = Field(0.5, gt=0.0, le=1.0)
    mask_thr_binary: float = Field(0.5, gt=0.0, lt=1.0)
    # --- input ----------------------------------------------------------------
    # resize factor, training and inference; auto: target_cell_px / the median training cell (bench/anchors.py)
    image_scale: Annotated[float, Field(gt=0.0, le=8.0)] | Literal["auto"] = 1.0
    target_cell_px: float = Field(20.0, gt=0)
    train_scales: list[float] = Field(default_factory=lambda: [1.0])  # x image_scale, one drawn per image
    augment: Literal["none", "default"] = "default"     # default: horizontal / vertical / diagonal flips
    # images larger than this train on random crops of it, before the resize (bench/tiling.py; 0: off)
    train_crop: int = Field(0, ge=0)
    train_crop_min_area: int = Field(10, ge=1)   # with train_crop: smaller clipped instances are dropped
    # --- schedule -------------------------------------------------------------
    iterations: int = Field(30000, ge=1)
    batch_size: int = Field(2, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.02, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    warmup_iters: int = Field(500, ge=0)
    warmup_ratio: float = Field(0.001, gt=0.0, le=1.0)
    lr_steps: list[int] = Field(default_factory=list)  # iterations where lr *= lr_gamma
    lr_gamma: float = Field(0.1, gt=0.0, le=1.0)
    grad_clip: float | None = Field(None, gt=0.0)      # max gradient norm
    amp: bool = False                                  # mixed precision (CUDA only)
    num_workers: int = Field(2, ge=0)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(0, ge=0)   # mid-training checkpoint (resumable) every N iterations; 0: off
    predict_batch_size: int = Field(1, ge=1)

    @field_validator("anchor_scales", "anchor_ratios", "train_scales")
    @classmethod
    def _positive_list(cls, v: list[float]) -> list[float]:
        if v == "auto":
            return v
        if not v or any(x <= 0 for x in v):
            raise ValueError("must be a non-empty list of positive numbers")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "CascadeConfig":
        if any(s <= 0 or s >= self.iterations for s in self.lr_steps):
            raise ValueError(f"lr_steps {self.lr_steps} must lie inside (0, iterations={self.iterations})")
        if list(self.lr_steps) != sorted(self.lr_steps):
            raise ValueError(f"lr_steps {self.lr_steps} must be increasing")
        if self.norm == "GN" and self.fpn_channels % 32:
            raise ValueError(f"fpn_channels={self.fpn_channels} must be a multiple of 32 with norm=GN")
        if self.norm_eval and self.norm != "BN":
            raise ValueError("norm_eval only applies to norm=BN")
        return self


@register("cascade")
class CascadeMaskRCNNAdapter(TrainableAdapter):
    framework = "mmdet"
    framework_modules = ("mmdet", "mmcv.ops", "mmengine")
    install_hint = "make setup (builds mmcv 2.1.0 from source)"
    capabilities = Capabilities(predicts_classes=True, overlapping_masks=True)
    Config = CascadeConfig
    warm_start_name = _WEIGHTS_FILE
    framework_keys = {
        "iterations": "train_cfg.max_iters (IterBasedTrainLoop)", "lr": "optim_wrapper.optimizer.lr",
        "batch_size": "train_dataloader.batch_size", "weight_decay": "optim_wrapper.optimizer.weight_decay",
        "optimizer": "optim_wrapper.optimizer.type (SGD / AdamW)",
        "lr_steps": "param_scheduler MultiStepLR.milestones", "lr_gamma": "param_scheduler MultiStepLR.gamma",
        "warmup_iters": "param_scheduler LinearLR.end", "amp": "optim_wrapper.type AmpOptimWrapper",
        "augment": "train pipeline RandomFlip", "eval_every": "cellbench hook (validation curve)",
        "log_every": "default_hooks.logger.interval", "grad_clip": "optim_wrapper.clip_grad.max_norm",
        "num_workers": "train_dataloader.num_workers",
        "predict_batch_size": "images per model.test_step(pseudo_collate([...]))",
        "checkpoint_every": "Runner.save_checkpoint every N iterations; Runner(resume=True, load_from=...)",
        "train_crop": "train pipeline RandomCrop (absolute) + FilterAnnotations(min_gt_mask_area)",
        "train_crop_min_area": "FilterAnnotations.min_gt_mask_area"}
    resumes_mid_training = True

    def __init__(self, cfg: AdapterConfig, classes: Sequence[str], device: str = "cpu"):
        super().__init__(cfg, classes, device)
        self.model = None
        # per-channel mean/std of the training images after the input policy (the data preprocessor's)
        self.pixel_mean: list[float] | None = None
        self.pixel_std: list[float] | None = None
        self.anchors: dict | None = None   # anchor_scales=auto: what was derived (meta.json)

    def _image(self, image: np.ndarray) -> np.ndarray:
        """A raw image -> the H x W x 3 uint8 array mmdet reads (training PNG) or is fed (prediction)."""
        return np.ascontiguousarray(to_uint8(to_rgb(self.model_input(image))))

    # ---------------------------------------------------------------- train
    def train(self, train: Sequence[Sample], val: Sequence[Sample], ctx: FitContext) -> None:
        import torch

        c: CascadeConfig = self.cfg  # type: ignore[assignment]
        weights = check_weights_file(c.weights)
        if not train:
            raise ValueError("cascade: no training samples")
        _check_device(self.device)
        workdir = Path(ctx.workdir)
        data_dir = workdir / "data"
        if data_dir.is_dir():  # ours, from an earlier attempt in the same folder
            shutil.rmtree(data_dir)
        n_ann, self.pixel_mean, self.pixel_std = _write_coco(train, self.classes, data_dir, self._image)
        self.anchors = auto_anchor_scales(c, [s.instances for s in train]) if c.anchor_scales == "auto" else None
        if n_ann == 0:
            raise ValueError("cascade: the training samples have no instances to learn from")
        use_cuda = self.device.startswith("cuda")

        with _mm_isolation(self.device):
            from mmengine.runner import Runner

            model = self._build_model()  # the base seeded the global RNGs just before train()
            model_cfg = self._model_cfg()
            total = c.iterations
            runner_cfg = dict(
                work_dir=str(workdir / "mmdet"),
                train_dataloader=dict(
                    batch_size=c.batch_size,
                    num_workers=c.num_workers,
                    persistent_workers=c.num_workers > 0,
                    sampler=dict(type="InfiniteSampler", shuffle=True),  # iteration-based schedule
                    batch_sampler=dict(type="AspectRatioBatchSampler"),
                    dataset=dict(
                        type="CocoDataset",
                        data_root=str(data_dir),
                        ann_file="train.json",
                        data_prefix=dict(img="images/"),
                        metainfo=dict(classes=tuple(self._class_names())),
                        filter_cfg=dict(filter_empty_gt=True, min_size=0),
                        pipeline=self._train_pipeline(),
                        backend_args=None,
                    ),
                ),
                train_cfg=dict(type="IterBasedTrainLoop", max_iters=total),
                optim_wrapper=self._optim_wrapper(amp_enabled(c, self.device, ctx)),
                param_scheduler=self._schedulers(),
                default_hooks=dict(
                    timer=dict(type="IterTimerHook"),
                    logger=dict(type="LoggerHook", interval=c.log_every),
                    param_scheduler=dict(type="ParamSchedulerHook"),
                    checkpoint=None,     # cellbench saves the weights itself (save())
                    sampler_seed=dict(type="DistSamplerSeedHook"),
                ),  # no validation loop or visualisation hook: cellbench evaluates
                # cudnn_benchmark=False: mmengine would otherwise override the base's cuDNN flags
                env_cfg=dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method=_mp_start_method(),
                                                               opencv_num_threads=0)),
                log_processor=dict(by_epoch=False),
                # the Runner re-seeds (its sampler draws from the seeded RNGs): the run's seed, undone on exit
                randomness=dict(seed=ctx.seed, deterministic=False),
                default_scope="mmdet",
                log_level="INFO",
            )
            dump = copy.deepcopy(runner_cfg)
            dump["model"] = model_cfg
            dump["load_from_cellbench_weights"] = str(weights) if weights else None
            console = sys.stdout
            # the Runner logs its environment, the whole config and the hook table at INFO while it is
            # built: into its log file (work_dir/<timestamp>/) only, not onto the console
            point = self.resume.point if ctx.resumed_from else None
            with contextlib.redirect_stdout(io.StringIO()):
                runner = Runner(
                    model=model,
                    experiment_name=f"cellbench-cascade-{uuid.uuid4().hex[:8]}",
                    custom_hooks=[_cellbench_hook(ctx, total, c.log_every, weights, self),
                                  _resume_hook(self, ctx, total)],
                    cfg=dump,
                    # a resumed fit: mmengine's resume (weights, optimizer, schedulers, iteration, message
                    # hub; its loop then draws the first `iter` batches again, untrained)
                    resume=point is not None,
                    load_from=str(point.folder / _RESUME_FILE) if point is not None else None,
                    **runner_cfg,
                )
            if point is not None:
                runner.resume = _trusted_load(runner.resume)
            _quiet_console(runner.logger, console)
            ctx.report(0, total, phase="train")
            runner.train()
            trained = runner.model
            del runner
        self.model = trained.eval()
        if use_cuda:
            torch.cuda.empty_cache()

    # -------------------------------------------------------------- predict
    def score_threshold(self) -> float | None:
        return float(self.cfg.score_thr)  # type: ignore[attr-defined]

    def predict(self, samples: Sequence[Sample]) -> list[Instances]:
        import torch

        if self.model is None:
            raise RuntimeError("cascade: predict() before fit() or load()")
        c: CascadeConfig = self.cfg  # type: ignore[assignment]
        _check_device(self.device)
        out: list[Instances] = []
        with _mm_isolation(self.device), warnings.catch_warnings():
            # mmdet 3.3.0's FCNMaskHead calls tensor.new_tensor(tensor); torch >= 2.x warns on every image
            warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)
            from mmcv.transforms import Compose
            from mmengine.dataset import pseudo_collate

            pipeline = Compose(self._test_pipeline())
            model = self.model.to(self.device).eval()
            model.roi_head.test_cfg.score_thr = self.predict_threshold()  # the raw floor while capturing
            for start in range(0, len(samples), c.predict_batch_size):
                chunk = samples[start:start + c.predict_batch_size]
                data = [pipeline(dict(img=self._image(s.image), img_id=i))
                        for i, s in enumerate(chunk)]
                with torch.no_grad():
                    results = model.test_step(pseudo_collate(data))
                for s, r in zip(chunk, results):
                    out.append(_to_instances(r.pred_instances, s.height, s.width))
        return out

    # ----------------------------------------------------------- save / load
    def save_weights(self, directory: Path) -> None:
        import torch
        from mmengine.config import Config

        if self.model is None:
            raise RuntimeError("cascade: save() before fit() or load()")
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        torch.save(state, directory / _WEIGHTS_FILE)
        # the full MMDetection model config, for reading or re-use with mmdet's own tools
        Config(dict(model=self._model_cfg())).dump(str(directory / "mmdet_model_config.py"))

    def checkpoint_extra(self) -> dict:
        import mmdet

        return {"pixel_mean": self.pixel_mean, "pixel_std": self.pixel_std, "mmdet_version": mmdet.__version__,
                "anchors": self.anchors}

    def restore_extra(self, extra: dict) -> None:
        self.pixel_mean, self.pixel_std = extra["pixel_mean"], extra["pixel_std"]
        self.anchors = extra.get("anchors")

    def load_weights(self, directory: Path) -> None:
        import torch

        with _mm_isolation(self.device):
            model = self._build_model()
            # our own file: a plain state dict of tensors, so the safe loader is enough
            sd = torch.load(directory / _WEIGHTS_FILE, map_location="cpu", weights_only=True)
            model.load_state_dict(sd, strict=True)
        self.model = model.to(self.device).eval()

    # ------------------------------------------------------------- configs
    def _class_names(self) -> list[str]:
        return self.classes or ["cell"]

    def _model_cfg(self) -> dict:
        """MMDetection's Cascade Mask R-CNN R50-FPN config, adapted to cells."""
        from mmengine.config import Config

        c: CascadeConfig = self.cfg  # type: ignore[assignment]
        base = Config.fromfile(str(_mmdet_config_path(BASE_CONFIG)))
        m = base.model.to_dict()
        k = len(self._class_names())
        norm_cfg = dict(type="GN", num_groups=32, requires_grad=True) if c.norm == "GN" else \
            dict(type="BN", requires_grad=True)
        mean = self.pixel_mean or [128.0] * 3
        std = self.pixel_std or [32.0] * 3
        m["data_preprocessor"].update(mean=list(mean), std=list(std), bgr_to_rgb=False)

        bb = m["backbone"]
        bb.update(depth=c.depth, base_channels=c.base_channels, frozen_stages=c.frozen_stages,
                  norm_cfg=copy.deepcopy(norm_cfg), norm_eval=c.norm_eval, zero_init_residual=False)
        bb["init_cfg"] = None  # the base config would download torchvision://resnet50
        expansion = 1 if c.depth in (18, 34) else 4  # BasicBlock / Bottleneck
        widths = [c.base_channels * expansion * 2 ** i for i in range(4)]
        m["neck"].update(in_channels=widths, out_channels=c.fpn_channels)
        if c.norm == "GN":
            m["neck"]["norm_cfg"] = copy.deepcopy(norm_cfg)

        rpn = m["rpn_head"]
        rpn.update(in_channels=c.fpn_channels, feat_channels=c.fpn_channels)
        scales = self.anchors["anchor_scales"] if self.anchors else c.anchor_scales
        if scales == "auto":
            raise ValueError("cascade: anchor_scales=auto needs the training set (fit) or a checkpoint (load)")
        rpn["anchor_generator"].update(scales=list(scales), ratios=list(c.anchor_ratios),
                                       strides=list(FPN_STRIDES))
        roi = m["roi_head"]
        roi["bbox_roi_extractor"]["out_channels"] = c.fpn_channels
        roi["mask_roi_extractor"]["out_channels"] = c.fpn_channels
        for head in roi["bbox_head"]:
            head.update(in_channels=c.fpn_channels, fc_out_channels=c.bbox_fc_channels, num_classes=k)
        roi["mask_head"].update(in_channels=c.fpn_channels, conv_out_channels=c.fpn_channels,
                                num_convs=c.mask_convs, num_classes=k)
        if c.norm == "GN":
            roi["mask_head"]["norm_cfg"] = copy.deepcopy(norm_cfg)

        tr = m["train_cfg"]
        tr["rpn"]["allowed_border"] = -1  # keep anchors at the border: cells are clipped there
        tr["rpn"]["sampler"]["num"] = c.rpn_sample_num
        tr["rpn_proposal"].update(nms_pre=c.rpn_train_nms_pre, max_per_img=c.rpn_train_max_per_img)
        for stage in tr["rcnn"]:
            stage["sampler"]["num"] = c.rcnn_sample_num
        te = m["test_cfg"]
        te["rpn"].update(nms_pre=c.rpn_nms_pre, max_per_img=c.rpn_max_per_img)
        te["rcnn"].update(score_thr=c.score_thr, nms=dict(type="nms", iou_threshold=c.nms_iou),
                          max_per_img=c.max_per_img, mask_thr_binary=c.mask_thr_binary)
        return m

    def _build_model(self):
        """The network, not initialised: the Runner initialises it (logging into its own file),
        ``load`` overwrites every tensor."""
        from mmdet.registry import MODELS
        from mmengine.config import ConfigDict

        return MODELS.build(ConfigDict(self._model_cfg()))  # mmdet reads train_cfg.rpn etc. as attributes

    def _train_pipeline(self) -> list[dict]:
        c: CascadeConfig = self.cfg  # type: ignore[assignment]
        scales = sorted({round(c.image_scale * s, 6) for s in c.train_scales})
        if len(scales) == 1:
            resize = dict(type="Resize", scale_factor=scales[0], keep_ratio=True)
        else:  # one scale per image, detectron2/LIVECell-style discrete multi-scale training
            resize = dict(type="RandomChoice",
                          transforms=[[dict(type="Resize", scale_factor=s, keep_ratio=True)] for s in scales])
        pipe = [
            dict(type="LoadImageFromFile", backend_args=None),  # 3-channel PNG, read back unchanged
            dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
            *train_crop_steps(c),
            resize,
        ]
        if c.augment != "none":
            pipe.append(dict(type="RandomFlip", prob=[0.25, 0.25, 0.25],
                             direction=["horizontal", "vertical", "diagonal"]))
        pipe += [
            dict(type="FilterAnnotations", min_gt_bbox_wh=(1e-2, 1e-2), keep_empty=False),
            dict(type="PackDetInputs"),
        ]
        return pipe

    def _test_pipeline(self) -> list[dict]:
        c: CascadeConfig = self.cfg  # type: ignore[assignment]
        return [
            dict(type="LoadImageFromNDArray"),
            dict(type="Resize", scale_factor=c.image_scale, keep_ratio=True),
            dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
        ]

    def _optim_wrapper(self, use_amp: bool) -> dict:
        c: CascadeConfig = self.cfg  # type: ignore[assignment]
        if c.optimizer == "sgd":
            opt = dict(type="SGD", lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        else:
            opt = dict(type="AdamW", lr=c.lr, betas=(c.momentum, 0.999), weight_decay=c.weight_decay)
        wrapper = dict(type="AmpOptimWrapper" if use_amp else "OptimWrapper", optimizer=opt,
                       paramwise_cfg=dict(norm_decay_mult=0.0))  # as mmdet's from-scratch configs
        if c.grad_clip:
            wrapper["clip_grad"] = dict(max_norm=c.grad_clip, norm_type=2)
        return wrapper

    def _schedulers(self) -> list[dict]:
        c: CascadeConfig = self.cfg  # type: ignore[assignment]
        sched = []
        if c.warmup_iters > 0:
            sched.append(dict(type="LinearLR", start_factor=c.warmup_ratio, by_epoch=False, begin=0,
                              end=min(c.warmup_iters, c.iterations)))
        if c.lr_steps:
            sched.append(dict(type="MultiStepLR", by_epoch=False, begin=0, end=c.iterations,
                              milestones=list(c.lr_steps), gamma=c.lr_gamma))
        if not sched:  # mmengine wants a scheduler list or None; constant lr
            return None  # type: ignore[return-value]
        return sched


# ---------------------------------------------------------------------------
# images and annotations
# ---------------------------------------------------------------------------

def train_crop_steps(c: CascadeConfig) -> list[dict]:
    """``train_crop`` as MMDetection pipeline steps, the rule of :mod:`bench.tiling`: a uniform
    ``min(crop, H) x min(crop, W)`` window before the resize, instances clipped (boxes recomputed from
    the clipped masks), those under ``train_crop_min_area`` pixels dropped; a crop without instances
    trains as background (``allow_negative_crop``), as in the other detectors."""
    if not c.train_crop:
        return []
    return [dict(type="RandomCrop", crop_size=(c.train_crop, c.train_crop), crop_type="absolute",
                 allow_negative_crop=True, recompute_bbox=True, bbox_clip_border=True),
            dict(type="FilterAnnotations", min_gt_mask_area=c.train_crop_min_area, by_box=False, by_mask=True,
                 keep_empty=False)]


def auto_anchor_scales(c: CascadeConfig, instances: Sequence[Instances]) -> dict:
    """``anchor_scales=auto``: the octave anchors of :mod:`bench.anchors` for the instances at
    ``image_scale``, as one scale per FPN stride (their geometric mean: the sizes are octaves, as the
    strides are)."""
    from bench.anchors import auto_anchor_sizes, instance_sizes, summary

    sizes = instance_sizes(instances, [c.image_scale] * len(instances))
    anchors = auto_anchor_sizes(sizes, len(FPN_STRIDES), FPN_STRIDES)
    scale = float(np.exp(np.mean(np.log(np.asarray(anchors, float) / np.asarray(FPN_STRIDES, float)))))
    return {**summary(sizes, [scale * st for st in FPN_STRIDES]), "anchor_scales": [round(scale, 4)]}


def _write_coco(train: Sequence[Sample], classes: Sequence[str], data_dir: Path,
                image_fn: Callable[[np.ndarray], np.ndarray]) -> tuple[int, list[float], list[float]]:
    """The network inputs (``image_fn``: H x W x 3 uint8) as lossless PNGs and a COCO instances json.

    Returns the annotation count and the per-channel mean/std of the written images (the
    data preprocessor's normalisation), accumulated image by image.
    """
    import cv2

    img_dir = data_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    names = list(classes) or ["cell"]
    entries, anns = [], []
    s1, s2, npix = np.zeros(3), np.zeros(3), 0
    for idx, s in enumerate(train):
        file_name = f"{idx:06d}.png"
        x = image_fn(s.image)
        if not cv2.imwrite(str(img_dir / file_name), x):  # cv2 write/read keep the channel order
            raise OSError(f"cascade: could not write {img_dir / file_name}")
        px = x.reshape(-1, 3).astype(np.float64)
        s1, s2, npix = s1 + px.sum(0), s2 + (px * px).sum(0), npix + px.shape[0]
        h, w = s.height, s.width
        entries.append(dict(id=idx + 1, file_name=file_name, height=h, width=w, cellbench_id=s.image_id))
        inst = s.instances
        boxes = inst.boxes_xywh()
        areas = inst.areas
        for j in range(len(inst)):
            if areas[j] == 0:
                continue
            cl = int(inst.classes[j])
            if cl < 0:
                if len(names) != 1:
                    raise ValueError(f"cascade: sample {s.image_id} has an instance without a class "
                                     f"but the dataset has {len(names)} classes")
                cl = 0
            anns.append(dict(id=len(anns) + 1, image_id=idx + 1, category_id=cl + 1, iscrowd=0,
                             area=int(areas[j]), bbox=[float(v) for v in boxes[j]],
                             segmentation=rle.to_coco_rle(inst.counts[j], h, w)))
    cats = [dict(id=i + 1, name=n) for i, n in enumerate(names)]
    (data_dir / "train.json").write_text(json.dumps(dict(images=entries, annotations=anns, categories=cats)))
    mean = s1 / npix
    std = np.sqrt(np.maximum(s2 / npix - mean ** 2, 1e-6))
    return len(anns), [float(v) for v in mean], [float(max(v, 1.0)) for v in std]


def _to_instances(pred, height: int, width: int) -> Instances:
    """mmdet InstanceData (bool masks at the original size, boxes) -> Instances; overlaps left as they are."""
    if len(pred) == 0:
        return Instances.empty(height, width)
    masks = pred.masks
    if tuple(masks.shape[1:]) != (height, width):
        raise RuntimeError(f"cascade: masks of shape {tuple(masks.shape[1:])} for a {height}x{width} image")
    masks = masks.cpu().numpy() if hasattr(masks, "cpu") else np.asarray(masks, dtype=bool)
    return instances_from_masks(masks, pred.bboxes.detach().cpu().numpy(), pred.scores.detach().cpu().numpy(),
                                pred.labels.detach().cpu().numpy(), height, width)


# ---------------------------------------------------------------------------
# mmengine plumbing
# ---------------------------------------------------------------------------

def _mmdet_config_path(rel: str) -> Path:
    import mmdet

    root = Path(mmdet.__file__).resolve().parent
    for cand in (root / ".mim" / "configs" / rel, root.parent / "configs" / rel):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"cascade: MMDetection's config {rel} is not in the installed mmdet ({root}/.mim/configs)")


def _check_device(device: str) -> None:
    """mmcv's compiled ops (RoIAlign, NMS) must have CUDA kernels to run on a GPU."""
    if not device.startswith("cuda"):
        return
    from mmcv.ops import get_compiling_cuda_version

    if get_compiling_cuda_version() == "not available":
        raise RuntimeError("cascade: this mmcv 2.1.0 was compiled without CUDA ops, so RoIAlign/NMS cannot run on "
                           "the GPU; rebuild it where nvcc is available (FORCE_CUDA=1 pip install "
                           "--no-build-isolation --no-cache-dir --force-reinstall mmcv==2.1.0) or use device cpu")


def _mp_start_method() -> str:
    import multiprocessing as mp

    return mp.get_start_method(allow_none=True) or "fork"


def _manager_classes() -> list[type]:
    from mmengine.utils import ManagerMixin

    out, todo = [], [ManagerMixin]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


@contextlib.contextmanager
def _mm_isolation(device: str):
    """Run mmdet/mmengine code with the 'mmdet' scope and undo mmengine's global side effects."""
    import cv2
    import torch
    import mmengine.runner.runner as mm_runner
    from mmdet.utils import register_all_modules
    from mmengine.logging import MMLogger
    from mmengine.registry import DefaultScope

    register_all_modules(init_default_scope=False)  # imports mmdet's modules into its registries
    managers = _manager_classes()
    saved = {cls: (cls.__dict__.get("_instance_dict"), dict(cls.__dict__["_instance_dict"]))
             for cls in managers if "_instance_dict" in cls.__dict__}
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
           torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
    cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    cv2_threads = cv2.getNumThreads()
    get_device = mm_runner.get_device
    # mmengine's Runner moves the model to get_device() (CUDA whenever present): pin cellbench's device
    mm_runner.get_device = lambda: "cuda" if device.startswith("cuda") else "cpu"
    DefaultScope.get_instance(f"cellbench-cascade-{uuid.uuid4().hex}", scope_name="mmdet")
    try:
        yield
    finally:
        mm_runner.get_device = get_device
        for cls, (obj, before) in saved.items():
            if cls.__dict__.get("_instance_dict") is not obj:  # replaced (e.g. overwrite_default_scope)
                setattr(cls, "_instance_dict", obj)
            current = cls.__dict__["_instance_dict"]
            for name in [n for n in current if n not in before]:
                inst = current.pop(name)
                if isinstance(inst, MMLogger):
                    for h in list(inst.handlers):
                        h.close()
                        inst.removeHandler(h)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        if rng[3] is not None:
            torch.cuda.set_rng_state_all(rng[3])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
        cv2.setNumThreads(cv2_threads)


def _quiet_console(logger, console) -> None:
    """mmengine's INFO lines go to the run's log file only; warnings still reach the console."""
    import logging

    for h in logger.handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            h.setStream(console)
            h.setLevel(logging.WARNING)


def _cellbench_hook(ctx: FitContext, total: int, interval: int, weights: Path | None, adapter=None):
    """An mmengine Hook object (passed in custom_hooks: no registry entry): loads the user's
    weights after the Runner's random init, feeds ctx.report and ctx.log_step, and records the
    validation curve (``eval_every``) with the adapter's own predict on the current weights."""
    from mmengine.hooks import Hook

    class CellbenchHook(Hook):
        priority = "BELOW_NORMAL"

        def __init__(self):
            self.acc: dict[str, float] = {}
            self.n = 0

        def before_train(self, runner):
            if ctx.resumed_from:  # mmengine's resume has loaded the trained weights
                return
            # Runner.train() initialises the weights after before_run: the checkpoint goes on top
            _init_cascade_mask_heads(runner.model)
            if weights is not None:
                _load_weights(runner.model, weights, runner.logger)

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            it = runner.iter + 1
            for k, v in (outputs or {}).items():
                f = float(v.detach()) if hasattr(v, "detach") else float(v)
                if math.isfinite(f):
                    self.acc[k] = self.acc.get(k, 0.0) + f
            self.n += 1
            loss = (outputs or {}).get("loss", float("nan"))
            loss = float(loss.detach()) if hasattr(loss, "detach") else float(loss)
            ctx.report(it, total, loss=round(loss, 4))
            if it % interval == 0 or it == total:
                parts = {k: round(v / self.n, 5) for k, v in self.acc.items()}  # means since the last record
                lr = runner.optim_wrapper.get_lr()
                lr = float(next(iter(lr.values()))[0]) if lr else None
                ctx.log_step(it, loss=parts.pop("loss", None), parts=parts, lr=lr)
                self.acc, self.n = {}, 0
            if adapter is not None and ctx.validation_due(it, total):
                adapter.model = runner.model
                ctx.validate(it, adapter.predict)
                runner.model.train()

    return CellbenchHook()


_RESUME_FILE = "checkpoint.pth"  # <folder>/checkpoint.pth: Runner.save_checkpoint's file of a mid-training checkpoint


def _resume_hook(adapter, ctx: FitContext, total: int):
    """Every ``checkpoint_every`` iterations, ``Runner.save_checkpoint`` (what mmengine's
    CheckpointHook writes: weights, optimizer, param schedulers, iteration, message hub) with the
    RNG states added; after a resume, torch's and Python's RNG states are put back before the first
    step (numpy's is not: mmengine's resume replays the data pipeline, whose numpy draws bring it to
    where the checkpoint left it)."""
    from mmengine.hooks import Hook

    class ResumeHook(Hook):
        priority = "VERY_LOW"  # after ParamSchedulerHook (LOW): the schedulers' stepped state is saved

        def __init__(self):
            self.rng = None

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            adapter.checkpoint_due(runner.iter + 1, total, ctx, lambda folder: runner.save_checkpoint(
                str(folder), _RESUME_FILE, save_optimizer=True, save_param_scheduler=True, by_epoch=False))

        def before_save_checkpoint(self, runner, checkpoint):
            checkpoint["cellbench_rng"] = rng_state()

        def after_load_checkpoint(self, runner, checkpoint):
            self.rng = checkpoint.get("cellbench_rng")

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            if self.rng is not None:
                set_rng_state(self.rng, numpy=False)
                self.rng = None

    return ResumeHook()


def _trusted_load(resume: Callable) -> Callable:
    """``Runner.resume`` reading a checkpoint this fit wrote itself: mmengine 0.10.7 calls
    ``torch.load`` without ``weights_only``, which torch >= 2.6 takes as True and which refuses
    mmengine's own checkpoints (numpy and mmengine objects in ``meta``/``message_hub``)."""
    def call(*args, **kw):
        key, old = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
        os.environ[key] = "1"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return resume(*args, **kw)
        finally:
            os.environ.pop(key) if old is None else os.environ.__setitem__(key, old)

    return call


def _init_cascade_mask_heads(model) -> None:
    """Give the cascade's mask heads the init ``FCNMaskHead.init_weights`` defines.

    mmdet 3.3.0's ``CascadeRoIHead`` keeps its mask heads in a plain ``torch.nn.ModuleList``
    (its box heads in mmengine's ``ModuleList``), and mmengine's ``init_weights`` does not
    descend into modules without an ``init_weights`` method: the three mask heads would
    keep PyTorch's default init, drawn when the model was built. Heads that are already
    initialised (a fixed mmdet) are left alone.
    """
    heads = getattr(getattr(model, "roi_head", None), "mask_head", None)
    if heads is None or hasattr(heads, "init_weights"):
        return
    for head in heads:
        if hasattr(head, "init_weights") and not getattr(head, "is_init", False):
            head.init_weights()


def _load_weights(model, path: Path, logger=None) -> None:
    """Start from a local checkpoint the user named: a full MMDetection model or a backbone.

    torch >= 2.6 defaults to ``weights_only=True``, which rejects MMDetection/mmengine
    checkpoints (numpy arrays and mmengine objects in ``meta``/``message_hub``) and which
    mmengine 0.10.7's ``load_checkpoint`` does not override; this file was named by the
    user, so it is unpickled in full (``weights_only=False``), and only this file.
    """
    import torch
    from mmengine.logging import MMLogger

    match = load_matching_state(model, torch.load(path, map_location="cpu", weights_only=False), path, "cascade")
    msg, absent, unused = match.message("cascade", path), match.absent, match.unused
    if absent and any(".gn" in k or "gn1" in k for k in absent) and any("bn1" in k for k in unused):
        msg += "; the file has BatchNorm layers: set norm=BN (and norm_eval/frozen_stages as for fine-tuning)"
    logger = logger or MMLogger.get_current_instance()
    (logger.warning if (match.reshaped or absent or unused) else logger.info)(msg)
