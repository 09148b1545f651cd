"""Mask R-CNN (ResNet-FPN) in Detectron2, with the study's tuned configuration as a preset.

Detectron2 has no PyPI package: ``make setup-detectron2 D2_SRC=<checkout or git URL>``
builds it from its official source. This module imports detectron2 only inside
functions, so ``bench models`` works (and reports the install hint) without it.

How the pieces fit:

* :class:`D2MaskRCNNConfig` has readable field names; :func:`to_detectron2_opts` maps
  them onto detectron2 config keys (``MODEL.RPN.NMS_THRESH`` ...) without importing
  detectron2, so the mapping of every preset is testable anywhere. The detectron2
  config starts from the model zoo's ``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml``
  and these options are merged on top (``MODEL.WEIGHTS`` is always overwritten: the zoo
  file points at a download URL, cellbench never downloads).
* :func:`to_dataset_dicts` turns cellbench samples into detectron2's standard dataset
  dicts (COCO RLE segmentations, XYWH_ABS boxes); they are registered in
  ``DatasetCatalog`` under a unique name for one ``fit`` and removed afterwards.
* Images are fed as 3-channel BGR uint8 (grayscale replicated, uint16 scaled by the
  image's maximum); ``MODEL.PIXEL_MEAN/STD`` default to the training data's statistics.
* Training is detectron2's ``SimpleTrainer`` (``AMPTrainer`` with ``amp=true`` on CUDA)
  with its LR-scheduler hook and a cellbench hook that logs losses and reports progress;
  no detectron2 evaluator runs (cellbench scores the predictions itself).
* Inference is ``DefaultPredictor``'s recipe (resize the shortest edge to
  ``INPUT.MIN_SIZE_TEST``, eval mode, no grad), one image at a time, deterministic.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import Field, field_validator, model_validator

from bench.adapters.base import Adapter, AdapterConfig, Capabilities, FitContext, check_weights_file
from bench.adapters.registry import register
from bench.data.rle import to_coco_rle
from bench.data.sample import Instances, Sample

log = logging.getLogger(__name__)

ZOO_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
BOX_MODE_XYWH_ABS = 1  # int value of detectron2.structures.BoxMode.XYWH_ABS
WEIGHTS_FILE = "model_final.pth"
META_FILE = "cellbench_detectron2.json"
D2_CONFIG_FILE = "detectron2_config.yaml"

Float3 = float | list[float]


class D2MaskRCNNConfig(AdapterConfig):
    """Readable names for the detectron2 keys that matter here (defaults = detectron2's zoo values).

    ``weights``: a local ``.pkl``/``.pth`` (detectron2 or MSRA/caffe2 ImageNet format) to
    start from; None trains from scratch. Layers whose shapes differ (the class-specific
    heads of a COCO model) are skipped by detectron2's checkpointer.
    """

    # ---- architecture -----------------------------------------------------
    resnet_depth: Literal[18, 34, 50, 101] = 50        # MODEL.RESNETS.DEPTH (R18/34: lighter)
    norm: Literal["FrozenBN", "BN", "GN", "SyncBN"] = "FrozenBN"  # backbone, FPN and mask head
    stride_in_1x1: bool = True           # MSRA (caffe2) ResNet; False for torchvision-style / from scratch
    freeze_at: int = Field(2, ge=0, le=5)  # MODEL.BACKBONE.FREEZE_AT (0: train everything, 1: stem frozen)
    fpn_channels: int = Field(256, ge=8)   # MODEL.FPN.OUT_CHANNELS (RPN and ROI heads follow)
    box_head_fc_dim: int = Field(1024, ge=8)   # MODEL.ROI_BOX_HEAD.FC_DIM (2 FC layers)
    mask_head_convs: int = Field(4, ge=0)      # MODEL.ROI_MASK_HEAD.NUM_CONV
    mask_head_dim: int = Field(256, ge=8)      # MODEL.ROI_MASK_HEAD.CONV_DIM
    # ---- anchors and RPN --------------------------------------------------
    anchor_sizes: list[float] = [32, 64, 128, 256, 512]   # one per FPN level p2..p6 (px)
    aspect_ratios: list[float] = [0.5, 1.0, 2.0]          # height/width, same on every level
    rpn_iou_thresholds: tuple[float, float] = (0.3, 0.7)  # background below, foreground above
    rpn_nms_thresh: float = Field(0.7, gt=0, le=1)
    rpn_batch_size_per_image: int = Field(256, ge=1)
    pre_nms_topk_train: int = Field(2000, ge=1)   # per FPN level
    post_nms_topk_train: int = Field(1000, ge=1)
    pre_nms_topk_test: int = Field(1000, ge=1)
    post_nms_topk_test: int = Field(1000, ge=1)
    # ---- ROI heads --------------------------------------------------------
    roi_batch_size_per_image: int = Field(512, ge=1)
    roi_positive_fraction: float = Field(0.25, gt=0, le=1)
    score_thresh_test: float = Field(0.05, ge=0, le=1)    # MODEL.ROI_HEADS.SCORE_THRESH_TEST
    nms_thresh_test: float = Field(0.5, gt=0, le=1)       # MODEL.ROI_HEADS.NMS_THRESH_TEST
    detections_per_image: int = Field(1000, ge=1)         # TEST.DETECTIONS_PER_IMAGE
    # ---- input ------------------------------------------------------------
    pixel_mean: Float3 | None = None   # BGR; None: mean of the training images
    pixel_std: Float3 | None = None    # None: std of the training images (use 1.0 with MSRA .pkl weights)
    min_size_train: list[int] = [640, 672, 704, 736, 768, 800]   # shortest edge, one chosen per image
    min_size_train_sampling: Literal["choice", "range"] = "choice"
    max_size_train: int = Field(1333, ge=1)
    min_size_test: int = Field(800, ge=0)    # 0: no resizing at test time
    max_size_test: int = Field(1333, ge=1)
    random_flip: Literal["none", "horizontal", "vertical"] = "horizontal"
    # none: resize to min_size_test only; default: detectron2's own (min_size_train resize +
    # random_flip, the study's "flip and resize"); extra: + vertical flip, brightness and
    # contrast x0.8-1.2, and the resize range widened x0.8-1.2 (the study's extra augmentation)
    augment: Literal["none", "default", "extra"] = "default"
    # ---- solver -----------------------------------------------------------
    optimizer: Literal["sgd", "adam"] = "sgd"   # adam: torch Adam on detectron2's parameter groups
    ims_per_batch: int = Field(16, ge=1)
    base_lr: float = Field(0.02, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    gamma: float = Field(0.1, gt=0)
    steps: list[int] = [210000, 250000]     # iterations where the LR is multiplied by gamma
    max_iter: int = Field(270000, ge=1)
    warmup_iters: int = Field(1000, ge=0)
    warmup_factor: float = Field(0.001, gt=0, le=1)
    clip_gradients: float | None = None      # max L2 norm of each parameter's gradient; None: off
    amp: bool = False                        # mixed precision (CUDA only)
    # ---- running ----------------------------------------------------------
    num_workers: int = Field(2, ge=0)        # data-loader processes
    log_period: int = Field(20, ge=1)        # iterations between loss records
    checkpoint_period: int = Field(0, ge=0)  # 0: only the final weights are kept

    @field_validator("anchor_sizes")
    @classmethod
    def _five_levels(cls, v: list[float]) -> list[float]:
        if len(v) != 5 or min(v) <= 0:
            raise ValueError("needs 5 positive sizes, one per FPN level p2..p6")
        return v

    @field_validator("aspect_ratios", "min_size_train")
    @classmethod
    def _positive(cls, v: list) -> list:
        if not v or min(v) <= 0:
            raise ValueError("needs at least one value, all positive")
        return v

    @field_validator("pixel_mean", "pixel_std")
    @classmethod
    def _three(cls, v: Float3 | None) -> Float3 | None:
        if isinstance(v, list) and len(v) not in (1, 3):
            raise ValueError("one value (grey) or three (B, G, R)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "D2MaskRCNNConfig":
        lo, hi = self.rpn_iou_thresholds
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"rpn_iou_thresholds must be 0 <= low <= high <= 1, got {self.rpn_iou_thresholds}")
        if list(self.steps) != sorted(self.steps) or any(s <= 0 for s in self.steps):
            raise ValueError(f"steps must be increasing positive iterations, got {self.steps}")
        if self.min_size_train_sampling == "range" and len(self.min_size_train) != 2:
            raise ValueError("min_size_train_sampling=range needs min_size_train=[low, high]")
        if self.pixel_std is not None and min(_as3(self.pixel_std)) <= 0:
            raise ValueError("pixel_std must be positive")
        return self


def _as3(v: Float3) -> list[float]:
    vals = [float(x) for x in (v if isinstance(v, list) else [v])]
    return vals * 3 if len(vals) == 1 else vals


def to_detectron2_opts(cfg: D2MaskRCNNConfig, *, num_classes: int | None = None, device: str | None = None,
                       pixel_mean: Float3 | None = None, pixel_std: Float3 | None = None,
                       seed: int | None = None) -> dict[str, Any]:
    """The detectron2 config keys this config sets, with values of the types detectron2 expects.

    Pure (no detectron2 import). ``pixel_mean``/``pixel_std`` are the data's statistics,
    used where the config leaves them None. ``MODEL.WEIGHTS`` is always set ("" = from
    scratch) so the zoo file's download URL never survives.
    """
    c = cfg
    opts: dict[str, Any] = {
        "MODEL.WEIGHTS": str(c.weights or ""),
        "MODEL.MASK_ON": True,
        "MODEL.RESNETS.DEPTH": int(c.resnet_depth),
        "MODEL.RESNETS.RES2_OUT_CHANNELS": 64 if c.resnet_depth in (18, 34) else 256,
        "MODEL.RESNETS.NORM": c.norm,
        "MODEL.RESNETS.STRIDE_IN_1X1": bool(c.stride_in_1x1),
        "MODEL.FPN.NORM": "" if c.norm == "FrozenBN" else c.norm,
        "MODEL.ROI_MASK_HEAD.NORM": "" if c.norm == "FrozenBN" else c.norm,
        "MODEL.BACKBONE.FREEZE_AT": int(c.freeze_at),
        "MODEL.FPN.OUT_CHANNELS": int(c.fpn_channels),
        "MODEL.ROI_BOX_HEAD.FC_DIM": int(c.box_head_fc_dim),
        "MODEL.ROI_MASK_HEAD.NUM_CONV": int(c.mask_head_convs),
        "MODEL.ROI_MASK_HEAD.CONV_DIM": int(c.mask_head_dim),
        "MODEL.ANCHOR_GENERATOR.SIZES": [[float(s)] for s in c.anchor_sizes],
        "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[float(r) for r in c.aspect_ratios]],
        "MODEL.RPN.IOU_THRESHOLDS": [float(t) for t in c.rpn_iou_thresholds],
        "MODEL.RPN.NMS_THRESH": float(c.rpn_nms_thresh),
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE": int(c.rpn_batch_size_per_image),
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN": int(c.pre_nms_topk_train),
        "MODEL.RPN.POST_NMS_TOPK_TRAIN": int(c.post_nms_topk_train),
        "MODEL.RPN.PRE_NMS_TOPK_TEST": int(c.pre_nms_topk_test),
        "MODEL.RPN.POST_NMS_TOPK_TEST": int(c.post_nms_topk_test),
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": int(c.roi_batch_size_per_image),
        "MODEL.ROI_HEADS.POSITIVE_FRACTION": float(c.roi_positive_fraction),
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST": float(c.score_thresh_test),
        "MODEL.ROI_HEADS.NMS_THRESH_TEST": float(c.nms_thresh_test),
        "TEST.DETECTIONS_PER_IMAGE": int(c.detections_per_image),
        "INPUT.FORMAT": "BGR",
        "INPUT.MASK_FORMAT": "bitmask",
        "INPUT.MIN_SIZE_TRAIN": tuple(int(s) for s in c.min_size_train),
        "INPUT.MIN_SIZE_TRAIN_SAMPLING": c.min_size_train_sampling,
        "INPUT.MAX_SIZE_TRAIN": int(c.max_size_train),
        "INPUT.MIN_SIZE_TEST": int(c.min_size_test),
        "INPUT.MAX_SIZE_TEST": int(c.max_size_test),
        "INPUT.RANDOM_FLIP": c.random_flip,
        "SOLVER.IMS_PER_BATCH": int(c.ims_per_batch),
        "SOLVER.BASE_LR": float(c.base_lr),
        "SOLVER.MOMENTUM": float(c.momentum),
        "SOLVER.WEIGHT_DECAY": float(c.weight_decay),
        "SOLVER.GAMMA": float(c.gamma),
        "SOLVER.STEPS": tuple(int(s) for s in c.steps),
        "SOLVER.MAX_ITER": int(c.max_iter),
        "SOLVER.WARMUP_ITERS": int(c.warmup_iters),
        "SOLVER.WARMUP_FACTOR": float(c.warmup_factor),
        "SOLVER.CHECKPOINT_PERIOD": int(c.checkpoint_period or c.max_iter),
        "SOLVER.CLIP_GRADIENTS.ENABLED": c.clip_gradients is not None,
        "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": "norm",
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": float(c.clip_gradients or 1.0),
        "SOLVER.AMP.ENABLED": bool(c.amp),
        "DATALOADER.NUM_WORKERS": int(c.num_workers),
        "DATALOADER.FILTER_EMPTY_ANNOTATIONS": True,
        "TEST.EVAL_PERIOD": 0,
    }
    mean = c.pixel_mean if c.pixel_mean is not None else pixel_mean
    std = c.pixel_std if c.pixel_std is not None else pixel_std
    if mean is not None:
        opts["MODEL.PIXEL_MEAN"] = _as3(mean)
    if std is not None:
        opts["MODEL.PIXEL_STD"] = _as3(std)
    if num_classes is not None:
        opts["MODEL.ROI_HEADS.NUM_CLASSES"] = int(num_classes)
    if device is not None:
        opts["MODEL.DEVICE"] = str(device)
    if seed is not None:
        opts["SEED"] = int(seed)
    return opts


# ---------------------------------------------------------------------------
# data (no detectron2 import)
# ---------------------------------------------------------------------------

def to_bgr_uint8(image: np.ndarray) -> np.ndarray:
    """H x W (grey) or H x W x 3 (RGB), uint8 or uint16 -> H x W x 3 BGR uint8.

    uint16 images are scaled linearly so that their maximum becomes 255 (microscopy
    16-bit images rarely use the full range; a fixed /257 would leave them dark).
    """
    img = np.asarray(image)
    if img.dtype != np.uint8:
        f = img.astype(np.float32)
        hi = float(f.max()) if f.size else 0.0
        img = np.clip(np.rint(f * (255.0 / hi)) if hi > 0 else f, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 3:
        img = img[:, :, ::-1]  # cellbench reads colour images as RGB
    else:
        raise ValueError(f"unsupported image shape {img.shape} (want H x W or H x W x 3)")
    return np.ascontiguousarray(img)


def load_bgr(file_name: str) -> np.ndarray:
    """What the data mapper and the statistics read: a file of ``to_dataset_dicts`` as BGR uint8."""
    if file_name.endswith(".npy"):
        return to_bgr_uint8(np.load(file_name))
    from bench.data.io import read_image

    return to_bgr_uint8(read_image(file_name))


def to_dataset_dicts(samples: Sequence[Sample], classes: Sequence[str],
                     image_dir: str | Path | None = None) -> list[dict]:
    """cellbench samples -> detectron2 standard dataset dicts (no detectron2 import).

    Each dict: ``file_name`` (the sample's path; a sample held only in memory is written
    to ``image_dir/<image_id>.npy``), ``height``, ``width``, ``image_id`` and
    ``annotations`` with ``segmentation`` as a COCO RLE dict, ``bbox`` in XYWH pixels,
    ``bbox_mode`` 1 (BoxMode.XYWH_ABS), ``category_id`` (index into ``classes``) and
    ``iscrowd`` 0. Empty masks are skipped.
    """
    out = []
    n_cls = len(classes)
    for s in samples:
        inst = s.instances
        if s.path is not None:
            file_name = str(s.path)
        else:
            if image_dir is None:
                raise ValueError(f"sample {s.image_id} has no image file; give image_dir to write it to")
            p = Path(image_dir) / f"{_safe(s.image_id)}.npy"
            p.parent.mkdir(parents=True, exist_ok=True)
            np.save(p, s.image)
            file_name = str(p)
        boxes = inst.boxes_xywh()
        annos = []
        for i in range(len(inst)):
            if boxes[i, 2] <= 0 or boxes[i, 3] <= 0:
                continue
            cls = int(inst.classes[i])
            if cls < 0 and n_cls == 1:
                cls = 0
            if not 0 <= cls < n_cls:
                raise ValueError(f"image {s.image_id}: instance {i} has class {cls}, "
                                 f"not an index into the {n_cls} classes {list(classes)}")
            annos.append({
                "segmentation": to_coco_rle(inst.counts[i], inst.height, inst.width),
                "bbox": [float(x) for x in boxes[i]],
                "bbox_mode": BOX_MODE_XYWH_ABS,
                "category_id": cls,
                "iscrowd": 0,
            })
        out.append({"file_name": file_name, "height": int(inst.height), "width": int(inst.width),
                    "image_id": str(s.image_id), "annotations": annos})
    return out


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def image_stats(dicts: Sequence[dict]) -> tuple[list[float], list[float]]:
    """Per-channel (B, G, R) mean and std over all pixels of the images, as the model sees them."""
    n, s, ss = 0, np.zeros(3), np.zeros(3)
    for d in dicts:
        img = load_bgr(d["file_name"]).reshape(-1, 3).astype(np.float64)
        n += img.shape[0]
        s += img.sum(0)
        ss += (img ** 2).sum(0)
    if n == 0:
        raise ValueError("no training images to compute pixel statistics from")
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean ** 2, 1e-6))
    return [round(float(x), 4) for x in mean], [round(float(x), 4) for x in np.maximum(std, 1.0)]


class _Mapper:
    """detectron2's DatasetMapper, reading images through cellbench (grey/uint16 -> BGR uint8)."""

    def __init__(self, augmentations, mask_format: str = "bitmask"):
        self.augmentations = augmentations
        self.mask_format = mask_format

    def __call__(self, dataset_dict: dict) -> dict:
        import torch
        from detectron2.data import detection_utils as utils
        from detectron2.data import transforms as T

        d = copy.deepcopy(dataset_dict)
        image = load_bgr(d["file_name"])
        utils.check_image_size(d, image)
        aug_input = T.AugInput(image)
        transforms = T.AugmentationList(self.augmentations)(aug_input)
        image = aug_input.image
        h, w = image.shape[:2]
        d["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        annos = [utils.transform_instance_annotations(a, transforms, (h, w))
                 for a in d.pop("annotations", []) if a.get("iscrowd", 0) == 0]
        instances = utils.annotations_to_instances(annos, (h, w), mask_format=self.mask_format)
        d["instances"] = utils.filter_empty_instances(instances)
        return d


# ---------------------------------------------------------------------------
# the adapter
# ---------------------------------------------------------------------------

@register("maskrcnn")
class Detectron2MaskRCNN(Adapter):
    framework = "detectron2"
    framework_modules = ("detectron2", "detectron2.model_zoo")
    install_hint = "detectron2 has no PyPI package: make setup-detectron2 D2_SRC=<path or git URL of its official source>"
    capabilities = Capabilities(predicts_classes=True, overlapping_masks=True)
    Config = D2MaskRCNNConfig
    warm_start_name = WEIGHTS_FILE

    def __init__(self, cfg: AdapterConfig, classes: Sequence[str], device: str = "cpu"):
        super().__init__(cfg, classes, device)
        self.model = None
        self.d2cfg = None
        self.pixel_stats: tuple[list[float], list[float]] | None = None

    # ---- config -------------------------------------------------------------
    def _d2_config(self, seed: int | None = None):
        from detectron2 import model_zoo
        from detectron2.config import get_cfg

        c: D2MaskRCNNConfig = self.cfg  # type: ignore[assignment]
        mean, std = self.pixel_stats or (None, None)
        d2 = get_cfg()
        d2.merge_from_file(model_zoo.get_config_file(ZOO_CONFIG))
        opts = to_detectron2_opts(c, num_classes=len(self.classes), device=self.device,
                                  pixel_mean=mean, pixel_std=std, seed=seed)
        d2.merge_from_list([x for kv in opts.items() for x in kv])
        d2.DATASETS.TRAIN, d2.DATASETS.TEST = (), ()
        return d2

    def _build_model(self, d2cfg):
        from detectron2.modeling import build_model

        return build_model(d2cfg)

    # ---- training -----------------------------------------------------------
    def fit(self, train: Sequence[Sample], val: Sequence[Sample], cfg: AdapterConfig, ctx: FitContext) -> None:
        c: D2MaskRCNNConfig = cfg  # type: ignore[assignment]
        weights = check_weights_file(c.weights)  # before anything heavy: a clear error naming the path
        if not train:
            raise ValueError("no training samples")

        import torch
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader
        from detectron2.data import get_detection_dataset_dicts
        from detectron2.data.samplers import TrainingSampler
        from detectron2.engine import AMPTrainer, SimpleTrainer, hooks
        from detectron2.solver import build_lr_scheduler, build_optimizer
        from detectron2.utils.env import seed_all_rng

        self.cfg = cfg
        work = Path(ctx.workdir) / "detectron2"
        work.mkdir(parents=True, exist_ok=True)
        seed_all_rng(ctx.seed)

        dicts = to_dataset_dicts(train, self.classes, image_dir=work / "images")
        if not any(d["annotations"] for d in dicts):
            raise ValueError("no training image has an annotated instance")
        self.pixel_stats = image_stats(dicts) if c.pixel_mean is None or c.pixel_std is None else None
        d2cfg = self._d2_config(seed=ctx.seed)
        d2cfg.OUTPUT_DIR = str(work)
        (work / D2_CONFIG_FILE).write_text(d2cfg.dump())
        if weights is None and c.freeze_at > 0:
            log.warning("maskrcnn: training from scratch with freeze_at=%d keeps randomly initialised "
                        "layers frozen; set freeze_at=0 or give weights", c.freeze_at)

        name = f"cellbench_{uuid.uuid4().hex[:12]}_train"
        DatasetCatalog.register(name, lambda: dicts)
        MetadataCatalog.get(name).set(thing_classes=list(self.classes))
        try:
            d2cfg.DATASETS.TRAIN = (name,)
            model = self._build_model(d2cfg)
            if weights is not None:
                DetectionCheckpointer(model).load(str(weights))
            model.train()
            dataset = get_detection_dataset_dicts([name], filter_empty=True)
            loader = build_detection_train_loader(
                dataset=dataset, mapper=_Mapper(train_augmentations(d2cfg, c.augment)),
                sampler=TrainingSampler(len(dataset), shuffle=True, seed=ctx.seed),
                total_batch_size=c.ims_per_batch, aspect_ratio_grouping=True, num_workers=c.num_workers)
            optimizer = build_optimizer(d2cfg, model) if c.optimizer == "sgd" else _adam(d2cfg, model)
            use_amp = c.amp and str(self.device).startswith("cuda")
            trainer = (AMPTrainer if use_amp else SimpleTrainer)(model, loader, optimizer)
            hook_list = [hooks.IterationTimer(), hooks.LRScheduler(optimizer, build_lr_scheduler(d2cfg, optimizer)),
                         _LogHook(ctx, c.log_period, c.max_iter)]
            if ctx.curve_wanted:
                self.d2cfg = d2cfg
                hook_list.append(_ValidationHook(self, ctx, c.max_iter))
            if c.checkpoint_period:
                ckpt = DetectionCheckpointer(model, str(work), optimizer=optimizer)
                hook_list.append(hooks.PeriodicCheckpointer(ckpt, c.checkpoint_period, max_iter=c.max_iter))
            trainer.register_hooks(hook_list)
            trainer.train(0, c.max_iter)
        finally:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        model.eval()
        self.model, self.d2cfg = model, d2cfg
        torch.save(model.state_dict(), work / WEIGHTS_FILE)

    # ---- inference ----------------------------------------------------------
    def predict(self, samples: Sequence[Sample]) -> list[Instances]:
        import torch
        from detectron2.data import transforms as T

        if self.model is None:
            raise RuntimeError("maskrcnn: predict before fit or load")
        d2 = self.d2cfg
        resize = (T.ResizeShortestEdge([d2.INPUT.MIN_SIZE_TEST] * 2, d2.INPUT.MAX_SIZE_TEST)
                  if d2.INPUT.MIN_SIZE_TEST > 0 else None)
        self.model.eval()
        out = []
        cudnn = torch.backends.cudnn
        prev = (cudnn.deterministic, cudnn.benchmark)
        cudnn.deterministic, cudnn.benchmark = True, False
        try:
            with torch.inference_mode():
                for s in samples:
                    img = to_bgr_uint8(s.image)
                    h, w = img.shape[:2]
                    x = resize.get_transform(img).apply_image(img) if resize is not None else img
                    t = torch.as_tensor(np.ascontiguousarray(x.transpose(2, 0, 1)).astype("float32"))
                    res = self.model([{"image": t, "height": h, "width": w}])[0]["instances"].to("cpu")
                    out.append(self._to_instances(res, h, w))
        finally:
            cudnn.deterministic, cudnn.benchmark = prev
        return out

    @staticmethod
    def _to_instances(res, h: int, w: int) -> Instances:
        if len(res) == 0:
            return Instances.empty(h, w)
        masks = res.pred_masks.numpy().astype(bool)
        scores = res.scores.numpy().astype(np.float64)
        classes = res.pred_classes.numpy().astype(np.int64)
        keep = masks.reshape(len(masks), -1).any(1)
        inst = Instances.from_masks(masks[keep], classes[keep], scores[keep])
        assert (inst.height, inst.width) == (h, w)
        return inst

    # ---- persistence ----------------------------------------------------------
    def save(self, directory: Path) -> None:
        import torch

        if self.model is None:
            raise RuntimeError("maskrcnn: nothing to save (fit or load first)")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), directory / WEIGHTS_FILE)
        meta = {"config": self.cfg.model_dump(mode="json"), "classes": self.classes,
                "pixel_stats": self.pixel_stats, "detectron2_zoo_config": ZOO_CONFIG}
        (directory / META_FILE).write_text(json.dumps(meta, indent=1))
        (directory / D2_CONFIG_FILE).write_text(self.d2cfg.dump())

    def load(self, directory: Path) -> None:
        import torch

        directory = Path(directory)
        meta_path, w_path = directory / META_FILE, directory / WEIGHTS_FILE
        for p in (meta_path, w_path):
            if not p.is_file():
                raise FileNotFoundError(f"maskrcnn: {p} is missing (not a saved detectron2 Mask R-CNN?)")
        meta = json.loads(meta_path.read_text())
        if list(meta["classes"]) != self.classes:
            raise ValueError(f"maskrcnn: saved model has classes {meta['classes']}, this adapter {self.classes}")
        self.cfg = self.Config(**meta["config"])
        ps = meta.get("pixel_stats")
        self.pixel_stats = (ps[0], ps[1]) if ps else None
        d2cfg = self._d2_config()
        d2cfg.MODEL.WEIGHTS = ""  # the state dict below is the model
        model = self._build_model(d2cfg)
        state = torch.load(w_path, map_location=self.device, weights_only=True)
        model.load_state_dict(state)
        model.eval()
        self.model, self.d2cfg = model, d2cfg


def train_augmentations(d2cfg, augment: str) -> list:
    """The training augmentations of ``augment`` (none / default / extra), as detectron2 objects."""
    from detectron2.data import detection_utils as d2utils
    from detectron2.data import transforms as T

    i = d2cfg.INPUT
    if augment == "none":
        return [T.ResizeShortestEdge([i.MIN_SIZE_TEST] * 2, i.MAX_SIZE_TEST)] if i.MIN_SIZE_TEST > 0 else []
    if augment == "default":
        return d2utils.build_augmentation(d2cfg, is_train=True)
    sizes = list(i.MIN_SIZE_TRAIN)
    lo, hi = int(round(min(sizes) * 0.8)), int(round(max(sizes) * 1.2))
    return [T.ResizeShortestEdge((lo, hi), i.MAX_SIZE_TRAIN, "range"),
            T.RandomFlip(horizontal=True, vertical=False), T.RandomFlip(horizontal=False, vertical=True),
            T.RandomBrightness(0.8, 1.2), T.RandomContrast(0.8, 1.2)]


def _adam(d2cfg, model):
    """Adam with detectron2's parameter groups (norm/bias weight decay rules) and gradient clipping."""
    import torch
    from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

    s = d2cfg.SOLVER
    params = get_default_optimizer_params(model, base_lr=s.BASE_LR, weight_decay_norm=s.WEIGHT_DECAY_NORM,
                                          bias_lr_factor=s.BIAS_LR_FACTOR, weight_decay_bias=s.WEIGHT_DECAY_BIAS)
    return maybe_add_gradient_clipping(d2cfg, torch.optim.Adam(params, lr=s.BASE_LR, weight_decay=s.WEIGHT_DECAY))


def _ValidationHook(adapter: "Detectron2MaskRCNN", ctx: FitContext, max_iter: int):
    from detectron2.engine import HookBase

    class ValidationHook(HookBase):
        """Kaggle mAP of the validation split every ``eval_every`` iterations (a curve point)."""

        def after_step(self):
            it = self.trainer.iter + 1
            if ctx.validation_due(it, max_iter):
                adapter.model = self.trainer.model
                ctx.validate(it, adapter.predict)
                self.trainer.model.train()

    return ValidationHook()


def _LogHook(ctx: FitContext, period: int, max_iter: int):
    from detectron2.engine import HookBase

    class LogHook(HookBase):
        """Every ``period`` iterations and at the end: losses -> ctx.log, progress -> ctx.report."""

        def before_train(self):
            self.t0 = time.perf_counter()

        def after_step(self):
            it = self.trainer.iter + 1
            storage = self.trainer.storage
            if it % period == 0 or it == max_iter:
                rec: dict[str, Any] = {"step": it}
                hist = storage.histories()
                for k in sorted(hist):
                    if k == "total_loss" or k.startswith("loss_"):
                        # median over the last `period` iterations, as detectron2's printer does
                        rec["loss" if k == "total_loss" else k] = float(hist[k].median(period))
                if "lr" in hist:
                    rec["lr"] = float(hist["lr"].latest())
                rec["time_s"] = round(time.perf_counter() - self.t0, 2)
                ctx.log(**rec)
            loss = storage.histories().get("total_loss")
            ctx.report(it, max_iter, **({"loss": round(float(loss.latest()), 4)} if loss is not None else {}))

    return LogHook()
