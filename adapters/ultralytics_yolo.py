"""Ultralytics YOLO instance segmentation (``yolo-seg``), built from its model YAML: nothing downloaded.

Ultralytics is AGPL-3.0 (an optional extra, ``pip install -e ".[yolo]"``; ``make setup`` installs it).
It shares the main environment: it needs torch>=1.8 and numpy>=1.23, which torch 2.13 and numpy 2.0
satisfy, and adds no pin of its own.

The network: Ultralytics checks online state, syncs settings and telemetry, downloads a font for
its dataset check and plots, and downloads ``yolo26n.pt`` for its AMP check. :func:`offline` turns
all of it off before the first import (``YOLO_OFFLINE``, no auto-install, settings in the work folder
with every integration off) and replaces the font and AMP checks (the AMP decision is cellbench's
``amp_enabled``); ``tests/test_adapter_yolo.py`` trains and predicts with every socket refused.

Training is Ultralytics' own trainer on the dataset that :mod:`bench.data.yolo_layout` exports. Its
``val`` entry is the training images: Ultralytics validates at the last epoch and keeps a "best"
checkpoint, and neither may see the benchmark's validation images; cellbench keeps ``last.pt``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import yaml
from pydantic import Field, field_validator

from bench.adapters.base import AdapterConfig, Capabilities, FitContext, check_weights_file
from bench.adapters.registry import register
from bench.adapters.trainable import TrainableAdapter, amp_enabled
from bench.data.masks import instances_from_masks
from bench.data.normalize import to_rgb, to_uint8
from bench.data.sample import Instances, Sample
from bench.data.yolo_layout import export_yolo_seg

WEIGHTS_FILE = "model.pt"
# Ultralytics settings that reach a service; all off
_SETTINGS_OFF = ("sync", "hub", "clearml", "comet", "dvc", "mlflow", "neptune", "raytune", "tensorboard", "wandb")


class YoloSegConfig(AdapterConfig):
    # a model YAML shipped with Ultralytics (the scale letter picks the size: yolo11n-seg.yaml) or a
    # local one; it must describe a segmentation model
    model: str = "yolo11n-seg.yaml"
    imgsz: int = Field(640, ge=32)          # training and inference size (long side, multiple of 32)
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0)           # lr0
    momentum: float = Field(0.937, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    warmup_epochs: float = Field(3.0, ge=0)  # Ultralytics warms up for max(this x batches, 100) iterations
    close_mosaic: int = Field(10, ge=0)     # last epochs without mosaic
    # none: no augmentation; default: Ultralytics' defaults (mosaic, flips, HSV, scale, translate);
    # extra: + vertical flips, rotation +-10 degrees, mixup 0.1
    augment: Literal["none", "default", "extra"] = "default"
    amp: bool = False
    num_workers: int = Field(0, ge=0)
    conf: float = Field(0.25, ge=0, le=1)   # score threshold at prediction (Ultralytics' default)
    iou: float = Field(0.7, ge=0, le=1)     # NMS IoU
    max_det: int = Field(1000, ge=1)
    checkpoint_every: int = Field(0, ge=0)   # keep Ultralytics' last.pt every N epochs, to resume from (0: off)

    @field_validator("eval_every")
    @classmethod
    def _no_curve(cls, v: int) -> int:
        if v:
            raise ValueError("yolo-seg records no validation curve (Ultralytics' trainer would validate on "
                             "the benchmark's validation images); use 0")
        return v

    @field_validator("model")
    @classmethod
    def _segmentation_yaml(cls, v: str) -> str:
        """A detection YAML is refused here, before anything trains."""
        p = Path(v).expanduser()
        if p.suffix not in (".yaml", ".yml"):
            raise ValueError(f"{v!r} is not a model YAML (.yaml); a weights file goes in `weights`")
        if p.is_file():
            head = _yaml_head(p)
            if not head or "segment" not in head.lower():
                raise ValueError(f"{p}: its last head module is {head!r}, not Segment: a "
                                 f"{'detection' if head == 'Detect' else 'non-segmentation'} model YAML")
        elif "/" in v or os.sep in v:
            raise ValueError(f"model YAML {p} does not exist")
        elif "-seg" not in p.stem:
            raise ValueError(f"{v!r} is not a segmentation model YAML (Ultralytics names them *-seg.yaml, "
                             f"e.g. {p.stem.split('-')[0]}-seg.yaml)")
        return v


def _yaml_head(path: Path) -> str | None:
    """The module name of a model YAML's last head layer (``Segment`` for segmentation)."""
    try:
        doc = yaml.safe_load(path.read_text())
        return str(doc["head"][-1][2])
    except Exception:  # noqa: BLE001 - any malformed file is "not a segmentation YAML"
        return None


def offline(config_dir: Path, amp: bool = False):
    """Import Ultralytics with everything that reaches the network switched off; returns the package.

    The environment variables act at Ultralytics' first import (its online check and settings file
    are made then); the settings and the two checks are set on every call."""
    config_dir.mkdir(parents=True, exist_ok=True)
    os.environ["YOLO_OFFLINE"] = "1"            # is_online() -> False: no DNS probe, no telemetry
    os.environ["YOLO_AUTOINSTALL"] = "false"    # never pip-installs a missing requirement
    os.environ.setdefault("YOLO_CONFIG_DIR", str(config_dir.resolve()))
    os.environ.setdefault("YOLO_VERBOSE", "false")
    import ultralytics
    import ultralytics.data.utils as data_utils
    import ultralytics.engine.trainer as trainer
    import ultralytics.utils.checks as checks
    from ultralytics.utils import SETTINGS

    SETTINGS.update({k: False for k in _SETTINGS_OFF if k in SETTINGS})
    # nothing it writes (runs, datasets, weights) lands outside cellbench's folders, e.g. in the cwd's repo
    here = Path(os.environ["YOLO_CONFIG_DIR"]).resolve()
    SETTINGS.update({k: str(here / k.removesuffix("_dir")) for k in ("runs_dir", "datasets_dir", "weights_dir")
                     if k in SETTINGS})

    def no_font(font: str = "Arial.ttf"):
        return None  # plots are off; the dataset check only wanted the font for later plots

    data_utils.check_font = checks.check_font = no_font
    trainer.check_amp = lambda model: amp  # the AMP check would download yolo26n.pt
    return ultralytics


@register("yolo-seg")
class YoloSeg(TrainableAdapter):
    framework = "ultralytics"
    framework_modules = ("ultralytics",)
    install_hint = 'pip install -e ".[yolo]" (Ultralytics, AGPL-3.0; make setup installs it)'
    capabilities = Capabilities(predicts_classes=True, overlapping_masks=True)
    Config = YoloSegConfig
    warm_start_name = WEIGHTS_FILE
    framework_keys = {"epochs": "epochs", "batch_size": "batch", "lr": "lr0", "optimizer": "optimizer (SGD/Adam/AdamW)",
                      "weight_decay": "weight_decay", "amp": "amp", "num_workers": "workers",
                      "augment": "mosaic, fliplr/flipud, hsv_*, scale, translate, degrees, mixup",
                      "eval_every": "only 0 (Ultralytics' trainer would validate on the benchmark's validation images)",
                      "checkpoint_every": "epochs: a copy of last.pt (weights, EMA, optimizer, epoch); "
                                          "train(resume=...) continues from it"}
    # per epoch: Ultralytics resumes from last.pt at the next epoch with its own state (optimizer, EMA,
    # scheduler), but draws the data of the resumed epochs afresh, so the weights are not bit-identical
    resumes_mid_training = True
    resume_unit = "epoch"

    def __init__(self, cfg, classes, device="cpu"):
        super().__init__(cfg, classes, device)
        self.yolo = None
        self._config_dir: Path | None = None

    # ---- shared helpers -----------------------------------------------------------------
    def _import(self, workdir: Path, amp: bool = False):
        return offline(self._config_dir or workdir / "ultralytics-settings", amp)

    def _device(self) -> str:
        return "cpu" if self.device == "cpu" else (self.device.split(":")[1] if ":" in self.device else "0")

    def _image(self, sample: Sample) -> np.ndarray:
        """The shared input policy as 8-bit RGB (what the exporter writes and predict passes)."""
        return to_uint8(to_rgb(self.model_input(sample.image)))

    def _load(self, path: Path):
        """A local Ultralytics checkpoint, checked to be a segmentation model."""
        from ultralytics import YOLO

        try:
            model = YOLO(str(path), task="segment")
            task = getattr(model.model, "task", None) or model.task
            names = getattr(model.model, "yaml", {}).get("head", [[None, None, None]])[-1][2]
        except Exception as e:  # noqa: BLE001 - torch/pickle/key errors all mean "not a YOLO checkpoint"
            raise ValueError(f"weights file {path} is not an Ultralytics YOLO checkpoint "
                             f"({type(e).__name__}: {str(e)[:200]})") from None
        if "segment" not in str(names).lower():
            raise ValueError(f"weights file {path} holds a {task or names!r} model ({names}), not YOLO segmentation")
        return model

    # ---- training ----------------------------------------------------------------------------
    def train(self, train: Sequence[Sample], val: Sequence[Sample], ctx: FitContext) -> None:
        c: YoloSegConfig = self.cfg  # type: ignore[assignment]
        samples = [s for s in train if len(s.instances)]
        if not samples:
            raise ValueError("no training image has any instance")
        start = check_weights_file(c.weights)
        use_amp = amp_enabled(c, self.device, ctx)
        self._import(ctx.workdir, use_amp)
        from ultralytics import YOLO

        data = export_yolo_seg({"train": samples, "val": "train"}, ctx.workdir / "dataset", self.classes,
                               self._image)
        if data.skipped_masks:
            ctx.log(step=0, note=f"{data.skipped_masks} masks too small for a polygon were left out")
        model = self._load(start) if start else YOLO(c.model, task="segment")
        if model.task != "segment":
            raise ValueError(f"{c.model}: builds a {model.task!r} model, not segmentation")
        work = Path(ctx.workdir).resolve()  # a relative project would go under Ultralytics' runs_dir
        last = work / "yolo" / "weights" / "last.pt"
        if ctx.resumed_from:  # an interrupted fit: Ultralytics' own resume, from the kept last.pt
            last.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.resume.point.folder / "last.pt", last)  # type: ignore[union-attr]
            model = YOLO(str(last), task="segment")
            self._add_callbacks(model, ctx, c)
            model.train(resume=str(last), data=str(data.yaml_path.resolve()), device=self._device(),
                        workers=c.num_workers, plots=False, val=False, verbose=False)
        else:
            model = self._load(start) if start else YOLO(c.model, task="segment")
            if model.task != "segment":
                raise ValueError(f"{c.model}: builds a {model.task!r} model, not segmentation")
            self._add_callbacks(model, ctx, c)
            model.train(data=str(data.yaml_path.resolve()), project=str(work), name="yolo", exist_ok=True,
                        device=self._device(), amp=use_amp, seed=ctx.seed, deterministic=True, pretrained=False,
                        plots=False, val=False, save_period=-1, cache=False, verbose=False, patience=10 ** 6,
                        epochs=c.epochs, imgsz=c.imgsz, batch=c.batch_size, workers=c.num_workers,
                        optimizer={"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}[c.optimizer], lr0=c.lr,
                        momentum=c.momentum, weight_decay=c.weight_decay, warmup_epochs=c.warmup_epochs,
                        close_mosaic=c.close_mosaic, nbs=c.batch_size,  # one optimiser step per batch, as elsewhere
                        **_augmentation(c.augment))
        last = work / "yolo" / "weights" / "last.pt"
        if not last.is_file():
            raise FileNotFoundError(f"Ultralytics' trainer wrote no {last}")
        self.yolo = YOLO(str(last), task="segment")  # the last epoch's (EMA) weights, as saved: what save() keeps
        self._last = last

    def _add_callbacks(self, model, ctx: FitContext, c: YoloSegConfig) -> None:
        """Progress per batch and one shared-schema log record per epoch, from Ultralytics' callbacks;
        after each epoch's last.pt, a mid-training checkpoint when one is due (``checkpoint_every``)."""
        state = {"in_epoch": 0}

        def step(trainer) -> int:  # batches done since the fit began (a resumed fit starts at its epoch)
            return trainer.epoch * len(trainer.train_loader) + state["in_epoch"]

        def on_epoch_start(trainer):
            state["in_epoch"] = 0

        def on_batch_end(trainer):
            state["in_epoch"] += 1
            ctx.report(step(trainer), c.epochs * len(trainer.train_loader))

        def on_epoch_end(trainer):
            tloss = trainer.tloss  # running means of this epoch's losses: a dict (8.4) or a tensor (8.3)
            if isinstance(tloss, dict):
                parts = {str(k): float(v) for k, v in tloss.items()}
            else:
                parts = {str(k): float(v) for k, v in zip(trainer.loss_names, np.atleast_1d(
                    tloss.tolist() if tloss is not None else []))}
            ctx.log_step(step(trainer), loss=float(sum(parts.values())) if parts else None, parts=parts,
                         epoch=trainer.epoch + 1, lr=float(trainer.optimizer.param_groups[0]["lr"]))

        def on_model_save(trainer):  # last.pt of this epoch is written
            self.checkpoint_due(trainer.epoch + 1, c.epochs, ctx,
                                lambda folder: shutil.copyfile(trainer.last, folder / "last.pt"))

        model.add_callback("on_train_epoch_start", on_epoch_start)
        model.add_callback("on_train_batch_end", on_batch_end)
        model.add_callback("on_train_epoch_end", on_epoch_end)
        model.add_callback("on_model_save", on_model_save)

    # ---- inference -------------------------------------------------------------------------------
    def score_threshold(self) -> float | None:
        return float(self.cfg.conf)  # type: ignore[attr-defined]

    def predict(self, samples: Sequence[Sample]) -> list[Instances]:
        if self.yolo is None:
            raise RuntimeError("yolo-seg: fit() or load() first")
        c: YoloSegConfig = self.cfg  # type: ignore[assignment]
        out = []
        for s in samples:
            bgr = np.ascontiguousarray(self._image(s)[:, :, ::-1])  # Ultralytics reads numpy arrays as BGR
            r = self.yolo.predict(bgr, imgsz=c.imgsz, conf=self.predict_threshold(), iou=c.iou, max_det=c.max_det, retina_masks=True,
                                  device=self._device(), verbose=False)[0]
            out.append(self._to_instances(r, s.height, s.width))
        return out

    @staticmethod
    def _to_instances(r, h: int, w: int) -> Instances:
        if r.masks is None or len(r.boxes) == 0:
            return Instances.empty(h, w)
        masks = r.masks.data.cpu().numpy() > 0.5
        if masks.shape[1:] != (h, w):
            raise RuntimeError(f"Ultralytics returned {masks.shape[1:]} masks for a {h}x{w} image")
        return instances_from_masks(masks, r.boxes.xyxy.cpu().numpy(), r.boxes.conf.cpu().numpy(),
                                    r.boxes.cls.cpu().numpy().astype(np.int64), h, w)

    # ---- persistence --------------------------------------------------------------------------------
    def save_weights(self, directory: Path) -> None:
        shutil.copyfile(self._last, directory / WEIGHTS_FILE)

    def load_weights(self, directory: Path) -> None:
        import atexit
        import tempfile

        if self._config_dir is None:  # Ultralytics' settings, never the checkpoint folder; gone at exit
            self._config_dir = Path(tempfile.mkdtemp(prefix="cellbench-ultralytics-"))
            atexit.register(shutil.rmtree, self._config_dir, True)
        self._import(directory)
        self.yolo = self._load(directory / WEIGHTS_FILE)
        self._last = directory / WEIGHTS_FILE


def _augmentation(kind: str) -> dict:
    """Ultralytics' augmentation arguments for cellbench's none / default / extra."""
    if kind == "none":
        return dict(mosaic=0.0, fliplr=0.0, flipud=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, scale=0.0, translate=0.0,
                    degrees=0.0, mixup=0.0, erasing=0.0)
    if kind == "extra":
        return dict(flipud=0.5, degrees=10.0, mixup=0.1)
    return {}
