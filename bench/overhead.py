"""``python -m bench.overhead``: what cellbench's harness costs, measured against each framework's own loop.

For every trainable adapter, on the same tiny synthetic data and the same config values:

* **training s/iter**: ``adapter.fit`` through cellbench vs the framework's own plain training —
  torchvision: a reference-style loop (``references/detection/engine.py``: a COCO dataset decoded
  in ``__getitem__``, ``model(images, targets)``, summed losses, backward, optimiser step);
  MMDetection: ``Runner.from_cfg(cfg).train()`` on mmdet's ``CocoDataset``; Detectron2:
  ``DefaultTrainer`` (``train_net``-style) with its own ``DatasetMapper`` loader on a registered
  COCO json; Cellpose: ``cellpose.train.train_seg`` called directly;
* **inference ms/img**: ``adapter.predict`` vs the framework's own predictor on the same weights
  (the cellbench-trained checkpoint): torchvision ``model.eval()(images)``,
  ``mmdet.apis.inference_detector``, ``detectron2.engine.DefaultPredictor``, ``CellposeModel.eval``.

Timing. Both sides of a pair run in the same process, alternately (A, B, A, B, ...), with the
same thread count (``--threads``, default 1: ``OMP_NUM_THREADS`` and ``torch.set_num_threads``).
Training time is read from per-iteration clock ticks (cellbench: the ``FitContext`` progress
callback; native: a hook / the loop itself; Cellpose both sides: a tap on ``train_seg``'s
per-batch loss function), skipping the first ``--warmup`` iterations and the last one (where
frameworks write their final checkpoint), so model building, data conversion and start-up are
not counted on either side. Inference is timed after one warm-up image per side. On CUDA every
tick synchronises first. Each figure is the median over ``--reps`` repetitions (inference: twice as
many, a repetition being only a few images), the ratio the
median of the per-pair ratios (cellbench / native).

Config values come from the adapter's config class at run time (the ``smoke`` preset plus a few
overrides resolved by name: iterations/epochs, workers, warm-up, score threshold and detection
cap, image size), so a renamed key is picked up by whichever of its spellings exists. For
inference the score threshold is 0 and the detection cap fixed, so both sides return the same
number of detections from the same weights whatever their input scaling.

Each adapter runs in its own subprocess (frameworks' global state stays apart); a framework
that is not installed is skipped with its reason. Writes ``results/bench/overhead.json``
(machine, git commit, settings, every repetition).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ADAPTERS = ("maskrcnn-tv", "cellpose", "cascade", "maskrcnn")
DEFAULT_OUT = REPO / "results" / "bench" / "overhead.json"
TARGET = 1.05

# one concept, its possible spellings in an adapter config (the first that exists is used)
CONCEPTS: dict[str, tuple[str, ...]] = {
    "iterations": ("iterations", "max_iters", "max_iter"),
    "epochs": ("epochs", "n_epochs"),
    "batch_size": ("batch_size", "ims_per_batch"),
    "lr": ("lr", "base_lr", "learning_rate"),
    "lr_gamma": ("lr_gamma", "gamma"),
    "lr_steps": ("lr_steps", "steps"),
    "warmup_iters": ("warmup_iters",),
    "num_workers": ("num_workers",),
    "eval_every": ("eval_every",),
    "grad_clip": ("grad_clip", "clip_gradients"),
    "optimizer": ("optimizer",),
    "momentum": ("momentum",),
    "weight_decay": ("weight_decay",),
    "amp": ("amp",),
    "augment": ("augment",),
    "score_thresh": ("box_score_thresh", "score_thresh_test", "score_thr"),
    "detections": ("detections_per_image", "max_per_img"),
}


def fields_of(config_cls) -> set[str]:
    return set(getattr(config_cls, "model_fields", {}) or {})


def key_for(config_cls, concept: str) -> str | None:
    """The field name the config class uses for ``concept`` (None: the model has no such knob)."""
    names = CONCEPTS.get(concept, (concept,))
    have = fields_of(config_cls)
    return next((n for n in names if n in have), None)


def get(cfg, concept: str, default: Any = None) -> Any:
    k = key_for(type(cfg), concept)
    return getattr(cfg, k) if k is not None else default


def _first(cfg, *names: str, default: Any = None) -> Any:
    for n in names:
        if n in fields_of(type(cfg)):
            return getattr(cfg, n)
    return default


# ---------------------------------------------------------------------------
# clocks, devices
# ---------------------------------------------------------------------------

def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


class Clock:
    """Per-iteration ticks: ``tick(done)`` after iteration ``done`` (1-based) has finished.

    Optionally snapshots a model's parameters at the first tick, so that ``changed()`` can tell
    whether training moved them after that (a proof that the side really trained)."""

    def __init__(self, device: str):
        self.device = device
        self.at: dict[int, float] = {}
        self.first_params: list | None = None
        self.module_at_first = None

    def tick(self, done: int, module=None) -> None:
        sync(self.device)
        t = time.perf_counter()
        if done >= 1:
            self.at[int(done)] = t
        if self.first_params is None and module is not None:
            self.module_at_first = module
            self.first_params = [p.detach().clone() for p in module.parameters()]

    def per_iter(self, warmup: int, total: int) -> dict:
        """Mean s/iter over iterations warmup+1 .. total-1 (the last one excluded), and the median
        of the single-iteration intervals there."""
        lo = max(warmup, 1)
        hi = total - 1 if total - 1 > lo else total  # the last iteration only when nothing else is left
        done = sorted(d for d in self.at if lo <= d <= hi)
        if len(done) < 2:
            raise RuntimeError(f"too few clock ticks to time (got iterations {sorted(self.at)}; need "
                               f"{warmup}..{total - 1}): more iterations or a smaller --warmup")
        t = [self.at[d] for d in done]
        steps = np.diff(done)
        gaps = np.diff(t) / steps
        return {"s_per_iter": (t[-1] - t[0]) / (done[-1] - done[0]), "median_iter_s": float(np.median(gaps)),
                "iterations_timed": int(done[-1] - done[0])}

    def changed(self, module=None) -> bool | None:
        """Whether the parameters differ from the first tick's snapshot (None: no snapshot)."""
        module = module if module is not None else self.module_at_first
        if self.first_params is None or module is None:
            return None
        now = list(module.parameters())
        if len(now) != len(self.first_params):
            return True
        return any(not bool((a.detach().cpu() == b.cpu()).all()) for a, b in zip(now, self.first_params))


def find_module(obj, depth: int = 2):
    """The torch network an adapter holds (``model``, ``_model.net``, ...), or None."""
    try:
        from torch import nn
    except ImportError:
        return None
    if isinstance(obj, nn.Module):
        return obj
    if depth <= 0 or obj is None:
        return None
    for name in ("model", "_model", "net", "network", "module"):
        found = find_module(getattr(obj, name, None), depth - 1)
        if found is not None:
            return found
    for v in list(getattr(obj, "__dict__", {}).values()):
        if isinstance(v, nn.Module):
            return v
    return None


@contextlib.contextmanager
def quiet(log_path: Path):
    """Framework chatter (loggers, progress prints) into a file instead of the console."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


# ---------------------------------------------------------------------------
# data: tiny synthetic images, as cellbench samples and as a COCO json + PNGs
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Data:
    train: list
    test: list
    classes: list[str]
    coco_dir: Path          # train.json + the PNGs it names (file_name relative to coco_dir)
    image_hw: tuple[int, int]


def make_data(root: Path, n_train: int, n_test: int, size: tuple[int, int], seed: int) -> Data:
    from bench.data.io import read_sartorius
    from bench.data.synth import generate

    syn = root / "synth"
    generate(syn, n_images=n_train + n_test, size=size, seed=seed)
    ds = read_sartorius(syn)
    samples = [dataclasses.replace(s, _image=np.asarray(s.image)) for s in ds.samples]  # in memory, both sides
    with_masks = [s for s in samples if len(s.instances)]
    train, test = with_masks[:n_train], with_masks[n_train:n_train + n_test] or with_masks[:n_test]
    coco = root / "coco"
    write_coco(train, list(ds.classes), coco)
    return Data(train, test, list(ds.classes), coco, (train[0].height, train[0].width))


def write_coco(samples: Sequence, classes: Sequence[str], out: Path) -> Path:
    """COCO instances json (compressed RLE) + 8-bit PNGs: what every framework's own loader reads."""
    from PIL import Image

    from bench.data import rle

    (out / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for k, s in enumerate(samples):
        img = np.asarray(s.image)
        if img.dtype != np.uint8:
            img = np.clip(img.astype(np.float64) * 255.0 / max(float(img.max()), 1.0), 0, 255).astype(np.uint8)
        name = f"images/{k:05d}.png"
        Image.fromarray(img).save(out / name)
        images.append({"id": k + 1, "file_name": name, "height": s.height, "width": s.width})
        inst = s.instances
        boxes, areas = inst.boxes_xywh(), inst.areas
        for j in range(len(inst)):
            if areas[j] == 0 or boxes[j, 2] <= 0 or boxes[j, 3] <= 0:
                continue
            cl = int(inst.classes[j]) if int(inst.classes[j]) >= 0 else 0
            anns.append({"id": len(anns) + 1, "image_id": k + 1, "category_id": cl + 1, "iscrowd": 0,
                         "area": int(areas[j]), "bbox": [float(v) for v in boxes[j]],
                         "segmentation": rle.to_coco_rle(inst.counts[j], s.height, s.width)})
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(classes or ["cell"])]
    path = out / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def gray3(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = np.clip(img.astype(np.float64) * 255.0 / max(float(img.max()), 1.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(img[:, :, None], 3, axis=2) if img.ndim == 2 else img[:, :, :3])


# ---------------------------------------------------------------------------
# the frameworks' own side
# ---------------------------------------------------------------------------

class Native:
    """One framework's plain training and predictor. Subclasses fill in the framework parts."""

    adapter: str
    modules: tuple[str, ...] = ()      # the native side's imports (checked before anything runs)
    unit = "iteration"
    iterations = 10                    # default per side and repetition (--iterations overrides)

    def available(self) -> str | None:
        """None when the framework imports here, else why not."""
        import importlib

        for m in self.modules:
            try:
                importlib.import_module(m)
            except Exception as e:  # noqa: BLE001 (ImportError or a broken compiled extension)
                return f"{m} not importable ({type(e).__name__}: {e})"
        return None

    def overrides(self, config_cls, data: Data, n_iter: int, base=None) -> dict:
        """Config values for the measurement, by concept, resolved against ``config_cls``."""
        want = {"iterations": n_iter, "warmup_iters": 2, "lr_steps": [], "num_workers": 0, "eval_every": 0,
                "score_thresh": 0.0, "detections": 100}
        want.update(self.size_overrides(data))
        out = {}
        for concept, value in want.items():
            k = key_for(config_cls, concept) if concept in CONCEPTS else (concept if concept in fields_of(config_cls)
                                                                        else None)
            if k is not None:
                out[k] = value
        return out

    def size_overrides(self, data: Data) -> dict:
        return {}

    @contextlib.contextmanager
    def batch_tap(self, clock: Clock | None):
        """Per-batch ticks from inside the framework (Cellpose); the others tick from hooks."""
        yield False

    def train(self, cfg, data: Data, device: str, seed: int, work: Path, clock: Clock, cb_work: Path) -> dict:
        raise NotImplementedError

    def predictor(self, cfg, adapter, ckpt: Path, data: Data, device: str, cb_work: Path) -> Callable:
        """A function image -> number of detections, the framework's own predictor on ``ckpt``'s weights."""
        raise NotImplementedError


def _load_state(path: Path) -> dict:
    import torch

    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict):
        for k in ("model", "state_dict"):
            if isinstance(sd.get(k), dict):
                return sd[k]
    return sd


def _json_value(folder: Path, key: str):
    """The first value of ``key`` in any json file of ``folder`` (searched recursively)."""
    def walk(o):
        if isinstance(o, dict):
            if key in o and o[key] is not None:
                return o[key]
            for v in o.values():
                r = walk(v)
                if r is not None:
                    return r
        return None

    for p in sorted(Path(folder).rglob("*.json")):
        try:
            r = walk(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
        if r is not None:
            return r
    return None


# ---- torchvision ----------------------------------------------------------

class TorchvisionNative(Native):
    adapter = "maskrcnn-tv"
    modules = ("torch", "torchvision", "torchvision.models.detection", "pycocotools.mask")

    def size_overrides(self, data):
        h, w = data.image_hw
        return {"min_size": min(h, w), "max_size": max(h, w), "min_size_train": None}

    @staticmethod
    def build(c, n_classes: int, mean: float, std: float):
        """The adapter's own network builder (torchvision's public API): both sides train one network."""
        from bench.adapters.torchvision_maskrcnn import build_network

        return build_network(c, n_classes, mean, std)

    @staticmethod
    def stats(data: Data) -> tuple[float, float]:
        v = np.concatenate([np.asarray(s.image, dtype=np.float32).ravel() / 255.0 for s in data.train])
        return float(v.mean()), float(max(v.std(), 1e-3))

    def train(self, cfg, data, device, seed, work, clock, cb_work):
        import torch
        from pycocotools import mask as mask_util
        from PIL import Image

        c = cfg
        torch.manual_seed(seed)
        mean, std = self.stats(data)
        model = self.build(c, len(data.classes), mean, std).to(device)
        flip = get(c, "augment", "none") != "none"
        doc = json.loads((data.coco_dir / "train.json").read_text())
        by_img: dict[int, list] = {}
        for a in doc["annotations"]:
            by_img.setdefault(a["image_id"], []).append(a)
        images = [im for im in doc["images"] if by_img.get(im["id"])]  # the references drop empty images

        class CocoMasks(torch.utils.data.Dataset):
            """references/detection/coco_utils.py: image from disk, masks decoded per item, flip."""

            def __len__(self):
                return len(images)

            def __getitem__(self, i):
                info = images[i]
                img = Image.open(data.coco_dir / info["file_name"]).convert("RGB")
                img = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div_(255.0)
                anns = by_img[info["id"]]
                masks = torch.from_numpy(np.stack([mask_util.decode(a["segmentation"]) for a in anns]))
                boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                       a["bbox"][1] + a["bbox"][3]] for a in anns], dtype=torch.float32)
                labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
                if flip and torch.rand(1).item() < 0.5:  # RandomHorizontalFlip(0.5)
                    w = img.shape[-1]
                    img, masks = img.flip(-1), masks.flip(-1)
                    boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
                return img, {"boxes": boxes, "labels": labels, "masks": masks}

        g = torch.Generator().manual_seed(seed)
        bs = get(c, "batch_size")
        loader = torch.utils.data.DataLoader(
            CocoMasks(), batch_sampler=torch.utils.data.BatchSampler(
                torch.utils.data.RandomSampler(range(len(images)), generator=g), bs, drop_last=True),
            num_workers=get(c, "num_workers", 0) or 0, collate_fn=lambda b: tuple(zip(*b)))
        params = [p for p in model.parameters() if p.requires_grad]
        lr, wd = get(c, "lr"), get(c, "weight_decay", 0.0)
        if get(c, "optimizer", "sgd") == "adam":
            opt = torch.optim.Adam(params, lr=lr, weight_decay=wd)
        else:
            opt = torch.optim.SGD(params, lr=lr, momentum=get(c, "momentum", 0.9), weight_decay=wd)
        warm, steps, gamma = get(c, "warmup_iters", 0) or 0, get(c, "lr_steps", []) or [], get(c, "lr_gamma", 0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda it: min(1.0, (it + 1) / max(warm, 1)) * gamma ** sum(it >= s for s in steps))
        use_amp = bool(get(c, "amp", False)) and str(device).startswith("cuda")
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        clip = get(c, "grad_clip")
        total = get(c, "iterations")
        model.train()
        it, losses_ok = 0, True
        while it < total:
            for imgs, targets in loader:
                imgs = [i.to(device) for i in imgs]
                targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
                with torch.autocast("cuda", enabled=use_amp):
                    loss_dict = model(imgs, targets)
                    loss = sum(loss_dict.values())
                value = loss.item()
                if not math.isfinite(value):
                    losses_ok = False
                    raise FloatingPointError(f"native torchvision loss is {value} at iteration {it}")
                opt.zero_grad()
                scaler.scale(loss).backward()
                if clip:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params, clip)
                scaler.step(opt)
                scaler.update()
                sched.step()
                it += 1
                clock.tick(it, model)
                if it >= total:
                    break
        return {"params_changed": clock.changed(model), "losses_finite": losses_ok,
                "n_params": sum(p.numel() for p in model.parameters())}

    def predictor(self, cfg, adapter, ckpt, data, device, cb_work):
        import torch

        mean = _json_value(ckpt, "pixel_mean")
        std = _json_value(ckpt, "pixel_std")
        if not isinstance(mean, (int, float)) or not isinstance(std, (int, float)):
            mean, std = self.stats(data)
        model = self.build(cfg, len(data.classes), float(mean), float(std))
        model.load_state_dict(_load_state(type(adapter).warm_start_file(ckpt)))
        model.to(device).eval()

        def run(image: np.ndarray) -> int:
            t = torch.from_numpy(gray3(image)).permute(2, 0, 1).float().div_(255.0)  # F.to_tensor
            with torch.inference_mode():
                out = model([t.to(device)])[0]
            return int(len(out["scores"]))

        return run


# ---- Cellpose -------------------------------------------------------------

class CellposeNative(Native):
    adapter = "cellpose"
    modules = ("torch", "cellpose.models", "cellpose.train")
    unit = "batch"
    iterations = 6                     # a batch of 8 crops: seconds each on one CPU thread

    def overrides(self, config_cls, data, n_iter, base=None):
        # one batch per epoch (nimg_per_epoch = batch size): epochs = optimiser steps, so that warm-up
        # and timing count the same steps on both sides
        out = super().overrides(config_cls, data, n_iter, base)
        k = key_for(config_cls, "epochs")
        if k:
            out[k] = n_iter
        # a network trained for a few batches has no confident cell pixels: a low cell-probability
        # threshold and no flow-error check make prediction follow the flows and build masks, so that
        # both sides pay for mask creation (the realistic case) rather than for an empty image
        for name, value in (("nimg_per_epoch", get(base, "batch_size", 8) if base is not None else 8),
                            ("min_train_masks", 1), ("val_loss", False), ("save_every", 10 ** 6),
                            ("cellprob_threshold", -20.0), ("flow_threshold", 0.0)):
            if name in fields_of(config_cls):
                out[name] = value
        return out

    @contextlib.contextmanager
    def batch_tap(self, clock):
        """Tick at every training batch's loss (train_seg has no callback; works on both sides)."""
        import torch
        from cellpose import train as cp_train

        original = cp_train._loss_fn_seg
        state = {"n": 0}

        def tapped(lbl, y, device):
            loss = original(lbl, y, device)
            if clock is not None and torch.is_grad_enabled():
                state["n"] += 1
                clock.tick(state["n"])
            return loss

        cp_train._loss_fn_seg = tapped
        try:
            yield True
        finally:
            cp_train._loss_fn_seg = original

    @staticmethod
    def _model(device: str, diam_mean: float, weights: Path | None = None):
        import torch
        from cellpose import models

        dev = torch.device(device)
        return models.CellposeModel(gpu=dev.type == "cuda", pretrained_model=str(weights) if weights else False,
                                    model_type=None, mkldnn=False, diam_mean=diam_mean, device=dev, nchan=2)

    def train(self, cfg, data, device, seed, work, clock, cb_work):
        import random

        import torch
        from cellpose import train as cp_train

        c = cfg
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        areas = np.concatenate([s.instances.areas for s in data.train]).astype(np.float64)
        diam_mean = _first(c, "diam_mean") or float(np.median(2.0 * np.sqrt(areas[areas > 0] / np.pi)))
        model = self._model(device, diam_mean)
        imgs = [np.asarray(s.image, dtype=np.float32) for s in data.train]
        labels = [s.instances.to_label_image() for s in data.train]
        net = model.net
        first = {"done": False}
        original_tick = clock.tick

        def tick(done, module=None):  # snapshot the network at the first batch
            original_tick(done, net if not first["done"] else None)
            first["done"] = True

        clock.tick = tick  # type: ignore[method-assign]
        try:
            with self.batch_tap(clock):
                cp_train.train_seg(
                    net, train_data=imgs, train_labels=labels, channels=[0, 0], normalize=True,
                    batch_size=get(c, "batch_size"), learning_rate=get(c, "lr"), n_epochs=get(c, "epochs"),
                    weight_decay=get(c, "weight_decay", 1e-5), momentum=get(c, "momentum", 0.9),
                    SGD=str(get(c, "optimizer", "sgd")).lower() == "sgd" if key_for(type(c), "optimizer")
                    else bool(_first(c, "sgd", default=True)),
                    nimg_per_epoch=_first(c, "nimg_per_epoch"), rescale=_first(c, "rescale", default=True),
                    scale_range=_first(c, "scale_range"), bsize=_first(c, "bsize", default=224),
                    min_train_masks=_first(c, "min_train_masks", default=5), save_path=str(work),
                    save_every=_first(c, "save_every", default=100), model_name="native_cellpose")
        finally:
            clock.tick = original_tick  # type: ignore[method-assign]
        return {"params_changed": clock.changed(net), "losses_finite": True,
                "n_params": sum(p.numel() for p in net.parameters())}

    def predictor(self, cfg, adapter, ckpt, data, device, cb_work):
        c = cfg
        weights = type(adapter).warm_start_file(ckpt)
        diam = _json_value(ckpt, "diam_mean") or 30.0
        model = self._model(device, float(diam), weights)
        diameter = _first(c, "diameter") or float(getattr(model, "diam_labels", diam))
        kw = dict(channels=[0, 0], normalize=True, diameter=diameter,
                  flow_threshold=_first(c, "flow_threshold", default=0.4),
                  cellprob_threshold=_first(c, "cellprob_threshold", default=0.0),
                  min_size=_first(c, "min_size", default=15), niter=_first(c, "niter"),
                  tile_overlap=_first(c, "tile_overlap", default=0.1), batch_size=get(c, "batch_size", 8),
                  bsize=_first(c, "bsize", default=224))

        def run(image: np.ndarray) -> int:
            masks, _, _ = model.eval(np.asarray(image, dtype=np.float32), **kw)
            sync(device)
            return int(np.asarray(masks).max())

        return run


# ---- MMDetection ------------------------------------------------------------

class MMDetNative(Native):
    adapter = "cascade"
    modules = ("torch", "mmdet", "mmdet.apis", "mmengine.runner", "mmcv.ops")

    def size_overrides(self, data):
        return {"image_scale": 1.0, "train_scales": [1.0]}

    @staticmethod
    def dumped_config(cb_work: Path):
        """The config mmengine's Runner dumped into cellbench's work dir: model + schedule + loader."""
        from mmengine.config import Config

        for p in sorted(Path(cb_work).rglob("*.py"), key=lambda p: p.stat().st_mtime):
            try:
                cfg = Config.fromfile(str(p))
            except Exception:  # noqa: BLE001 (not a config)
                continue
            if "model" in cfg and "train_dataloader" in cfg and "train_cfg" in cfg:
                return cfg
        raise FileNotFoundError(f"no mmengine config dump (model + train_dataloader) under {cb_work}: the native "
                                "side reuses the config the adapter's Runner ran with")

    def train(self, cfg, data, device, seed, work, clock, cb_work):
        from mmengine.hooks import Hook
        from mmengine.runner import Runner

        mcfg = self.dumped_config(cb_work)
        mcfg.work_dir = str(work)
        mcfg.experiment_name = f"overhead-native-{uuid.uuid4().hex[:8]}"
        mcfg.pop("load_from_cellbench_weights", None)
        ds = mcfg.train_dataloader.dataset
        ds.data_root, ds.ann_file, ds.data_prefix = str(data.coco_dir), "train.json", dict(img="")
        ds.metainfo = dict(classes=tuple(data.classes))
        mcfg.randomness = dict(seed=seed, deterministic=False)

        class Stamp(Hook):
            priority = "LOWEST"

            def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
                clock.tick(runner.iter + 1, runner.model)

        with quiet(work / "native.log"):
            runner = Runner.from_cfg(mcfg)
            runner.register_hook(Stamp(), priority="LOWEST")
            runner.train()
        model = runner.model
        return {"params_changed": clock.changed(model), "losses_finite": True,
                "n_params": sum(p.numel() for p in model.parameters())}

    def predictor(self, cfg, adapter, ckpt, data, device, cb_work):
        import warnings

        from mmdet.apis import inference_detector, init_detector

        mcfg = self.dumped_config(cb_work)
        scale = _first(cfg, "image_scale", default=1.0)
        mcfg.test_dataloader = dict(dataset=dict(pipeline=[
            dict(type="LoadImageFromNDArray"), dict(type="Resize", scale_factor=scale, keep_ratio=True),
            dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor"))]))
        with quiet(cb_work / "native-predictor.log"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = init_detector(mcfg, checkpoint=str(type(adapter).warm_start_file(ckpt)), device=device,
                                  palette="random")  # (no dataset to read a palette from)

        def run(image: np.ndarray) -> int:
            r = inference_detector(model, gray3(image))
            sync(device)
            return int(len(r.pred_instances))

        return run


# ---- Detectron2 ---------------------------------------------------------------

class Detectron2Native(Native):
    adapter = "maskrcnn"
    modules = ("torch", "detectron2", "detectron2.engine", "detectron2.data.datasets", "detectron2.model_zoo")

    def size_overrides(self, data):
        h, w = data.image_hw
        return {"min_size_train": [min(h, w)], "min_size_test": min(h, w), "max_size_train": max(h, w),
                "max_size_test": max(h, w)}

    @staticmethod
    def d2_config(cfg, data: Data, device: str, seed: int, cb_work: Path):
        """The detectron2 config the adapter trained with: its dump in the work dir when there is one,
        else the model zoo's base + the adapter's public ``to_detectron2_opts`` of the same values."""
        from detectron2.config import get_cfg

        d2 = get_cfg()
        dumps = [p for p in sorted(Path(cb_work).rglob("*.yaml")) if "SOLVER" in p.read_text()[:200000]]
        if dumps:
            d2.set_new_allowed(True)
            d2.merge_from_file(str(dumps[0]))
        else:
            from detectron2 import model_zoo

            from bench.adapters import detectron2_maskrcnn as d2a

            d2.merge_from_file(model_zoo.get_config_file(d2a.ZOO_CONFIG))
            opts = d2a.to_detectron2_opts(cfg, num_classes=len(data.classes), device=device, seed=seed)
            d2.merge_from_list([x for kv in opts.items() for x in kv])
        d2.MODEL.DEVICE = device
        d2.MODEL.WEIGHTS = ""
        d2.SEED = seed
        return d2

    def train(self, cfg, data, device, seed, work, clock, cb_work):
        from detectron2.data import DatasetCatalog, MetadataCatalog
        from detectron2.data.datasets import register_coco_instances
        from detectron2.engine import DefaultTrainer, HookBase
        from detectron2.utils.env import seed_all_rng
        from detectron2.utils.events import CommonMetricPrinter, JSONWriter

        d2 = self.d2_config(cfg, data, device, seed, cb_work)
        name = f"overhead_{uuid.uuid4().hex[:8]}"
        register_coco_instances(name, {}, str(data.coco_dir / "train.json"), str(data.coco_dir))
        d2.DATASETS.TRAIN, d2.DATASETS.TEST = (name,), ()
        d2.OUTPUT_DIR = str(work)

        class Trainer(DefaultTrainer):
            def build_writers(self):  # train_net's writers, less TensorBoard (not a dependency here)
                return [CommonMetricPrinter(self.max_iter), JSONWriter(str(Path(self.cfg.OUTPUT_DIR) / "metrics.json"))]

        class Stamp(HookBase):
            def after_step(self):
                m = self.trainer.model if hasattr(self.trainer, "model") else self.trainer._trainer.model
                clock.tick(self.trainer.iter + 1, m)

        try:
            with quiet(work / "native.log"):
                seed_all_rng(seed)
                trainer = Trainer(d2)
                trainer.resume_or_load(resume=False)
                trainer.register_hooks([Stamp()])
                trainer.train()
        finally:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        model = trainer._trainer.model
        return {"params_changed": clock.changed(model), "losses_finite": True,
                "n_params": sum(p.numel() for p in model.parameters())}

    def predictor(self, cfg, adapter, ckpt, data, device, cb_work):
        from detectron2.engine import DefaultPredictor

        d2 = self.d2_config(cfg, data, device, 0, cb_work)
        d2.DATASETS.TRAIN, d2.DATASETS.TEST = (), ()
        d2.MODEL.WEIGHTS = str(type(adapter).warm_start_file(ckpt))
        with quiet(cb_work / "native-predictor.log"):
            pred = DefaultPredictor(d2)

        def run(image: np.ndarray) -> int:
            out = pred(gray3(image))  # BGR uint8 (grey: all three channels equal)
            sync(device)
            return int(len(out["instances"]))

        return run


NATIVES: dict[str, type[Native]] = {n.adapter: n for n in (TorchvisionNative, CellposeNative, MMDetNative,
                                                           Detectron2Native)}


# ---------------------------------------------------------------------------
# one adapter: A/B training and inference
# ---------------------------------------------------------------------------

def cellbench_train(name: str, preset: str, cfg, data: Data, device: str, seed: int, work: Path,
                    clock: Clock, native: Native):
    from bench.adapters.base import FitContext
    from bench.adapters.registry import build

    adapter = build(name, data.classes, preset, device)
    logs: list[dict] = []
    total = {"done": 0}

    with native.batch_tap(clock) as tapped:
        def progress(done, tot, info):
            total["done"] = max(total["done"], int(done))
            if not tapped:
                clock.tick(done, find_module(adapter))

        ctx = FitContext(work, device, seed, progress, logs.append)
        with quiet(work / "cellbench.log"):
            adapter.fit(data.train, [], cfg, ctx)
    losses = [r.get("loss") for r in logs if isinstance(r.get("loss"), (int, float))]
    final = find_module(adapter)
    return adapter, {"params_changed": clock.changed(final) if clock.first_params is not None else None,
                     "losses_finite": bool(losses) and all(math.isfinite(x) for x in losses),
                     "progress_done": total["done"],
                     "n_params": sum(p.numel() for p in final.parameters()) if final is not None else None}


def profiled(fn: Callable[[], Any], top: int = 30) -> str:
    """``fn`` under cProfile: the ``top`` functions by internal time, as text."""
    import cProfile
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    try:
        fn()
    finally:
        pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def time_predict(fn: Callable[[], int], n_images: int, device: str) -> tuple[float, int]:
    sync(device)
    t = time.perf_counter()
    n_det = fn()
    sync(device)
    return (time.perf_counter() - t) * 1000.0 / n_images, n_det


def measure(name: str, *, device: str = "cpu", iterations: int | None = None, warmup: int = 2, reps: int = 3,
            n_infer: int | None = None, n_train: int = 6, n_test: int = 4, size: tuple[int, int] = (160, 128),
            seed: int = 0, preset: str = "smoke", workdir: Path | None = None, threads: int | None = 1,
            extra: dict | None = None, profile: bool = False, log: Callable[[str], None] = print) -> dict:
    """Cellbench vs the framework's own loop for one adapter; returns the figures (see the module doc)."""
    native = NATIVES[name]()
    iterations = iterations or native.iterations
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    from bench.adapters import registry
    from bench.adapters.registry import make_config

    cls = registry.get(name)
    why = cls.available()
    if not why.ok:
        return {"status": "skipped", "reason": why.hint or f"{cls.framework} not importable"}
    if (reason := native.available()) is not None:
        return {"status": "skipped", "reason": reason}
    import torch

    if threads:
        torch.set_num_threads(threads)
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        return {"status": "skipped", "reason": "device cuda asked for, torch sees no GPU"}
    if iterations < max(warmup, 1) + 1:
        raise ValueError(f"iterations ({iterations}) must exceed warmup ({warmup}) and be at least 2")

    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix=f"cellbench-overhead-{name}-")
        workdir = Path(tmp.name)
    try:
        t_start = time.perf_counter()
        data = make_data(Path(workdir) / "data", n_train, n_test, size, seed)
        over = native.overrides(cls.Config, data, iterations, make_config(name, preset))
        over.update({k: v for k, v in (extra or {}).items() if k in fields_of(cls.Config)})
        cfg = make_config(name, preset, over)
        log(f"[{name}] {len(data.train)} train / {len(data.test)} test images of {size[0]}x{size[1]}, "
            f"{iterations} {native.unit}s x {reps} reps per side, batch {get(cfg, 'batch_size')}, device {device}, "
            f"threads {torch.get_num_threads()}")

        train_reps, trained = [], {}
        adapter = cb_dir = None
        for r in range(reps):
            for side in ("cellbench", "native"):
                work = Path(workdir) / f"{side}-{r}"
                work.mkdir(parents=True, exist_ok=True)
                clock = Clock(device)
                if side == "cellbench":
                    adapter, info = cellbench_train(name, preset, cfg, data, device, seed, work, clock, native)
                    cb_dir = work
                else:
                    with quiet(work / "native.log"):
                        info = native.train(cfg, data, device, seed, work, clock, cb_dir)
                timing = clock.per_iter(warmup, iterations)
                train_reps.append({"rep": r, "side": side, **timing})
                trained.setdefault(side, info)
                log(f"[{name}] rep {r} {side:9s} train {timing['s_per_iter']:.4f} s/{native.unit} "
                    f"(median single {native.unit} {timing['median_iter_s']:.4f} s)")

        # inference: the last cellbench-trained weights, for both sides
        ckpt = Path(workdir) / "checkpoint"
        adapter.save(ckpt)
        with quiet(Path(workdir) / "predict.log"):
            nat = native.predictor(cfg, adapter, ckpt, data, device, cb_dir)
            adapter.predict(data.test[:1])  # warm-up
            nat(data.test[0].image)
        infer_reps = []
        # a repetition predicts only a few images: twice as many A/B pairs as for training
        for r in range(infer_reps_n := (n_infer or 2 * reps)):
            with quiet(Path(workdir) / "predict.log"):
                cb_ms, cb_det = time_predict(lambda: sum(len(p) for p in adapter.predict(data.test)), len(data.test),
                                             device)
                na_ms, na_det = time_predict(lambda: sum(nat(s.image) for s in data.test), len(data.test), device)
            infer_reps.append({"rep": r, "cellbench_ms_per_img": cb_ms, "native_ms_per_img": na_ms,
                               "cellbench_detections": cb_det, "native_detections": na_det})
            log(f"[{name}] rep {r} infer cellbench {cb_ms:.1f} ms/img ({cb_det} detections), native {na_ms:.1f} "
                f"ms/img ({na_det} detections)")

        prof = {}
        if profile:  # one more run of each side under cProfile, not counted in the figures
            prof["train_cellbench"] = profiled(lambda: cellbench_train(
                name, preset, cfg, data, device, seed, Path(workdir) / "prof-cb", Clock(device), native))
            pw = Path(workdir) / "prof-native"
            pw.mkdir(parents=True, exist_ok=True)
            with quiet(pw / "native.log"):
                prof["train_native"] = profiled(lambda: native.train(cfg, data, device, seed, pw, Clock(device),
                                                                     cb_dir))
            with quiet(Path(workdir) / "predict.log"):
                prof["infer_cellbench"] = profiled(lambda: adapter.predict(data.test))
                prof["infer_native"] = profiled(lambda: [nat(s.image) for s in data.test])
            for k, v in prof.items():
                log(f"[{name}] profile {k}:\n{v}")

        def med(side: str, key: str) -> float:
            return float(np.median([x[key] for x in train_reps if x["side"] == side]))

        pairs = [(a["s_per_iter"], b["s_per_iter"]) for a, b in
                 zip([x for x in train_reps if x["side"] == "cellbench"], [x for x in train_reps if x["side"] == "native"])]
        res = {
            "status": "ok",
            "unit": native.unit,
            "config_overrides": over,
            "config": cfg.model_dump(mode="json"),
            "settings": {"device": device, "iterations": iterations, "warmup": warmup, "reps": reps,
                         "infer_reps": infer_reps_n, "n_train": len(data.train), "n_test": len(data.test),
                         "size": list(size), "seed": seed, "preset": preset, "threads": torch.get_num_threads()},
            "train": {"cellbench_s_per_iter": med("cellbench", "s_per_iter"),
                      "native_s_per_iter": med("native", "s_per_iter"),
                      "ratio": float(np.median([a / b for a, b in pairs])),
                      "reps": train_reps},
            "infer": {"cellbench_ms_per_img": float(np.median([x["cellbench_ms_per_img"] for x in infer_reps])),
                      "native_ms_per_img": float(np.median([x["native_ms_per_img"] for x in infer_reps])),
                      "ratio": float(np.median([x["cellbench_ms_per_img"] / x["native_ms_per_img"]
                                                for x in infer_reps])),
                      "reps": infer_reps},
            "trained": trained,
            **({"profile": prof} if prof else {}),
            "seconds": round(time.perf_counter() - t_start, 1),
        }
        return res
    finally:
        if tmp is not None:
            tmp.cleanup()


# ---------------------------------------------------------------------------
# machine, git, table, CLI
# ---------------------------------------------------------------------------

def machine_info(device: str) -> dict:
    info = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        la = os.getloadavg()
        info["loadavg"] = [round(x, 2) for x in la]
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        if str(device).startswith("cuda") and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    import importlib.metadata as md

    for dist in ("torchvision", "cellpose", "mmdet", "mmengine", "mmcv", "detectron2"):
        try:
            info[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return info


def git_info() -> dict:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(status),
            "dirty_files": [line[3:] for line in status.splitlines()]}


def table(results: dict) -> str:
    head = ("adapter", "train s/iter cellbench", "native", "ratio", "infer ms/img cellbench", "native", "ratio", "")
    rows, notes = [head], []
    for name, r in results.items():
        if r.get("status") != "ok":
            notes.append(f"{name}: {r.get('status')} ({r.get('reason', '?')})")
            continue
        tr, inf = r["train"], r["infer"]
        flag = "" if max(tr["ratio"], inf["ratio"]) <= TARGET else f"over {TARGET:.2f}"
        unit = "" if r.get("unit", "iteration") == "iteration" else f" (s/{r['unit']})"
        rows.append((name + unit, f"{tr['cellbench_s_per_iter']:.4f}", f"{tr['native_s_per_iter']:.4f}",
                     f"{tr['ratio']:.3f}", f"{inf['cellbench_ms_per_img']:.1f}", f"{inf['native_ms_per_img']:.1f}",
                     f"{inf['ratio']:.3f}", flag))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    return "\n".join(lines + notes)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", default=",".join(ADAPTERS), help="comma-separated (default: all four)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--iterations", type=int, default=None,
                   help="training iterations (Cellpose: batches) per side and repetition (default: 10, Cellpose 6)")
    p.add_argument("--warmup", type=int, default=2, help="first iterations not timed (the last one is not either)")
    p.add_argument("--reps", type=int, default=3, help="A/B repetitions of training (inference: twice as many)")
    p.add_argument("--train-images", type=int, default=6)
    p.add_argument("--test-images", type=int, default=4)
    p.add_argument("--size", default="160x128", help="synthetic image size WxH")
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads for both sides (0: leave as is)")
    p.add_argument("--preset", default="smoke")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config value for both sides (applied to each adapter that has KEY)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON file ('' for none)")
    p.add_argument("--in-process", action="store_true", help="run every adapter in this process")
    p.add_argument("--profile", action="store_true",
                   help="also run each side once under cProfile and print (and store) the top functions")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    return p


def _kwargs(a) -> dict:
    import yaml

    w, h = (int(x) for x in a.size.lower().split("x"))
    extra = {}
    for item in a.set:
        k, _, v = item.partition("=")
        extra[k.strip()] = yaml.safe_load(v) if v.strip() else None
    return dict(extra=extra, profile=a.profile, device=a.device, iterations=a.iterations, warmup=a.warmup, reps=a.reps, n_train=a.train_images,
                n_test=a.test_images, size=(w, h), seed=a.seed, preset=a.preset, threads=a.threads)


def _run_one(name: str, a, argv: list[str]) -> dict:
    if a.in_process:
        try:
            return measure(name, **_kwargs(a))
        except Exception as e:  # noqa: BLE001 (one adapter failing must not lose the others' figures)
            return {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
    with tempfile.TemporaryDirectory(prefix="cellbench-overhead-") as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if a.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(a.threads)
        if not str(a.device).startswith("cuda"):
            env["CUDA_VISIBLE_DEVICES"] = ""  # mmengine's Runner would otherwise pick a GPU for the native side
        cmd = [sys.executable, "-m", "bench.overhead", *argv, "--child", name, "--child-out", str(out)]
        proc = subprocess.run(cmd, cwd=str(REPO), env=env)
        if out.is_file():
            return json.loads(out.read_text())
        return {"status": "failed", "reason": f"subprocess exited {proc.returncode} without a result"}


def run(argv: list[str] | None = None, out_rows: list | None = None) -> int:
    """The CLI; with ``out_rows``, also appends (figure, value, target, ok) rows for ``make bench``'s summary."""
    argv = sys.argv[1:] if argv is None else list(argv)
    a = _parser().parse_args(argv)
    if a.child:
        if a.threads:
            os.environ["OMP_NUM_THREADS"] = str(a.threads)
        try:
            res = measure(a.child, **_kwargs(a))
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            res = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
        Path(a.child_out).write_text(json.dumps(res, default=str))
        return 0
    names = [n.strip() for n in a.adapters.split(",") if n.strip()]
    unknown = [n for n in names if n not in NATIVES]
    if unknown:
        print(f"no native comparison for {', '.join(unknown)} (known: {', '.join(NATIVES)})", file=sys.stderr)
        return 2
    print(f"harness overhead: cellbench vs each framework's own loop, device {a.device}, "
          f"{a.threads or 'default'} thread(s); load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    git = git_info()  # the code that runs: taken before, not after, the measurement
    results = {}
    for n in names:
        results[n] = r = _run_one(n, a, argv)
        if r.get("status") != "ok":
            print(f"[{n}] {r.get('status')}: {r.get('reason')}")
    doc = {"what": "harness overhead: cellbench vs the framework's own training loop and predictor",
           "target_ratio": TARGET, "machine": machine_info(a.device), "git": git,
           "command": "python -m bench.overhead " + " ".join(argv), "adapters": results,
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print()
    print(table(results))
    print(f"(medians of {a.reps} interleaved training and {2 * a.reps} inference repetitions; ratio = median of "
          f"per-pair cellbench/native; "
          f"target <= {TARGET:.2f}; git {str(doc['git']['commit'])[:10]}{' + local changes' if doc['git']['dirty'] else ''})")
    if a.out:
        from bench.util import atomic_write_json

        atomic_write_json(a.out, doc)
        print(f"written: {a.out}")
    if out_rows is not None:
        for n, r in results.items():
            if r.get("status") != "ok":
                out_rows.append((f"D overhead {n}", r.get("status", "?"), f"<= {TARGET}", None))
                continue
            for part in ("train", "infer"):
                ratio = r[part]["ratio"]
                out_rows.append((f"D {part} cellbench/native, {n}", f"{ratio:.3f}", f"<= {TARGET}", ratio <= TARGET))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
