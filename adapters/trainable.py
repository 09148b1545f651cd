"""``TrainableAdapter``: what every trained model shares, written once.

An adapter that trains writes only its framework-specific code: how to build the model,
how to run the framework's own training with the shared hooks, how to turn raw outputs
into :class:`~bench.data.sample.Instances`, and how to save/load its weights. Shared, once:

* the **input policy** (:mod:`bench.data.normalize`): :meth:`TrainableAdapter.model_input`;
* **one hyperparameter vocabulary** (:data:`VOCABULARY`): every trainable adapter spells these
  options the same way and lists, in ``framework_keys``, the framework's own name for each;
* **one training-log schema** (``FitContext.log_step``) and one validation-point hook
  (``FitContext.validation_due`` / ``validate``: the adapter restores its training mode);
* **seeds, cuDNN flags and AMP gating** (:func:`seed_everything`, :func:`configure_torch`,
  :func:`amp_enabled`), the same for every model;
* **one checkpoint layout**: the adapter's weights plus ``meta.json`` (adapter, classes, config,
  input policy, schema version, adapter extras), checked on load with a clear error;
* one masks-to-instances path (:func:`bench.data.masks.instances_from_masks`);
* **mid-training checkpoints** (``checkpoint_every``, :class:`FitResume`): where the framework
  allows it, an interrupted fit started again in the same model folder continues from its latest
  checkpoint (weights, optimizer, scheduler, iteration, RNG states) instead of starting over;
* for loops cellbench writes itself, the warm-up + step learning rate (:func:`step_lr`), and for
  user-named weights files, one tolerant state-dict loader (:func:`load_matching_state`).

Framework imports stay inside functions: importing this module imports no framework.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from bench.adapters.base import Adapter, AdapterConfig, FitContext
from bench.data.normalize import InputPolicy, normalize
from bench.data.sample import Sample
from bench.util import atomic_write_json

CHECKPOINT_SCHEMA = 1
META_FILE = "meta.json"

# The shared vocabulary of trainable adapters. A model has the key when it has the knob;
# `--set KEY=VALUE` applies to every model that has it and is an error naming those that do not.
VOCABULARY: dict[str, str] = {
    "iterations": "optimiser steps (iteration-based frameworks)",
    "epochs": "passes over the training images (epoch-based frameworks: Cellpose, YOLO; StarDist's fixed-length epochs)",
    "steps_per_epoch": "optimiser steps per epoch where the framework fixes an epoch's length (StarDist)",
    "patch_size": "training crop (h, w) in pixels, where the framework trains on crops (StarDist)",
    "train_crop": "detectors: images larger than this (px) train on random crops of it, before the resize "
                  "(bench/tiling.py; 0: off; auto: sized so the median training cell is target_cell_px)",
    "train_crop_min_area": "with train_crop: instances left with fewer pixels by the crop are dropped",
    "lr": "base learning rate",
    "batch_size": "images per optimiser step",
    "weight_decay": "L2 weight decay",
    "optimizer": "sgd, adam or adamw (what the framework offers)",
    "lr_steps": "iterations at which the learning rate is multiplied by lr_gamma",
    "lr_gamma": "factor of each lr step",
    "warmup_iters": "linear warm-up iterations",
    "amp": "mixed precision (CUDA only; ignored, and logged, on CPU)",
    "augment": "training augmentation: none, default (flips [+ resize]) or extra",
    "eval_every": "validation-curve point every N iterations/epochs (0: off)",
    "log_every": "training-log record every N iterations",
    "checkpoint_every": "mid-training checkpoint every N iterations (0: off), which an interrupted fit "
                        "resumes from (adapters with resumes_mid_training)",
    "grad_clip": "max gradient norm (None: off)",
    "num_workers": "data-loader worker processes",
    "predict_batch_size": "images per inference call (1, the default, times per-image latency; more "
                          "batches where the framework does)",
}


class CheckpointError(ValueError):
    """A checkpoint folder that this adapter cannot load: names the folder and the problem."""


# ---------------------------------------------------------------------------
# seeds, cuDNN, AMP: one place, the same for every model
# ---------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    """Python, numpy and torch (CPU and every GPU) seeded alike."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def configure_torch(device: str) -> None:
    """The same cuDNN settings for every model: deterministic kernels, no autotuning.

    Autotuning (``benchmark=True``) picks kernels by timing them, so two runs of one
    model could differ, and a model whose framework turns it on would be timed with an
    advantage the others do not get.
    """
    try:
        import torch
    except ImportError:
        return
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    if device.startswith("cuda"):
        index = torch.device(device).index
        if index is not None:
            torch.cuda.set_device(index)


def amp_enabled(cfg: AdapterConfig, device: str, ctx: FitContext | None = None) -> bool:
    """Mixed precision only where asked and on CUDA; asked on CPU is logged, not an error."""
    asked = bool(getattr(cfg, "amp", False))
    on_cuda = str(device).startswith("cuda")
    if asked and not on_cuda and ctx is not None:
        ctx.log(step=0, note="amp=true ignored: mixed precision needs CUDA")
    return asked and on_cuda


def step_lr(cfg: AdapterConfig, it: int) -> float:
    """Learning rate at 0-based iteration ``it``: linear warm-up over ``warmup_iters``, then times
    ``lr_gamma`` at each of ``lr_steps`` (Detectron2's WarmupMultiStepLR without its warm-up
    factor), for adapters whose training loop is cellbench's own."""
    warm = min(1.0, (it + 1) / max(int(getattr(cfg, "warmup_iters", 0)), 1))
    return cfg.lr * warm * cfg.lr_gamma ** sum(it >= s for s in cfg.lr_steps)  # type: ignore[attr-defined]


def build_optimizer(cfg: AdapterConfig, params: list):
    """``optimizer`` of the vocabulary for loops cellbench writes itself: sgd (with ``momentum``)
    or adam/adamw, at ``lr`` and ``weight_decay``."""
    import torch

    kind = getattr(cfg, "optimizer", "sgd")
    if kind in ("adam", "adamw"):
        cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)  # type: ignore[attr-defined]
    return torch.optim.SGD(params, lr=cfg.lr, momentum=getattr(cfg, "momentum", 0.9),  # type: ignore[attr-defined]
                           weight_decay=cfg.weight_decay)  # type: ignore[attr-defined]


def optimizer_step(loss, opt, scaler, params: list, grad_clip: float | None) -> None:
    """One AMP-aware update: a non-finite loss is an error naming its value (a diverged run stops
    at once instead of training on NaN), gradients are unscaled before clipping."""
    import torch

    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"loss is {value}: lower lr")
    opt.zero_grad()
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(opt)
    scaler.update()


@dataclasses.dataclass(frozen=True)
class WeightsMatch:
    """What :func:`load_matching_state` did with a weights file, tensor names by outcome."""

    loaded: int
    total: int
    reshaped: tuple[str, ...]   # in both, another shape (e.g. heads with another class count)
    absent: tuple[str, ...]     # in the model only: keep their initialisation
    unused: tuple[str, ...]     # in the file only

    def message(self, name: str, path: Path) -> str:
        msg = f"{name}: {self.loaded} of {self.total} model tensors loaded from {path}"
        for what, keys in (("have another shape and keep their initialisation", self.reshaped),
                           ("are not in the file and keep their initialisation", self.absent),
                           ("of the file match no model tensor", self.unused)):
            if keys:
                msg += f"; {len(keys)} {what} (e.g. {', '.join(keys[:3])})"
        return msg


def load_matching_state(model, state: Any, path: Path, name: str) -> WeightsMatch:
    """Load into ``model`` every tensor of a user-named checkpoint whose name and shape match.

    Accepts a bare state dict or one wrapped in ``state_dict``/``model`` (mmengine, Detectron2,
    torchvision references), strips DataParallel's ``module.``, and reads a bare backbone into
    ``backbone.*``. Starting from weights trained elsewhere (another class count, another head) is
    the point of the option, so mismatches are reported, not fatal; a file that matches nothing is
    an error naming it."""
    sd = state
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                sd = state[key]
                break
    if not isinstance(sd, dict):
        raise ValueError(f"{name}: {path} holds no state dict (got {type(sd).__name__})")
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items() if hasattr(v, "shape")}
    own = model.state_dict()
    if not any(k in own for k in sd) and any(("backbone." + k) in own for k in sd):
        sd = {"backbone." + k: v for k, v in sd.items()}
    matched = {k: v for k, v in sd.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not matched:
        raise ValueError(f"{name}: no parameter in {path} matches the model (wrong file or architecture?)")
    model.load_state_dict(matched, strict=False)
    return WeightsMatch(len(matched), len(own), tuple(sorted(k for k in sd if k in own and k not in matched)),
                        tuple(sorted(k for k in own if k not in sd)), tuple(sorted(k for k in sd if k not in own)))


# ---------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------

def write_meta(directory: Path, adapter: "TrainableAdapter", extra: dict | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"schema_version": CHECKPOINT_SCHEMA, "adapter": adapter.name, "classes": list(adapter.classes),
            "config": adapter.cfg.model_dump(mode="json"), "input_policy": adapter.policy.as_dict(),
            "extra": extra or {}}
    (directory / META_FILE).write_text(json.dumps(meta, indent=1))


def read_meta(directory: Path, adapter_name: str) -> dict:
    """``meta.json`` of a checkpoint folder, checked: exists, parses, this adapter, this schema."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a cellbench checkpoint of {adapter_name} (no {META_FILE})")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("adapter") != adapter_name:
        raise CheckpointError(f"{path}: a checkpoint of {meta.get('adapter') if isinstance(meta, dict) else '?'!r}, "
                              f"not of {adapter_name!r}")
    if meta.get("schema_version") != CHECKPOINT_SCHEMA:
        raise CheckpointError(f"{path}: checkpoint schema {meta.get('schema_version')!r}, this cellbench reads "
                              f"{CHECKPOINT_SCHEMA}: retrain or use the cellbench that wrote it")
    for key in ("classes", "config", "input_policy"):
        if key not in meta:
            raise CheckpointError(f"{path}: no {key!r}")
    return meta


# ---------------------------------------------------------------------------
# mid-training checkpoints: an interrupted fit continues where it stopped
# ---------------------------------------------------------------------------

RESUME_STATE = "state.json"


def rng_state() -> dict:
    """Python's, numpy's and torch's (CPU and every GPU) global RNG states, as tensors and plain
    values only (so ``torch.load(weights_only=True)`` reads them back)."""
    import torch

    np_state = np.random.get_state(legacy=False)
    state = {"python": random.getstate(), "numpy_key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
             "numpy_pos": int(np_state["state"]["pos"]), "numpy_gauss": [np_state["has_gauss"], np_state["gauss"]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, numpy: bool = True) -> None:
    """Inverse of :func:`rng_state` (CUDA states only where there are as many GPUs). ``numpy=False``
    leaves numpy's alone, for a framework whose resume replays the data pipeline (its numpy draws)
    after the checkpoint is read."""
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if numpy:
        has_gauss, cached = state["numpy_gauss"]
        np.random.set_state({"bit_generator": "MT19937", "has_gauss": int(has_gauss), "gauss": float(cached),
                             "state": {"key": state["numpy_key"].numpy().astype(np.uint32),
                                       "pos": state["numpy_pos"]}})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """The latest mid-training checkpoint: ``iteration`` optimiser steps done, the adapter's files
    in ``folder``, after ``seconds`` of training (validation excluded)."""

    iteration: int
    folder: Path
    seconds: float


class FitResume:
    """Mid-training checkpoints of one fit, in the folder the runner names (``ctx.resume_dir``,
    :attr:`bench.store.ModelDir.resume`).

    Layout: ``state.json`` (what the checkpoint belongs to, its iteration) and ``iter<k>/`` (the
    adapter's files: weights, optimizer, scheduler, RNG states). A checkpoint is written into
    ``iter<k>.tmp`` and renamed, then ``state.json`` is replaced, then older folders are removed,
    so a kill at any moment leaves the previous checkpoint readable. A checkpoint of another fit
    (another config, seed, class list or training set: its ``fingerprint``) is removed, not used.
    Who removes the folder when the fit finishes: the runner, once ``fit.done.json`` is written.
    """

    def __init__(self, directory: Path | None, every: int, fingerprint: dict):
        self.directory = Path(directory) if directory is not None else None
        self.every = int(every)
        self.fingerprint = fingerprint
        self.point: ResumePoint | None = None
        self.note = ""          # why a checkpoint found there was not used

    def due(self, done: int, total: int) -> bool:
        """Whether to checkpoint after ``done`` iterations (never after the last: the fit is done)."""
        return self.directory is not None and self.every > 0 and done % self.every == 0 and done < total

    def find(self) -> ResumePoint | None:
        """The checkpoint to continue from, if one of this very fit is there (sets ``point``)."""
        state_file = self.directory / RESUME_STATE if self.directory is not None else None
        if state_file is None or not state_file.is_file():
            return None
        try:
            state = json.loads(state_file.read_text())
            folder = self.directory / state["folder"]
            point = ResumePoint(int(state["iteration"]), folder, float(state.get("seconds", 0.0)))
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.note = f"{state_file} unreadable ({e}): the fit starts over"
        else:
            if state.get("fingerprint") != self.fingerprint:
                self.note = f"{self.directory} holds checkpoints of another fit (config, seed or data differ): " \
                            "the fit starts over"
            elif not folder.is_dir():
                self.note = f"{folder} is missing: the fit starts over"
            else:
                self.point = point
                return point
        shutil.rmtree(self.directory, ignore_errors=True)
        return None

    def save(self, done: int, seconds: float, write: Callable[[Path], None]) -> None:
        """Checkpoint after ``done`` iterations: ``write(folder)`` writes the adapter's files."""
        assert self.directory is not None
        name = f"iter{done}"
        tmp, final = self.directory / f"{name}.tmp", self.directory / name
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_json(self.directory / RESUME_STATE, {"iteration": done, "folder": name,
                                                          "seconds": round(seconds, 3),
                                                          "fingerprint": self.fingerprint})
        for old in self.directory.iterdir():
            if old.is_dir() and old.name != name:
                shutil.rmtree(old, ignore_errors=True)


def fit_fingerprint(adapter: "TrainableAdapter", cfg: AdapterConfig, train: Sequence[Sample], seed: int) -> dict:
    """What makes two fits the same fit: adapter, config (but how often it checkpoints), seed, classes
    and training images (their ids, hashed)."""
    ids = hashlib.sha256("\n".join(str(s.image_id) for s in train).encode()).hexdigest()[:16]
    config = {k: v for k, v in cfg.model_dump(mode="json").items() if k != "checkpoint_every"}
    return {"adapter": adapter.name, "config": config, "seed": int(seed), "classes": list(adapter.classes),
            "train": ids}


def resolve_auto_scale(adapter: "TrainableAdapter", cfg: AdapterConfig,
                       train: Sequence[Sample]) -> tuple[AdapterConfig, dict | None]:
    """The config with ``train_crop`` / ``predict_tile`` / ``image_scale`` = ``auto`` replaced by
    what the training set gives (:mod:`bench.anchors`), and what was derived (None: nothing was).

    The resolved config is the one the checkpoint's ``meta.json`` keeps, so a loaded model predicts
    with the tile its fit derived. ``predict_tile: auto`` follows ``train_crop: auto`` (one scale
    in training and test) and means nothing without it."""
    from bench import anchors

    instances = [s.instances for s in train if len(s.instances)]
    update: dict[str, Any] = {}
    derived: dict | None = None
    if getattr(cfg, "train_crop", 0) == "auto":
        short = int(getattr(cfg, adapter.resize_short_key, 0) or 0) if adapter.resize_short_key else 0
        if short <= 0:
            raise ValueError(f"{adapter.name}: train_crop=auto sizes the crop against the resize of its short side; "
                             f"set {adapter.resize_short_key or 'a resize'} > 0 or give train_crop in pixels")
        derived = anchors.auto_scale_crop(instances, short, float(getattr(cfg, "target_cell_px")))
        update["train_crop"] = derived["train_crop"]
        if cfg.predict_tile == "auto":
            update["predict_tile"] = derived["predict_tile"]
    elif cfg.predict_tile == "auto":
        raise ValueError(f"{adapter.name}: predict_tile=auto is the crop that train_crop=auto derives; "
                         "set train_crop=auto too, or give predict_tile in pixels")
    if getattr(cfg, "image_scale", None) == "auto":
        derived = anchors.auto_image_scale(instances, float(getattr(cfg, "target_cell_px")))
        update["image_scale"] = derived["image_scale"]
    if update.get("predict_tile") and cfg.predict_tile_overlap >= update["predict_tile"]:
        update["predict_tile_overlap"] = update["predict_tile"] // 4
    return (cfg.model_copy(update=update) if update else cfg), derived


# ---------------------------------------------------------------------------
# the base
# ---------------------------------------------------------------------------

class TrainableAdapter(Adapter):
    """Template for trained models: ``fit``/``save``/``load`` here, the framework parts below.

    Subclasses implement :meth:`train` (the framework's own loop, reporting through ``ctx``),
    :meth:`predict`, :meth:`save_weights` / :meth:`load_weights`, and may add extras to the
    checkpoint (:meth:`checkpoint_extra` / :meth:`restore_extra`, e.g. pixel statistics).
    """

    # shared vocabulary key -> the framework's own key (for the README and `bench models`)
    framework_keys: ClassVar[dict[str, str]] = {}
    # True: ``train`` writes checkpoints every ``checkpoint_every`` iterations and continues from the
    # latest one (``self.resume``); False: an interrupted fit restarts from its start (same seed)
    resumes_mid_training: ClassVar[bool] = False
    # what a mid-training checkpoint's iteration counts, as a field of the training log's records
    resume_unit: ClassVar[str] = "step"
    # the config key of the short side the framework resizes every image (or crop) to: what
    # ``train_crop: auto`` sizes the crop against (None: the adapter has no such resize)
    resize_short_key: ClassVar[str | None] = None

    def __init__(self, cfg: AdapterConfig, classes: Sequence[str], device: str = "cpu"):
        super().__init__(cfg, classes, device)
        self.policy = InputPolicy.of(cfg)
        self.resume = FitResume(None, 0, {})
        self.derived_scale: dict | None = None   # what train_crop/image_scale=auto derived (meta.json)

    # ---- shared -----------------------------------------------------------------
    def model_input(self, image: np.ndarray) -> np.ndarray:
        """The image as every model sees it: float32 in [0, 1] under the run's input policy."""
        return normalize(image, self.policy)

    def fit(self, train: Sequence[Sample], val: Sequence[Sample], cfg: AdapterConfig, ctx: FitContext) -> None:
        self.cfg = cfg
        self.policy = InputPolicy.of(cfg)
        seed_everything(ctx.seed)
        configure_torch(self.device)
        ctx.start_clock()
        self.resume = FitResume(ctx.resume_dir if self.resumes_mid_training else None,
                                int(getattr(cfg, "checkpoint_every", 0) or 0),
                                fit_fingerprint(self, cfg, train, ctx.seed))
        point = self.resume.find()
        if self.resume.note:
            print(f"{self.name}: {self.resume.note}", flush=True)
        if point is not None:
            print(f"{self.name}: resuming the fit from its checkpoint at iteration {point.iteration}", flush=True)
        ctx.begin(point.iteration if point else 0, point.seconds if point else 0.0)
        self.cfg, self.derived_scale = resolve_auto_scale(self, cfg, train)
        if self.derived_scale:
            print(f"{self.name}: scale from the training set: {self.derived_scale}", flush=True)
        self.train(train, val, ctx)

    def checkpoint_due(self, done: int, total: int, ctx: FitContext, write: Callable[[Path], None]) -> None:
        """After ``done`` of ``total`` iterations: a mid-training checkpoint if one is due."""
        if self.resume.due(done, total):
            self.resume.save(done, ctx.training_seconds(), write)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.save_weights(directory)
        extra = self.checkpoint_extra()
        write_meta(directory, self, {**extra, "scale": self.derived_scale} if self.derived_scale else extra)

    def load(self, directory: Path) -> None:
        meta = read_meta(Path(directory), self.name)
        try:
            self.cfg = self.Config(**{**meta["config"], "weights": None})
        except Exception as e:  # pydantic: a config this version does not accept
            raise CheckpointError(f"{directory}: its config does not fit this cellbench ({e})") from None
        self.classes = list(meta["classes"])
        self.policy = InputPolicy.of(self.cfg)
        configure_torch(self.device)
        self.restore_extra(meta.get("extra", {}))
        self.derived_scale = meta.get("extra", {}).get("scale")
        self.load_weights(Path(directory))

    # ---- framework-specific -------------------------------------------------------------
    @abc.abstractmethod
    def train(self, train: Sequence[Sample], val: Sequence[Sample], ctx: FitContext) -> None:
        """Run the framework's training on ``train`` with ``self.cfg`` (seeded, clock started)."""

    @abc.abstractmethod
    def save_weights(self, directory: Path) -> None:
        """Write the weights (the file ``warm_start_name`` names, where the model has one)."""

    @abc.abstractmethod
    def load_weights(self, directory: Path) -> None:
        """Rebuild the model from ``self.cfg`` and load the weights ``save_weights`` wrote."""

    def checkpoint_extra(self) -> dict[str, Any]:
        """Adapter state beside the weights that prediction needs (pixel statistics, sizes)."""
        return {}

    def restore_extra(self, extra: dict[str, Any]) -> None:
        """Inverse of :meth:`checkpoint_extra`."""
