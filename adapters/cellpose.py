"""Cellpose 3 (``cellpose>=3.1,<4``): flows + cell probability, masks by following the flows.

Class-agnostic (classes -1), never overlapping (a label image), trained from scratch by
default with Cellpose's own ``cellpose.train.train_seg``; a local weights file
(``weights: /path/to/cyto3`` or a ``livecell_cp3`` file downloaded by the user) is
fine-tuned instead. Nothing is ever downloaded: the model is always built from
``pretrained_model=False`` or an existing local path, and every Cellpose call made
here runs with Cellpose's downloader disabled (:func:`_no_downloads`), so a code path
that would fetch ``cyto3`` or a size model fails loudly instead.

Choices worth knowing (all in :class:`CellposeConfig`):

* **Input.** The shared input policy (:mod:`bench.data.normalize`, the ``input_norm`` /
  ``input_percentiles`` options every model has), then grayscale by the channel mean
  (``to_gray``, what Cellpose's ``channels=[0, 0]`` does), handed to Cellpose as a 2-D
  image with ``channels=[0, 0]`` (second network channel all zeros) and Cellpose's own
  normalisation switched off, for training and prediction alike. Cellpose must not
  normalise again: 3.1's training path ignores the percentile settings of its
  ``normalize`` dict (``train._reshape_norm`` passes the dict as a bool), so letting it
  normalise could silently train and predict with different settings.
* **Labels.** Cellpose trains from label images, but the ground truth may overlap:
  each sample's label image comes from ``Instances.to_label_image()``, where a pixel
  claimed by several masks keeps the *earliest* mask (later masks never overwrite
  earlier ones). Flows are computed once per image (``dynamics.labels_to_flows``)
  before training, and ``train_seg`` is handed the precomputed flows.
* **Size.** ``diam_mean`` (the cell diameter the network works at) defaults to the
  median equivalent-circle diameter ``2*sqrt(area/pi)`` of all training masks; a
  weights file fixes it (a pretrained network only knows its own scale). With
  ``rescale`` (Cellpose's default) each training image is resized so its median cell
  diameter becomes ``diam_mean``, and at prediction every image is resized by
  ``diam_mean / diameter`` with ``diameter`` = the configured one or else the mean
  per-image diameter of the training labels (Cellpose's ``diam_labels``): there is no
  size model, so all test images get the same factor. The rescale factor is always
  passed explicitly, never left to Cellpose (whose default differs between a model
  fresh from ``train_seg`` and the same weights reloaded from a file).
* **Scores.** Cellpose gives no per-cell confidence; each instance's score is the mean
  cell probability (sigmoid of the cellprob output) over its mask, which ranks cells
  for COCO AP.

Per-epoch log records (``step`` = ``epoch``: Cellpose counts epochs): ``train_seg`` has no
callback and logs only every tenth epoch, and running it in chunks of epochs would restart
its learning-rate schedule (warm-up and decay are computed from ``n_epochs`` inside the
call), its optimiser state and its per-epoch seeds. So the whole schedule runs in one
``train_seg`` call and :func:`_loss_tap` temporarily wraps ``cellpose.train._loss_fn_seg``
(the module-level loss that ``train_seg`` looks up on every batch; restored afterwards,
even on error): training batches (gradients on) are summed into epochs, which are known
exactly since this adapter fixes the number of batches per epoch (``ceil(nimg_per_epoch /
batch_size)``, images with too few masks dropped beforehand); the test batches that
``train_seg`` evaluates on ``val`` every tenth epoch (gradients off) become ``val_loss``;
``lr`` is train_seg's schedule (:func:`_lr_schedule`). The wrapper only observes: it
returns the original loss unchanged. It patches a module attribute, so two Cellpose
trainings must not run in one process at the same time (the runner trains one model at a
time).

Seeds and cuDNN flags come from :class:`~bench.adapters.trainable.TrainableAdapter` (they seed
the network's initial weights; augmentations need no seed: ``train_seg`` reseeds numpy with
the epoch number at every epoch). A checkpoint is ``cellpose_net.pth`` plus the shared
``meta.json`` (its ``extra``: ``diam_mean``, ``diam_labels``, the Cellpose version).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

import numpy as np
from pydantic import Field, model_validator

from bench.adapters.base import AdapterConfig, Capabilities, FitContext, check_weights_file
from bench.adapters.registry import register
from bench.adapters.trainable import TrainableAdapter
from bench.data.normalize import to_gray
from bench.data.sample import Instances, Sample

_NET_FILE = "cellpose_net.pth"


class CellposeConfig(AdapterConfig):
    # ---- training: cellpose.train.train_seg (defaults = Cellpose's own training from scratch,
    #      i.e. `python -m cellpose --train` / the Cellpose paper: SGD, lr 0.2, 500 epochs, batch 8)
    epochs: int = Field(500, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(0.2, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)       # SGD only
    optimizer: Literal["sgd", "adamw"] = "sgd"       # adamw: train_seg's own default (lr ~0.005)
    bsize: int = Field(224, ge=32)                   # training crop = prediction tile size (Cellpose: 224)
    nimg_per_epoch: int | None = Field(None, ge=1)   # images per epoch (None: every training image once)
    min_train_masks: int = Field(5, ge=0)            # drop training images with fewer masks (Cellpose default; empty images always dropped)
    rescale: bool = True                             # resize training images to diam_mean (see module doc)
    scale_range: float | None = Field(None, ge=0, le=2)  # scale augmentation; None: 0.5 with rescale, else 1.0
    val_loss: bool = True                            # also compute train_seg's test loss on val (monitoring only)
    save_every: int = Field(100, ge=1)               # epochs between checkpoints in the workdir
    # ---- model
    diam_mean: float | None = Field(None, gt=0)      # px; None: median diameter of the training masks
    # ---- prediction: CellposeModel.eval
    diameter: float | None = Field(None, gt=0)       # px of cells in new images; None: training labels' mean
    flow_threshold: float = Field(0.4, ge=0)         # max flow error of a kept mask (Cellpose default)
    cellprob_threshold: float = 0.0                  # logit threshold for pixels that follow flows (default)
    # Cellpose's default min_size=15 px would drop real cells here: the smallest annotated
    # masks (small roundish `cort` cells cut by the image border, fragments of touching
    # cells) have 8-15 px, and the ground truth keeps masks down to 8 px. 8 keeps them;
    # the spurious fragments that also survive get low scores (mean cell probability).
    min_size: int = Field(8, ge=-1)
    max_size_fraction: float = Field(0.4, gt=0, le=1)  # drop masks larger than this fraction of the image
    niter: int | None = Field(None, ge=1)            # flow-following steps (None: 200 / rescale)
    tile_overlap: float = Field(0.1, ge=0, lt=1)
    # Cellpose's own test-time flips of its tiles (its eval(augment=)); cellbench's generic TTA is `tta`
    native_tta: bool = False

    @model_validator(mode="before")
    @classmethod
    def _legacy_tta(cls, values):
        """Before cellbench's generic ``tta``, ``tta: true/false`` was Cellpose's own flips: configs
        of older runs (job.json, checkpoints) still say so; they mean ``native_tta``."""
        if isinstance(values, dict) and isinstance(values.get("tta"), bool):
            values = {**values, "native_tta": values["tta"], "tta": "none"}
        return values

    @model_validator(mode="after")
    def _check(self) -> "CellposeConfig":
        if self.weights is not None and self.diam_mean is not None:
            raise ValueError("diam_mean cannot be set together with weights: a pretrained network works at the "
                             "diameter it was trained with (stored in the weights file)")
        return self


@register("cellpose")
class CellposeAdapter(TrainableAdapter):
    framework = "cellpose"
    framework_modules = ("cellpose.models", "cellpose.train")
    install_hint = 'pip install "cellpose>=3.1,<4"'
    capabilities = Capabilities(predicts_classes=False, overlapping_masks=False, trainable=True)
    Config = CellposeConfig
    warm_start_name = _NET_FILE
    framework_keys = {"epochs": "train_seg n_epochs", "lr": "train_seg learning_rate",
                      "batch_size": "train_seg batch_size", "weight_decay": "train_seg weight_decay",
                      "optimizer": "train_seg SGD=True (sgd) / False (adamw)",
                      "eval_every": "train_seg save_every + save_each snapshots, scored after training"}

    def __init__(self, cfg: AdapterConfig, classes: Sequence[str], device: str = "cpu"):
        super().__init__(cfg, classes, device)
        self._model = None            # cellpose.models.CellposeModel once trained or loaded
        self._diam_mean: float | None = None
        self._diam_labels: float | None = None

    # ---- training ------------------------------------------------------------
    def train(self, train: Sequence[Sample], val: Sequence[Sample], ctx: FitContext) -> None:
        c: CellposeConfig = self.cfg  # type: ignore[assignment]
        weights = check_weights_file(c.weights)  # before anything slow
        from cellpose import dynamics
        from cellpose import train as cp_train

        dev = self._torch_device()

        # images, label images, flows (computed once, here)
        imgs, labels, n_masks = [], [], []
        for s in train:
            lab = s.instances.to_label_image()
            imgs.append(self._prep(s.image))
            labels.append(lab)
            n_masks.append(len(np.unique(lab)) - (1 if (lab == 0).any() else 0))
        keep = [i for i, n in enumerate(n_masks) if n >= max(c.min_train_masks, 1)]
        if not keep:
            raise ValueError(f"no training image has at least {max(c.min_train_masks, 1)} masks "
                             f"({len(train)} images; lower min_train_masks)")
        imgs, labels = [imgs[i] for i in keep], [labels[i] for i in keep]
        areas = np.concatenate([train[i].instances.areas for i in keep]).astype(np.float64)
        diam_mean = c.diam_mean or float(np.median(2.0 * np.sqrt(areas[areas > 0] / np.pi)))

        with _no_downloads():
            flows = dynamics.labels_to_flows(labels, device=dev)
            val_imgs = val_flows = None
            if c.val_loss and val:
                vl = [s.instances.to_label_image() for s in val]
                vk = [i for i, lab in enumerate(vl) if lab.max() > 0]
                if vk:
                    val_imgs = [self._prep(val[i].image) for i in vk]
                    val_flows = dynamics.labels_to_flows([vl[i] for i in vk], device=dev)
            model = self._new_model(diam_mean=diam_mean, weights=weights)

        nimg = c.nimg_per_epoch or len(imgs)
        batches_per_epoch = math.ceil(nimg / c.batch_size)
        work = Path(ctx.workdir) / "cellpose"
        work.mkdir(parents=True, exist_ok=True)
        epochs = _EpochLogger(batches_per_epoch, _lr_schedule(c.lr, c.epochs), ctx)
        ctx.report(0, c.epochs)
        with _no_downloads(), _loss_tap(epochs.on_batch):
            cp_train.train_seg(
                model.net, train_data=imgs, train_labels=flows,
                test_data=val_imgs, test_labels=val_flows,
                channels=[0, 0], channel_axis=None, rgb=False,
                normalize={"normalize": False, "invert": False},  # done in _prep; a dict: no global mutation
                batch_size=c.batch_size, learning_rate=c.lr, n_epochs=c.epochs,
                weight_decay=c.weight_decay, momentum=c.momentum, SGD=c.optimizer == "sgd",
                nimg_per_epoch=c.nimg_per_epoch, rescale=c.rescale, scale_range=c.scale_range,
                bsize=c.bsize, min_train_masks=0,  # already filtered above (keeps the epoch count exact)
                save_path=str(work), model_name="cellpose_net",
                # a validation curve evaluates train_seg's own per-epoch snapshots after training
                # (train_seg has no hook between epochs; evaluating inside it would perturb nothing
                # but cannot be placed exactly after an epoch's last step)
                save_every=ctx.eval_every if ctx.curve_wanted else c.save_every,
                save_each=ctx.curve_wanted,
            )
        epochs.flush()
        model.net.eval()
        self._model = model
        self._diam_mean = float(model.net.diam_mean.item())
        self._diam_labels = float(model.net.diam_labels.item())  # set by train_seg: mean per-image diameter
        if ctx.curve_wanted:
            self._validation_curve(work / "models", c.epochs, ctx)

    def _validation_curve(self, models_dir: Path, n_epochs: int, ctx: FitContext) -> None:
        """Kaggle mAP of each snapshot ``cellpose_net_epoch_NNNN`` (saved after 0-based epoch NNNN,
        so NNNN+1 epochs done) and of the final network, in epoch order."""
        final = self._model
        snaps = sorted(models_dir.glob("cellpose_net_epoch_*"), key=lambda p: int(p.name.rsplit("_", 1)[1]))
        try:
            for snap in snaps:
                with _no_downloads():
                    m = self._new_model(diam_mean=self._diam_mean, weights=None)
                    m.net.load_model(str(snap), device=m.device)
                m.net.eval()
                self._model = m
                ctx.validate(int(snap.name.rsplit("_", 1)[1]) + 1, self.predict)
        finally:
            self._model = final
        ctx.validate(n_epochs, self.predict)

    # ---- prediction ----------------------------------------------------------
    def predict(self, samples: Sequence[Sample]) -> list[Instances]:
        if self._model is None:
            raise RuntimeError("cellpose: predict() before fit() or load()")
        from scipy import ndimage as ndi

        c: CellposeConfig = self.cfg  # type: ignore[assignment]
        out = []
        with _no_downloads():
            for s in samples:
                img = self._prep(s.image)
                masks, flows, _ = self._model.eval(
                    img, channels=[0, 0], channel_axis=None, z_axis=None,
                    normalize={"normalize": False, "invert": False},
                    rescale=self._rescale_factor(), diameter=None, resample=True,
                    flow_threshold=c.flow_threshold, cellprob_threshold=c.cellprob_threshold,
                    min_size=c.min_size, max_size_fraction=c.max_size_fraction, niter=c.niter,
                    augment=c.native_tta, tile_overlap=c.tile_overlap, batch_size=c.batch_size,
                    bsize=c.bsize,  # tiles as large as the training crops ("like in training", Cellpose docs)
                )
                masks = np.asarray(masks).reshape(img.shape).astype(np.int32)
                prob = 1.0 / (1.0 + np.exp(-np.asarray(flows[2], dtype=np.float64).reshape(img.shape)))
                n = int(masks.max())
                scores = np.asarray(ndi.mean(prob, labels=masks, index=np.arange(1, n + 1))) if n else np.zeros(0)
                self.keep_map(cellprob=prob)  # the cell probability map (raw cache only)
                out.append(Instances.from_label_image(masks, scores=scores))
        return out

    def _rescale_factor(self) -> float:
        c: CellposeConfig = self.cfg  # type: ignore[assignment]
        d = c.diameter if c.diameter else (self._diam_labels if c.rescale else self._diam_mean)
        return float(self._diam_mean / d)

    # ---- persistence ---------------------------------------------------------
    def save_weights(self, directory: Path) -> None:
        if self._model is None:
            raise RuntimeError("cellpose: save() before fit() or load()")
        self._model.net.save_model(str(directory / _NET_FILE))

    def checkpoint_extra(self) -> dict:
        import importlib.metadata

        return {"diam_mean": self._diam_mean, "diam_labels": self._diam_labels,
                "cellpose_version": importlib.metadata.version("cellpose")}

    def restore_extra(self, extra: dict) -> None:
        self._diam_mean, self._diam_labels = float(extra["diam_mean"]), float(extra["diam_labels"])

    def load_weights(self, directory: Path) -> None:
        net_file = check_weights_file(str(directory / _NET_FILE), "cellpose network")
        with _no_downloads():
            model = self._new_model(diam_mean=self._diam_mean, weights=None)
            model.net.load_model(str(net_file), device=model.device)
        model.net.eval()
        self._model = model

    # ---- helpers -------------------------------------------------------------
    def _torch_device(self):
        import torch

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("cellpose: device 'cuda' requested but torch sees no GPU")
        return torch.device(self.device)

    def _new_model(self, diam_mean: float, weights: Path | None):
        """A CellposeModel from scratch (``pretrained_model=False``) or from a local file.

        ``model_type`` stays None and a weights path is only passed once it exists, so
        Cellpose never resolves a model-zoo name (which would download). mkldnn is off:
        training and prediction then run the same plain-torch network on the CPU."""
        from cellpose import models

        dev = self._torch_device()
        return models.CellposeModel(gpu=dev.type == "cuda", pretrained_model=str(weights) if weights else False,
                                    model_type=None, mkldnn=False, diam_mean=diam_mean, device=dev, nchan=2)

    def _prep(self, image: np.ndarray) -> np.ndarray:
        """The shared input policy, then gray (channel mean): H x W float32 in [0, 1]."""
        return to_gray(self.model_input(image))


def _lr_schedule(lr: float, n_epochs: int) -> np.ndarray:
    """The learning rate of each epoch as ``train_seg`` (Cellpose 3.1) sets it: 10 epochs of linear
    warm-up from 0, constant, then halved 10 times over the last 100 (> 300 epochs) or 50 (> 100)."""
    sched = np.append(np.linspace(0, lr, 10), lr * np.ones(max(0, n_epochs - 10)))
    for over, span in ((300, 100), (100, 50)):
        if n_epochs > over:
            sched = sched[:-span]
            for _ in range(10):
                sched = np.append(sched, sched[-1] / 2 * np.ones(span // 10))
            break
    return sched[:n_epochs]  # fewer than 10 epochs: the first steps of the warm-up only


class _EpochLogger:
    """Turns per-batch losses from :func:`_loss_tap` into one shared-schema record per epoch."""

    def __init__(self, batches_per_epoch: int, lrs: np.ndarray, ctx: FitContext):
        self.per_epoch, self.lrs, self.ctx = batches_per_epoch, lrs, ctx
        self.batch = 0
        self.sum = self.n = 0.0
        self.val_sum = self.val_n = 0.0
        self.pending: tuple[int, float] | None = None

    def on_batch(self, loss: float, n: int, training: bool) -> None:
        if not training:  # train_seg's test loss on val, right after the epoch it belongs to
            self.val_sum += loss * n
            self.val_n += n
            return
        self.flush()
        self.batch += 1
        self.sum += loss * n
        self.n += n
        if self.batch % self.per_epoch == 0:
            self.pending = (self.batch // self.per_epoch, self.sum / max(self.n, 1))
            self.sum = self.n = 0.0

    def flush(self) -> None:
        if self.pending is None:
            return
        (epoch, loss), self.pending = self.pending, None
        val_loss = self.val_sum / self.val_n if self.val_n else None
        self.val_sum = self.val_n = 0.0
        self.ctx.log_step(epoch, loss=loss, epoch=epoch, lr=float(self.lrs[epoch - 1]), val_loss=val_loss)
        self.ctx.report(epoch, len(self.lrs), loss=round(loss, 4))


@contextlib.contextmanager
def _loss_tap(on_batch: Callable[[float, int, bool], None]) -> Iterator[None]:
    """Observe every loss ``train_seg`` computes: ``on_batch(loss, batch_len, training)``."""
    import torch
    from cellpose import train as cp_train

    original = cp_train._loss_fn_seg

    def tapped(lbl, y, device):
        loss = original(lbl, y, device)
        on_batch(float(loss.detach()), len(lbl), torch.is_grad_enabled())
        return loss

    cp_train._loss_fn_seg = tapped
    try:
        yield
    finally:
        cp_train._loss_fn_seg = original


@contextlib.contextmanager
def _no_downloads() -> Iterator[None]:
    """Make Cellpose's downloader fail instead of fetching weights (cellbench never downloads)."""
    from cellpose import utils as cp_utils

    original = cp_utils.download_url_to_file

    def refuse(url, dst, *args, **kwargs):
        raise RuntimeError(f"cellpose tried to download {url} to {dst}; cellbench never downloads weights: "
                           "download the file yourself and set weights=/its/local/path")

    cp_utils.download_url_to_file = refuse
    try:
        yield
    finally:
        cp_utils.download_url_to_file = original
