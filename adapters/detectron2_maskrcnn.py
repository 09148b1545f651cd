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
* Images go through the shared input policy (``self.model_input``: float [0, 1]), then
  :func:`to_bgr255`: H x W x 3 float32 BGR in 0..255, the range and channel order of
  detectron2's ``MODEL.PIXEL_MEAN/STD`` (which default to the training data's statistics
  of these arrays). The same function feeds training (the data mapper reads each dataset
  dict's file through the policy) and inference.
* Training is detectron2's ``SimpleTrainer`` (``AMPTrainer`` with ``amp=true`` on CUDA)
  inside :class:`~bench.adapters.trainable.TrainableAdapter`'s ``fit`` (seeds, cuDNN
  flags, log clock), with its LR-scheduler hook and a cellbench hook that logs losses in
  the shared schema and reports progress; no detectron2 evaluator runs (cellbench scores
  the predictions itself).
* Inference is ``DefaultPredictor``'s recipe (resize the shortest edge to
  ``INPUT.MIN_SIZE_TEST``, eval mode, no grad), one image at a time; masks become
  instances through ``instances_from_masks`` (box-cropped encoding).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import uuid
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Sequence

import numpy as np
from pydantic import Field, field_validator, model_validator

from bench.adapters.base import AdapterConfig, Capabilities, FitContext, check_weights_file
from bench.adapters.registry import register
from bench.adapters.trainable import TrainableAdapter, amp_enabled, rng_state, set_rng_state
from bench.data.masks import instances_from_masks
from bench.data.normalize import to_rgb
from bench.data.rle import to_coco_rle
from bench.data.sample import Instances, Sample

log = logging.getLogger(__name__)

ZOO_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
BOX_MODE_XYWH_ABS = 1  # int value of detectron2.structures.BoxMode.XYWH_ABS
WEIGHTS_FILE = "model_final.pth"
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
    # one per FPN level p2..p6 (px); auto: from the training instances' sizes after the test resize
    # (bench/anchors.py, recorded in meta.json)
    anchor_sizes: list[float] | Literal["auto"] = [32, 64, 128, 256, 512]
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
    predict_batch_size: int = Field(1, ge=1)              # images per inference call (1: per-image latency)
    # ---- input ------------------------------------------------------------
    # BGR, 0..255 (the input policy's [0, 1] x 255); None: mean / std of the training images as the
    # network sees them (pixel_std 1.0 with MSRA .pkl weights)
    pixel_mean: Float3 | None = None
    pixel_std: Float3 | None = None
    min_size_train: list[int] = [640, 672, 704, 736, 768, 800]   # shortest edge, one chosen per image
    min_size_train_sampling: Literal["choice", "range"] = "choice"
    max_size_train: int = Field(1333, ge=1)
    min_size_test: int = Field(800, ge=0)    # 0: no resizing at test time
    max_size_test: int = Field(1333, ge=1)
    random_flip: Literal["none", "horizontal", "vertical"] = "horizontal"
    # images larger than this train on random crops of it, before the resize (T.RandomCrop "absolute",
    # the rule of bench/tiling.py; 0: off); smaller clipped instances are then dropped
    # auto: the crop whose resize brings the median training cell to target_cell_px (bench/anchors.py)
    train_crop: Annotated[int, Field(ge=0)] | Literal["auto"] = 0
    target_cell_px: float = Field(20.0, gt=0)    # train_crop/predict_tile=auto: the cell size the anchors suit
    train_crop_min_area: int = Field(10, ge=1)
    # none: resize to min_size_test only; default: detectron2's own (min_size_train resize +
    # random_flip, the study's "flip and resize"); extra: + vertical flip, brightness and
    # contrast x0.8-1.2, and the resize range widened x0.8-1.2 (the study's extra augmentation)
    augment: Literal["none", "default", "extra"] = "default"
    # ---- solver -----------------------------------------------------------
    optimizer: Literal["sgd", "adam"] = "sgd"   # adam: torch Adam on detectron2's parameter groups
    batch_size: int = Field(16, ge=1)
    lr: float = Field(0.02, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    lr_gamma: float = Field(0.1, gt=0)
    lr_steps: list[int] = [210000, 250000]  # iterations where the LR is multiplied by lr_gamma
    iterations: int = Field(270000, ge=1)
    warmup_iters: int = Field(1000, ge=0)
    warmup_factor: float = Field(0.001, gt=0, le=1)
    grad_clip: float | None = None      # max L2 norm of each parameter's gradient; None: off
    amp: bool = False                        # mixed precision (CUDA only)
    # ---- running ----------------------------------------------------------
    num_workers: int = Field(2, ge=0)        # data-loader processes
    log_every: int = Field(20, ge=1)        # iterations between loss records
    checkpoint_period: int = Field(0, ge=0)  # 0: only the final weights are kept
    checkpoint_every: int = Field(0, ge=0)   # mid-training checkpoint (resumable) every N iterations; 0: off

    @field_validator("anchor_sizes")
    @classmethod
    def _five_levels(cls, v: list[float]) -> list[float]:
        if v == "auto":
            return v
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
        if list(self.lr_steps) != sorted(self.lr_steps) or any(s <= 0 for s in self.lr_steps):
            raise ValueError(f"lr_steps must be increasing positive iterations, got {self.lr_steps}")
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
                       seed: int | None = None, anchor_sizes: Sequence[float] | None = None) -> dict[str, Any]:
    """The detectron2 config keys this config sets, with values of the types detectron2 expects.

    Pure (no detectron2 import). ``pixel_mean``/``pixel_std`` are the data's statistics,
    used where the config leaves them None. ``MODEL.WEIGHTS`` is always set ("" = from
    scratch) so the zoo file's download URL never survives. ``anchor_sizes``: what
    ``anchor_sizes=auto`` derived (required then).
    """
    c = cfg
    sizes = list(anchor_sizes) if anchor_sizes is not None else c.anchor_sizes
    if sizes == "auto":
        raise ValueError("maskrcnn: anchor_sizes=auto needs the training set (fit) or a checkpoint (load)")
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
        "MODEL.ANCHOR_GENERATOR.SIZES": [[float(s)] for s in sizes],
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
        "SOLVER.IMS_PER_BATCH": int(c.batch_size),
        "SOLVER.BASE_LR": float(c.lr),
        "SOLVER.MOMENTUM": float(c.momentum),
        "SOLVER.WEIGHT_DECAY": float(c.weight_decay),
        "SOLVER.GAMMA": float(c.lr_gamma),
        "SOLVER.STEPS": tuple(int(s) for s in c.lr_steps),
        "SOLVER.MAX_ITER": int(c.iterations),
        "SOLVER.WARMUP_ITERS": int(c.warmup_iters),
        "SOLVER.WARMUP_FACTOR": float(c.warmup_factor),
        "SOLVER.CHECKPOINT_PERIOD": int(c.checkpoint_period or c.iterations),
        "SOLVER.CLIP_GRADIENTS.ENABLED": c.grad_clip is not None,
        "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": "norm",
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": float(c.grad_clip or 1.0),
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

def to_bgr255(image01: np.ndarray) -> np.ndarray:
    """An image under the input policy (float [0, 1], H x W or H x W x 3 RGB) -> the array
    detectron2 takes: H x W x 3 float32, BGR, 0..255 (the scale of ``MODEL.PIXEL_MEAN/STD``)."""
    rgb = to_rgb(np.asarray(image01, dtype=np.float32))
    return np.ascontiguousarray(rgb[:, :, ::-1] * np.float32(255.0))


def read_raw(file_name: str) -> np.ndarray:
    """A file of ``to_dataset_dicts`` as stored (``.npy`` for in-memory samples, else cellbench's reader)."""
    if file_name.endswith(".npy"):
        return np.load(file_name)
    from bench.data.io import read_image

    return read_image(file_name)


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


def auto_anchors(c: D2MaskRCNNConfig, instances: Sequence[Instances]) -> dict:
    """``anchor_sizes=auto`` (bench/anchors.py): from the instances as the network sees them at the
    test resize (``min_size_test``/``max_size_test``), after ``train_crop``."""
    from bench.anchors import auto_anchor_sizes, summary, training_sizes

    sizes = training_sizes(instances, c.min_size_test, c.max_size_test, c.train_crop)
    return summary(sizes, auto_anchor_sizes(sizes, 5))


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def image_stats(dicts: Sequence[dict], policy: Callable[[np.ndarray], np.ndarray]) -> tuple[list[float], list[float]]:
    """Per-channel (B, G, R) mean and std over all pixels of the images, as the model sees them
    (``to_bgr255(policy(image))``)."""
    n, s, ss = 0, np.zeros(3), np.zeros(3)
    for d in dicts:
        img = to_bgr255(policy(read_raw(d["file_name"]))).reshape(-1, 3).astype(np.float64)
        n += img.shape[0]
        s += img.sum(0)
        ss += (img ** 2).sum(0)
    if n == 0:
        raise ValueError("no training images to compute pixel statistics from")
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean ** 2, 1e-6))
    return [round(float(x), 4) for x in mean], [round(float(x), 4) for x in np.maximum(std, 1.0)]


class _Mapper:
    """detectron2's DatasetMapper, reading images through the input policy (``to_bgr255(policy(raw))``).

    ``policy`` is the adapter's :class:`~bench.data.normalize.InputPolicy` (what ``model_input``
    applies): a small picklable object, so data-loader workers get it without the model."""

    def __init__(self, augmentations, policy: Callable[[np.ndarray], np.ndarray], mask_format: str = "bitmask",
                 crop_min_area: int = 0):
        self.augmentations = augmentations
        self.policy = policy
        self.mask_format = mask_format
        self.crop_min_area = crop_min_area  # train_crop: instances under this many crop pixels are dropped

    def image(self, file_name: str) -> np.ndarray:
        return to_bgr255(self.policy(read_raw(file_name)))

    def __call__(self, dataset_dict: dict) -> dict:
        import torch
        from detectron2.data import detection_utils as utils
        from detectron2.data import transforms as T

        d = copy.deepcopy(dataset_dict)
        image = self.image(d["file_name"])
        utils.check_image_size(d, image)
        aug_input = T.AugInput(image)
        transforms = T.AugmentationList(self.augmentations)(aug_input)
        # brightness/contrast blends leave float images unclipped (and may widen them to float64)
        image = np.clip(aug_input.image, 0.0, 255.0).astype(np.float32, copy=False)
        h, w = image.shape[:2]
        d["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        annos = [utils.transform_instance_annotations(a, transforms, (h, w))
                 for a in d.pop("annotations", []) if a.get("iscrowd", 0) == 0]
        instances = utils.annotations_to_instances(annos, (h, w), mask_format=self.mask_format)
        d["instances"] = utils.filter_empty_instances(instances)
        if self.crop_min_area:
            d["instances"] = _drop_small(d["instances"], transforms, self.crop_min_area)
        return d


# ---------------------------------------------------------------------------
# the adapter
# ---------------------------------------------------------------------------

@register("maskrcnn")
class Detectron2MaskRCNN(TrainableAdapter):
    framework = "detectron2"
    framework_modules = ("detectron2", "detectron2.model_zoo")
    install_hint = "detectron2 has no PyPI package: make setup-detectron2 D2_SRC=<path or git URL of its official source>"
    capabilities = Capabilities(predicts_classes=True, overlapping_masks=True, tta=("flip",),
                                tta_note="it resizes every image to its own fixed size (min_size_test), which undoes a "
                                         "scale pass before the network sees it; min_size_test=0 keeps each image's "
                                         "own size and allows scale")
    Config = D2MaskRCNNConfig
    warm_start_name = WEIGHTS_FILE
    resize_short_key = "min_size_test"
    framework_keys = {
        "iterations": "SOLVER.MAX_ITER", "lr": "SOLVER.BASE_LR", "batch_size": "SOLVER.IMS_PER_BATCH",
        "weight_decay": "SOLVER.WEIGHT_DECAY", "optimizer": "build_optimizer (SGD) / torch Adam",
        "lr_steps": "SOLVER.STEPS", "lr_gamma": "SOLVER.GAMMA", "warmup_iters": "SOLVER.WARMUP_ITERS",
        "amp": "SOLVER.AMP.ENABLED (AMPTrainer)",
        "augment": "INPUT.MIN_SIZE_TRAIN / INPUT.RANDOM_FLIP (+ vertical flip, brightness, contrast)",
        "eval_every": "validation hook", "log_every": "log hook period",
        "grad_clip": "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "num_workers": "DATALOADER.NUM_WORKERS",
        "predict_batch_size": "images per GeneralizedRCNN([...]) call",
        "checkpoint_every": "DetectionCheckpointer(model, trainer=trainer) every N iterations",
        "train_crop": "T.RandomCrop('absolute') before the resize", "train_crop_min_area": "mapper filter"}
    resumes_mid_training = True

    def __init__(self, cfg: AdapterConfig, classes: Sequence[str], device: str = "cpu"):
        super().__init__(cfg, classes, device)
        self.model = None
        self.d2cfg = None
        self.pixel_stats: tuple[list[float], list[float]] | None = None
        self.anchors: dict | None = None   # anchor_sizes=auto: what was derived (meta.json)

    def _network_input(self, image: np.ndarray) -> np.ndarray:
        """A raw image -> H x W x 3 float32 BGR 0..255 (what the mapper gives in training)."""
        return to_bgr255(self.model_input(image))

    # ---- config -------------------------------------------------------------
    def _d2_config(self, seed: int | None = None):
        from detectron2 import model_zoo
        from detectron2.config import get_cfg

        c: D2MaskRCNNConfig = self.cfg  # type: ignore[assignment]
        mean, std = self.pixel_stats or (None, None)
        d2 = get_cfg()
        d2.merge_from_file(model_zoo.get_config_file(ZOO_CONFIG))
        opts = to_detectron2_opts(c, num_classes=len(self.classes), device=self.device,
                                  pixel_mean=mean, pixel_std=std, seed=seed,
                                  anchor_sizes=self.anchors["anchor_sizes"] if self.anchors else None)
        d2.merge_from_list([x for kv in opts.items() for x in kv])
        d2.DATASETS.TRAIN, d2.DATASETS.TEST = (), ()
        return d2

    def _build_model(self, d2cfg):
        from detectron2.modeling import build_model

        return build_model(d2cfg)

    # ---- training -----------------------------------------------------------
    def train(self, train: Sequence[Sample], val: Sequence[Sample], ctx: FitContext) -> None:
        c: D2MaskRCNNConfig = self.cfg  # type: ignore[assignment]
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

        work = Path(ctx.workdir) / "detectron2"
        work.mkdir(parents=True, exist_ok=True)

        dicts = to_dataset_dicts(train, self.classes, image_dir=work / "images")
        if not any(d["annotations"] for d in dicts):
            raise ValueError("no training image has an annotated instance")
        self.pixel_stats = (image_stats(dicts, self.policy) if c.pixel_mean is None or c.pixel_std is None
                            else None)
        self.anchors = auto_anchors(c, [s.instances for s in train]) if c.anchor_sizes == "auto" else None
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
                dataset=dataset, mapper=_Mapper(train_augmentations(d2cfg, c.augment, c.train_crop), self.policy,
                                                crop_min_area=c.train_crop_min_area if c.train_crop else 0),
                sampler=TrainingSampler(len(dataset), shuffle=True, seed=ctx.seed),
                total_batch_size=c.batch_size, aspect_ratio_grouping=True, num_workers=c.num_workers)
            optimizer = build_optimizer(d2cfg, model) if c.optimizer == "sgd" else _adam(d2cfg, model)
            trainer = (AMPTrainer if amp_enabled(c, self.device, ctx) else SimpleTrainer)(model, loader, optimizer)
            hook_list = [hooks.IterationTimer(), hooks.LRScheduler(optimizer, build_lr_scheduler(d2cfg, optimizer)),
                         _LogHook(ctx, c.log_every, c.iterations)]
            if ctx.curve_wanted:
                self.d2cfg = d2cfg
                hook_list.append(_ValidationHook(self, ctx, c.iterations))
            if c.checkpoint_period:
                ckpt = DetectionCheckpointer(model, str(work), optimizer=optimizer)
                hook_list.append(hooks.PeriodicCheckpointer(ckpt, c.checkpoint_period, max_iter=c.iterations))
            hook_list.append(_ResumeHook(self, ctx, c.iterations))  # after the LR hook: its stepped state
            trainer.register_hooks(hook_list)
            if ctx.resumed_from:
                _continue(trainer, self.resume.point.folder, ctx.resumed_from)  # type: ignore[union-attr]
            trainer.train(ctx.resumed_from, c.iterations)
        finally:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        model.eval()
        self.model, self.d2cfg = model, d2cfg
        torch.save(model.state_dict(), work / WEIGHTS_FILE)

    # ---- inference ----------------------------------------------------------
    def score_threshold(self) -> float | None:
        return float(self.cfg.score_thresh_test)  # type: ignore[attr-defined]

    @classmethod
    def tta_capabilities(cls, cfg) -> Capabilities:
        """``min_size_test=0``: the image is used at its own size, so a scale pass reaches the network."""
        if getattr(cfg, "min_size_test", None) == 0:
            return dataclasses.replace(cls.capabilities, tta=("flip", "scale"), tta_note="")
        return cls.capabilities

    def predict(self, samples: Sequence[Sample]) -> list[Instances]:
        import torch
        from detectron2.data import transforms as T

        if self.model is None:
            raise RuntimeError("maskrcnn: predict before fit or load")
        d2 = self.d2cfg
        resize = (T.ResizeShortestEdge([d2.INPUT.MIN_SIZE_TEST] * 2, d2.INPUT.MAX_SIZE_TEST)
                  if d2.INPUT.MIN_SIZE_TEST > 0 else None)
        self.model.eval()
        self.model.roi_heads.box_predictor.test_score_thresh = self.predict_threshold()  # raw floor if capturing
        out = []
        batch = self.cfg.predict_batch_size  # type: ignore[attr-defined]
        with torch.inference_mode():
            for start in range(0, len(samples), batch):
                inputs = []
                for s in samples[start:start + batch]:
                    img = self._network_input(s.image)
                    x = resize.get_transform(img).apply_image(img) if resize is not None else img
                    inputs.append({"image": torch.as_tensor(np.ascontiguousarray(x.transpose(2, 0, 1))),
                                   "height": img.shape[0], "width": img.shape[1]})
                for d, r in zip(inputs, self.model(inputs)):
                    out.append(self._to_instances(r["instances"].to("cpu"), d["height"], d["width"]))
        return out

    @staticmethod
    def _to_instances(res, h: int, w: int) -> Instances:
        if len(res) == 0:
            return Instances.empty(h, w)
        return instances_from_masks(res.pred_masks.numpy(), res.pred_boxes.tensor.numpy(), res.scores.numpy(),
                                    res.pred_classes.numpy(), h, w)

    # ---- persistence ----------------------------------------------------------
    def save_weights(self, directory: Path) -> None:
        import torch

        if self.model is None:
            raise RuntimeError("maskrcnn: nothing to save (fit or load first)")
        torch.save(self.model.state_dict(), directory / WEIGHTS_FILE)
        (directory / D2_CONFIG_FILE).write_text(self.d2cfg.dump())  # for reading / detectron2's own tools

    def checkpoint_extra(self) -> dict:
        mean, std = self.pixel_stats or (None, None)
        return {"pixel_mean": mean, "pixel_std": std, "detectron2_zoo_config": ZOO_CONFIG, "anchors": self.anchors}

    def restore_extra(self, extra: dict) -> None:
        mean, std = extra.get("pixel_mean"), extra.get("pixel_std")
        self.pixel_stats = (mean, std) if mean is not None else None
        self.anchors = extra.get("anchors")

    def load_weights(self, directory: Path) -> None:
        import torch

        d2cfg = self._d2_config()
        d2cfg.MODEL.WEIGHTS = ""  # the state dict below is the model
        model = self._build_model(d2cfg)
        model.load_state_dict(torch.load(directory / WEIGHTS_FILE, map_location=self.device, weights_only=True))
        model.eval()
        self.model, self.d2cfg = model, d2cfg


def train_augmentations(d2cfg, augment: str, crop: int = 0) -> list:
    """The training augmentations of ``augment`` (none / default / extra), as detectron2 objects,
    after a random ``crop`` (px, 0: none) as bench/tiling.py draws it (``T.RandomCrop`` absolute:
    ``min(crop, H) x min(crop, W)``, uniform offsets)."""
    from detectron2.data import transforms as T

    first = [T.RandomCrop("absolute", (int(crop), int(crop)))] if crop else []
    return first + _augmentations(d2cfg, augment)


def _augmentations(d2cfg, augment: str) -> list:
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


def _drop_small(instances, transforms, min_area: int):
    """Instances whose mask has fewer than ``min_area`` pixels at the crop's scale dropped (the rule of
    bench/tiling.py, measured before the resize that follows the crop: area / scale^2), boxes
    recomputed from the clipped masks as torchvision's and MMDetection's are."""
    from detectron2.data import transforms as T

    crop = next((t for t in transforms.transforms if isinstance(t, T.CropTransform)), None)
    h, w = instances.image_size
    scale2 = (h * w) / (crop.h * crop.w) if crop is not None else 1.0
    if len(instances) == 0:
        return instances
    areas = instances.gt_masks.tensor.flatten(1).sum(1).float() / scale2
    kept = instances[areas >= min_area - 1e-6]
    kept.gt_boxes = kept.gt_masks.get_bounding_boxes()  # of the clipped masks (DatasetMapper's recompute_boxes)
    return kept


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


RESUME_NAME = "model"  # <folder>/model.pth: DetectionCheckpointer's file of a mid-training checkpoint


def _ResumeHook(adapter: "Detectron2MaskRCNN", ctx: FitContext, max_iter: int):
    from detectron2.engine import HookBase

    class ResumeHook(HookBase):
        """Every ``checkpoint_every`` iterations: detectron2's checkpointer with the trainer as a
        checkpointable (what ``DefaultTrainer.resume_or_load`` reads: weights, optimizer, iteration,
        the LR scheduler hook's state, AMP's grad scaler), plus the RNG states."""

        def after_step(self):
            adapter.checkpoint_due(self.trainer.iter + 1, max_iter, ctx, self.write)

        def write(self, folder: Path) -> None:
            from detectron2.checkpoint import DetectionCheckpointer

            DetectionCheckpointer(self.trainer.model, str(folder), trainer=self.trainer).save(RESUME_NAME,
                                                                                             rng=rng_state())

    return ResumeHook()


def _continue(trainer, folder: Path, start: int) -> None:
    """Put ``trainer`` where the checkpoint in ``folder`` left it, ``start`` iterations done.

    Detectron2's own resume reloads the state but restarts the data stream from its seed; here
    the first ``start`` batches are drawn again (loaded, not trained on: the cost of resuming is
    their data loading) so that the resumed fit sees the batches the uninterrupted one would. The
    loader's iterator is made before the RNG states are restored, as the uninterrupted fit made
    it before its first step."""
    from detectron2.checkpoint import DetectionCheckpointer

    batches = iter(trainer.data_loader)
    for _ in range(start):
        next(batches)
    trainer._data_loader_iter_obj = batches  # SimpleTrainer's lazily made iterator, made here
    extra = DetectionCheckpointer(trainer.model, str(folder), trainer=trainer).load(str(folder / f"{RESUME_NAME}.pth"))
    set_rng_state(extra["rng"])


def _LogHook(ctx: FitContext, period: int, max_iter: int):
    from detectron2.engine import HookBase

    class LogHook(HookBase):
        """Every ``period`` iterations and at the end: losses -> ctx.log_step, progress -> ctx.report."""

        def after_step(self):
            it = self.trainer.iter + 1
            hist = self.trainer.storage.histories()
            if it % period == 0 or it == max_iter:
                # medians over the last `period` iterations, as detectron2's printer does
                parts = {k: float(hist[k].median(period)) for k in sorted(hist) if k.startswith("loss_")}
                loss = float(hist["total_loss"].median(period)) if "total_loss" in hist else None
                lr = float(hist["lr"].latest()) if "lr" in hist else None
                ctx.log_step(it, loss=loss, parts=parts, lr=lr)
            loss = hist.get("total_loss")
            ctx.report(it, max_iter, **({"loss": round(float(loss.latest()), 4)} if loss is not None else {}))

    return LogHook()
