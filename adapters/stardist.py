"""StarDist 2D (``stardist``): star-convex polygons on TensorFlow, trained from scratch by default.

StarDist runs in its own environment, ``.venv-stardist`` (``make setup-stardist``; see
:mod:`bench.envs` for why): the adapter declares it and the runner starts its worker there.

Honest by construction: StarDist's ``train`` needs validation data, keeps the weights with the
best validation loss, and its ``optimize_thresholds`` fits the probability and NMS thresholds on
labelled images. Both get a holdout carved from the *training* split (``internal_val``), never
the benchmark's validation images. Scores per instance are StarDist's object probabilities.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from pydantic import Field, field_validator, model_validator

from bench.adapters.base import AdapterConfig, Capabilities, FitContext
from bench.adapters.registry import register
from bench.adapters.trainable import TrainableAdapter
from bench.data.normalize import to_gray
from bench.data.sample import Instances, Sample

MODEL_FOLDER = "stardist"       # inside a checkpoint: StarDist's own model folder (config.json, weights, thresholds)
WEIGHTS_FILE = "weights_final.h5"


class StarDistConfig(AdapterConfig):
    n_rays: int = Field(32, ge=3, le=256)            # rays per star-convex polygon (StarDist's default 32)
    grid: tuple[int, int] = (2, 2)                   # output subsampling; powers of two
    unet_n_depth: int = Field(3, ge=1, le=6)
    unet_n_filter_base: int = Field(32, ge=1)
    net_conv_after_unet: int = Field(128, ge=1)
    patch_size: tuple[int, int] = (256, 256)         # training crop (h, w); divisible by grid * 2**unet_n_depth
    epochs: int = Field(400, ge=1)
    steps_per_epoch: int = Field(100, ge=1)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(3e-4, gt=0)
    # none; default: random flips and 90-degree rotations (StarDist's example augmenter);
    # extra: + intensity x0.8-1.2 and shift +-0.1
    augment: Literal["none", "default", "extra"] = "default"
    foreground_only: float = Field(0.9, ge=0, le=1)  # share of patches drawn around objects
    # the holdout of the *training* split that StarDist's train() validates on (best weights) and
    # optimize_thresholds fits on; 0: the training images themselves
    internal_val: float = Field(0.15, ge=0, lt=1)
    optimize_thresholds: bool = False
    prob_thresh: float = Field(0.5, gt=0, lt=1)      # StarDist's defaults, used unless optimised
    nms_thresh: float = Field(0.4, ge=0, le=1)

    @field_validator("grid")
    @classmethod
    def _powers_of_two(cls, v: tuple[int, int]) -> tuple[int, int]:
        if any(g < 1 or g & (g - 1) for g in v):
            raise ValueError(f"grid entries must be powers of two (1, 2, 4, ...), got {list(v)}")
        return v

    @model_validator(mode="after")
    def _patch_fits_network(self) -> "StarDistConfig":
        """StarDist's U-Net halves the patch ``unet_n_depth`` times after the grid's subsampling."""
        for p, g in zip(self.patch_size, self.grid):
            div = g * 2 ** self.unet_n_depth
            if p < div or p % div:
                raise ValueError(f"patch_size {list(self.patch_size)} must be a multiple of grid x 2**unet_n_depth "
                                 f"= {g} x {2 ** self.unet_n_depth} = {div} along each axis")
        return self


@register("stardist")
class StarDist(TrainableAdapter):
    framework = "stardist"
    framework_modules = ("tensorflow", "stardist.models")
    install_hint = "make setup-stardist (its own environment .venv-stardist: tensorflow-cpu==2.15.1, stardist 0.9)"
    environment = "stardist"
    capabilities = Capabilities(predicts_classes=False, overlapping_masks=False)
    Config = StarDistConfig
    warm_start_name = MODEL_FOLDER
    framework_keys = {"epochs": "train(epochs=)", "steps_per_epoch": "train(steps_per_epoch=)",
                      "patch_size": "Config2D.train_patch_size", "lr": "Config2D.train_learning_rate (Adam)",
                      "batch_size": "Config2D.train_batch_size", "augment": "train(augmenter=)",
                      "eval_every": "keras callback (epochs)"}

    def __init__(self, cfg, classes, device="cpu"):
        super().__init__(cfg, classes, device)
        self.model = None
        self.thresholds: dict | None = None

    # ---- framework set-up ---------------------------------------------------------------
    def _tf(self):
        """TensorFlow, quiet, on this adapter's device, with OMP_NUM_THREADS threads when set."""
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            index = int(self.device.split(":")[1]) if self.device.startswith("cuda:") else 0
            try:
                tf.config.set_visible_devices([gpus[index]] if self.device.startswith("cuda") else [], "GPU")
            except RuntimeError:  # already initialised in this process (a second adapter): keep it
                pass
        threads = os.environ.get("OMP_NUM_THREADS")
        if threads and threads.isdigit():
            try:
                tf.config.threading.set_intra_op_parallelism_threads(int(threads))
                tf.config.threading.set_inter_op_parallelism_threads(int(threads))
            except RuntimeError:
                pass
        return tf

    def _image(self, image: np.ndarray) -> np.ndarray:
        """The shared input policy, made grey: StarDist's 2-D single-channel input."""
        return to_gray(self.model_input(image)).astype(np.float32)

    def _new_model(self, workdir: Path, start: dict | None):
        """A fresh StarDist2D in ``workdir`` from the config, or from ``start`` (a weights folder's config)."""
        from stardist.models import Config2D, StarDist2D

        c: StarDistConfig = self.cfg  # type: ignore[assignment]
        train = dict(train_patch_size=tuple(c.patch_size), train_batch_size=c.batch_size,
                     train_learning_rate=c.lr, train_epochs=c.epochs, train_steps_per_epoch=c.steps_per_epoch,
                     train_foreground_only=c.foreground_only, train_tensorboard=False,
                     use_gpu=False)  # use_gpu is gputools (OpenCL) data generation, not TensorFlow's GPU
        if start is None:
            conf = Config2D(n_rays=c.n_rays, grid=tuple(c.grid), n_channel_in=1, unet_n_depth=c.unet_n_depth,
                            unet_n_filter_base=c.unet_n_filter_base, net_conv_after_unet=c.net_conv_after_unet,
                            **train)
        else:  # the architecture is the weights folder's; training follows this config
            conf = Config2D(**{**start, **train})
        return StarDist2D(conf, name=MODEL_FOLDER, basedir=str(workdir))

    # ---- training ------------------------------------------------------------------------------
    def train(self, train: Sequence[Sample], val: Sequence[Sample], ctx: FitContext) -> None:
        c: StarDistConfig = self.cfg  # type: ignore[assignment]
        samples = [s for s in train if len(s.instances)]
        if not samples:
            raise ValueError("no training image has any instance")
        small = [s for s in samples if s.height < c.patch_size[0] or s.width < c.patch_size[1]]
        if small:
            raise ValueError(f"stardist: patch_size {list(c.patch_size)} (h, w) is larger than {len(small)} training "
                             f"image(s), e.g. {small[0].image_id} ({small[0].height}x{small[0].width}): "
                             "give a smaller patch_size")
        start = self._weights_config(c.weights) if c.weights else None
        tf = self._tf()
        tf.random.set_seed(ctx.seed)
        X = [self._image(s.image) for s in samples]
        Y = [s.instances.to_label_image() for s in samples]
        fit_idx, hold_idx = self._holdout(len(samples), c.internal_val, ctx.seed)
        self.model = self._new_model(ctx.workdir, start)
        if start is not None:
            self.model.keras_model.load_weights(str(self._weights_h5(Path(c.weights))))
            if (start.get("n_rays"), list(start.get("grid", []))) != (c.n_rays, list(c.grid)):
                ctx.log(step=0, note=f"weights folder's architecture used: n_rays={start.get('n_rays')}, "
                                     f"grid={start.get('grid')} (the config's n_rays/grid are ignored)")
        self.model.prepare_for_training()
        self.model.callbacks.append(self._callback(ctx, c))
        self.model.train([X[i] for i in fit_idx], [Y[i] for i in fit_idx],
                         validation_data=([X[i] for i in hold_idx], [Y[i] for i in hold_idx]),
                         augmenter=_augmenter(c.augment), seed=ctx.seed, epochs=c.epochs,
                         steps_per_epoch=c.steps_per_epoch)
        self.thresholds = {"prob": c.prob_thresh, "nms": c.nms_thresh, "fitted_on": None}
        if c.optimize_thresholds:
            self._optimize([X[i] for i in hold_idx], [Y[i] for i in hold_idx], ctx,
                           "training images (internal_val=0)" if not c.internal_val else
                           f"{len(hold_idx)} held-out training images (internal_val={c.internal_val})")

    @staticmethod
    def _holdout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
        """Indices to train on and to validate on, both from the training split."""
        if fraction <= 0 or n < 2:
            return list(range(n)), list(range(n))
        order = np.random.default_rng(seed).permutation(n)
        k = min(n - 1, max(1, int(round(fraction * n))))
        return sorted(order[k:].tolist()), sorted(order[:k].tolist())

    def _optimize(self, X: list, Y: list, ctx: FitContext, where: str) -> None:
        """StarDist's own threshold search, on training-split images only."""
        found = self.model.optimize_thresholds(X, Y, save_to_json=False,
                                               predict_kwargs={"show_tile_progress": False, "verbose": False})
        self.thresholds = {"prob": float(found["prob"]), "nms": float(found["nms"]), "fitted_on": where}
        ctx.log(step=0, note=f"optimize_thresholds on {where}: prob={found['prob']:.4f}, nms={found['nms']}")

    def _callback(self, ctx: FitContext, c: StarDistConfig):
        """A Keras callback: progress per step, one shared-schema log record and the curve hook per epoch."""
        import tensorflow as tf

        adapter, total = self, c.epochs * c.steps_per_epoch

        class Hooks(tf.keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.step = 0

            def on_train_batch_end(self, batch, logs=None):
                self.step += 1
                ctx.report(self.step, total, loss=float((logs or {}).get("loss", float("nan"))))

            def on_epoch_end(self, epoch, logs=None):
                logs = dict(logs or {})
                lr = float(tf.keras.backend.get_value(self.model.optimizer.learning_rate))
                ctx.log_step(self.step, loss=logs.pop("loss", None), epoch=epoch + 1, lr=lr,
                             parts={k: float(v) for k, v in logs.items() if k != "lr"})
                if ctx.validation_due(epoch + 1, c.epochs):
                    ctx.validate(epoch + 1, adapter.predict)

        return Hooks()

    # ---- weights folders ------------------------------------------------------------------------
    @staticmethod
    def _weights_h5(folder: Path) -> Path:
        found = sorted(folder.glob("*.h5"))
        if not found:
            raise FileNotFoundError(f"StarDist weights folder {folder} holds no weights (*.h5)")
        best = [p for p in found if p.name == WEIGHTS_FILE] or [p for p in found if "best" in p.name] or found
        return best[0]

    def _weights_config(self, weights: str) -> dict:
        """The config.json of a local StarDist 2D model folder (cellbench never downloads one)."""
        folder = Path(weights).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"stardist weights {folder} must be a local StarDist model folder (config.json "
                                    "+ *.h5), not " + ("a file" if folder.exists() else "a missing path"))
        path = folder / "config.json"
        try:
            conf = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a StarDist model folder ({e})") from None
        if not isinstance(conf, dict) or "n_rays" not in conf or conf.get("n_dim") != 2:
            raise ValueError(f"{path}: not a StarDist 2D model config (n_dim={conf.get('n_dim') if isinstance(conf, dict) else '?'}, "
                             f"n_rays={'present' if isinstance(conf, dict) and 'n_rays' in conf else 'missing'})")
        if conf.get("n_channel_in", 1) != 1 or conf.get("n_classes"):
            raise ValueError(f"{path}: a StarDist model with {conf.get('n_channel_in')} input channels / "
                             f"{conf.get('n_classes')} classes; cellbench's StarDist is grey, class-agnostic")
        self._weights_h5(folder)
        return {k: v for k, v in conf.items() if k not in ("n_dim", "n_channel_out")}

    # ---- inference ---------------------------------------------------------------------------------
    def score_threshold(self) -> float | None:
        return float((self.thresholds or {"prob": self.cfg.prob_thresh})["prob"])  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def _prob_spy(self):
        """While raw maps are captured: the probability map of the network call StarDist makes anyway
        (its sparse prediction keeps only the points above the threshold; a second call would double
        the inference time). StarDist pads at the bottom and right only, so a crop undoes it."""
        seen: list = []
        if self.raw_maps is None:
            yield seen
            return
        km = self.model.keras_model
        original = km.predict

        def spy(*args, **kwargs):
            ys = original(*args, **kwargs)
            seen.append(np.asarray(ys[0])[0, ..., 0])
            return ys

        km.predict = spy
        try:
            yield seen
        finally:
            km.predict = original

    def predict(self, samples: Sequence[Sample]) -> list[Instances]:
        if self.model is None:
            raise RuntimeError("stardist: fit() or load() first")
        t = self.thresholds or {"prob": self.cfg.prob_thresh, "nms": self.cfg.nms_thresh}
        out = []
        for s in samples:
            with self._prob_spy() as seen:
                labels, details = self.model.predict_instances(self._image(s.image), prob_thresh=self.predict_threshold(),
                                                               nms_thresh=t["nms"], verbose=False,
                                                               show_tile_progress=False)
            if len(seen) == 1:  # the object probability map, at StarDist's grid resolution (raw cache only)
                gy, gx = self.model.config.grid
                self.keep_map(object_prob=seen[0][:-(-s.height // gy), :-(-s.width // gx)])
            # label k is polygon k-1 (StarDist keeps the order); its score is that polygon's probability
            out.append(Instances.from_label_image(labels.astype(np.int64), scores=np.asarray(details["prob"])))
        return out

    # ---- persistence -----------------------------------------------------------------------------
    def save_weights(self, directory: Path) -> None:
        folder = directory / MODEL_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        conf = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self.model.config).items()}
        (folder / "config.json").write_text(json.dumps(conf, indent=1))
        (folder / "thresholds.json").write_text(json.dumps({"prob": self.thresholds["prob"],
                                                            "nms": self.thresholds["nms"]}))
        self.model.keras_model.save_weights(str(folder / WEIGHTS_FILE))

    def checkpoint_extra(self) -> dict:
        return {"thresholds": self.thresholds}

    def restore_extra(self, extra: dict) -> None:
        self.thresholds = extra.get("thresholds")

    def load_weights(self, directory: Path) -> None:
        from stardist.models import Config2D, StarDist2D

        self._tf()
        folder = directory / MODEL_FOLDER
        conf = self._weights_config(str(folder))
        self.model = StarDist2D(Config2D(**conf), name=None, basedir=None)  # in memory: writes nothing
        self.model.keras_model.load_weights(str(folder / WEIGHTS_FILE))


def _augmenter(kind: str):
    """StarDist's example augmenter (flips, 90-degree rotations), applied to image and labels alike."""
    if kind == "none":
        return None

    def augment(x: np.ndarray, y: np.ndarray):
        k = np.random.randint(4)
        x, y = np.rot90(x, k), np.rot90(y, k)
        for axis in (0, 1):
            if np.random.rand() < 0.5:
                x, y = np.flip(x, axis), np.flip(y, axis)
        if kind == "extra":
            x = x * np.random.uniform(0.8, 1.2) + np.random.uniform(-0.1, 0.1)
        return np.ascontiguousarray(x), np.ascontiguousarray(y)

    return augment
