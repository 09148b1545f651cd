"""``bench predict`` and ``bench submit``: a trained model of a run on new images.

The adapter is rebuilt from the run (``job.json``: spec and config) and its checkpoint
loaded; nothing is trained or downloaded. Post-processing is the model's tuned one
(``tuning.json`` from ``bench tune``: overlaps resolved by score, then per-class score
and area thresholds) unless ``raw``; without a ``tuning.json`` only overlaps are
resolved. A Kaggle submission always has its overlaps resolved (Kaggle rejects
overlapping masks) and is checked by re-reading it before it is put in place.
"""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bench.data.errors import DataError
from bench.data.io import IMAGE_SUFFIXES, read_image
from bench.data.sample import Instances, Sample
from bench.store import Job, Manifest, RunDir
from bench.tiling import predictor as tiled_predictor
from bench.tune import apply_tuning, with_scores


@dataclass
class LoadedModel:
    adapter: object
    label: str
    model_dir: Path
    job: Job
    manifest: Manifest
    classes: list[str]
    tuning: dict | None
    device: str
    device_note: str = ""   # why the model runs on another device than asked (the device plan's note)


def load_model(run_dir: Path, model: str, device: str = "auto") -> LoadedModel:
    """The adapter of one model of ``run_dir`` with its checkpoint loaded, and its tuning (if any).

    The device is planned as ``bench run`` plans it (:func:`bench.runner.devices.plan_model`):
    a model that does not run on the asked device falls back to the CPU only where it declares
    the CPU, and says so in ``device_note``; otherwise it is refused."""
    from bench.adapters import registry
    from bench.runner.devices import plan_model, resolve_device

    run = RunDir(run_dir)
    manifest = run.read_manifest()
    md = run.resolve(model)
    label = md.label
    if not md.job.is_file():
        raise DataError(md.job, f"model {label} has no job.json (was it run by `bench run`?)")
    job = md.read_job()
    if not md.checkpoint.is_dir():
        raise DataError(md.checkpoint, f"model {label} has no checkpoint (did its training finish?)")
    name, _ = registry.parse_spec(job.spec)
    cls = registry.get(name)
    avail = cls.available()
    if not avail.ok:
        from bench import envs  # a model of another environment predicts with that environment's python

        env = envs.of(cls)
        there = "" if env.name == envs.MAIN else f"; it runs in {env.folder}: `{env.python()} -m bench ...`"
        raise RuntimeError(f"{name}: not installed here: {avail.hint}{there}")
    # the weights are in the checkpoint: a needs_weights model is not refused for want of weights=
    plan = plan_model(name, cls.capabilities, resolve_device(device), {**job.config, "weights": "checkpoint"})
    adapter = cls(cls.Config(**job.config), manifest.classes, plan.device)
    try:
        adapter.load(md.checkpoint)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(md.checkpoint, f"cannot load the checkpoint ({type(e).__name__}: {e})") from None
    note = plan.note if plan.device != plan.requested else ""
    return LoadedModel(adapter, label, md.path, job, manifest, list(manifest.classes), md.read_tuning(),
                       plan.device, note)


def list_images(folder: Path) -> list[Path]:
    """Images (PNG/TIF/JPG) of a folder, sorted; Cellpose-style ``*_masks`` label images are not inputs."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "--images must be a folder of PNG/TIF images")
    paths = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith("_masks"))
    if not paths:
        raise DataError(folder, f"no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    seen: dict[str, Path] = {}
    for p in paths:
        if p.stem in seen:
            raise DataError(p, f"two images with the id {p.stem!r} ({seen[p.stem].name} and {p.name})")
        seen[p.stem] = p
    return paths


@dataclass
class InferResult:
    preds: dict[str, Instances] = field(default_factory=dict)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    bad: list[tuple[Path, str]] = field(default_factory=list)
    classes_used: dict[str, str] = field(default_factory=dict)  # image -> class whose thresholds applied


def _predict_for(lm: LoadedModel, s: Sample, mode: str) -> Instances:
    """Thresholds tuned on the raw outputs (bench/raw.py) apply to what the model gives down to the
    same score floor; otherwise the model predicts as configured."""
    from bench.raw import capture

    predict = tiled_predictor(lm.adapter)  # tiles when the config asks for them
    floor = (lm.tuning or {}).get("score_floor") if mode == "tuned" else None
    if floor is None:
        return predict([s])[0]
    with capture(lm.adapter, float(floor), maps=False):
        return predict([s])[0]


def infer_folder(lm: LoadedModel, paths: list[Path], mode: str = "tuned", skip_bad: bool = False,
                 on_image: Callable[[str, np.ndarray, Instances], None] | None = None,
                 progress: bool = True) -> InferResult:
    """Predict every image. ``mode``: "tuned" (tuning.json if any, else overlaps resolved),
    "resolve" (overlaps resolved only) or "raw" (the adapter's output as is).

    An unreadable image raises :class:`DataError` naming it, unless ``skip_bad`` (then it is
    recorded in ``bad`` and skipped)."""
    from tqdm import tqdm

    out = InferResult()
    bar = tqdm(paths, desc=f"{lm.label} predict", unit="img", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    for p in bar:
        try:
            img = read_image(p)
        except DataError as e:
            if not skip_bad:
                bar.close()
                raise DataError(p, f"{e.problem} (use --skip-bad to skip unreadable images)") from None
            out.bad.append((p, e.problem))
            continue
        h, w = img.shape[:2]
        s = Sample(image_id=p.stem, instances=Instances.empty(h, w, with_scores=False), path=p, _image=img)
        pred = _predict_for(lm, s, mode)
        if (pred.height, pred.width) != (h, w):
            raise RuntimeError(f"{lm.label}: prediction for {p} is {pred.width}x{pred.height}, image is {w}x{h}")
        pred = with_scores(pred)
        if mode == "raw":
            used = "raw"
        elif mode == "resolve":
            pred, used = apply_tuning(pred, None, lm.classes)
        else:
            pred, used = apply_tuning(pred, lm.tuning, lm.classes)
        out.preds[p.stem] = pred
        out.sizes[p.stem] = (h, w)
        out.classes_used[p.stem] = used
        if on_image is not None:
            on_image(p.stem, img, pred)
    bar.close()
    return out


# ---------------------------------------------------------------------------
# outputs of `bench predict`
# ---------------------------------------------------------------------------

def label_image(pred: Instances) -> np.ndarray:
    """uint16 label image (0 background); where raw masks overlap the higher score wins."""
    if len(pred) > 65535:
        raise ValueError(f"{len(pred)} instances do not fit a uint16 label image")
    return pred.to_label_image().astype(np.uint16)


def write_label_image(path: Path, labels: np.ndarray) -> None:
    from bench.util import atomic_write_bytes
    import io

    buf = io.BytesIO()
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(buf, labels, compression="zlib")
    else:
        from PIL import Image

        Image.fromarray(labels).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def to_rgb8(img: np.ndarray) -> np.ndarray:
    """Display copy: 1st-99.8th percentile stretch to uint8, grey to RGB."""
    x = img.astype(np.float32)
    lo, hi = np.percentile(x, [1, 99.8]) if x.size else (0.0, 1.0)
    x = np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    x = x.astype(np.uint8)
    return np.repeat(x[..., None], 3, axis=2) if x.ndim == 2 else x


def overlay(img: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The image with each instance's boundary drawn in its own colour."""
    from skimage.segmentation import find_boundaries

    rgb = to_rgb8(img).copy()
    if labels.max() == 0:
        return rgb
    edge = find_boundaries(labels, mode="inner") & (labels > 0)
    rng = np.random.default_rng(0)
    palette = rng.integers(64, 256, size=(int(labels.max()) + 1, 3)).astype(np.uint8)
    palette[np.arange(len(palette)), rng.integers(0, 3, size=len(palette))] = 255  # saturated, visible on grey
    rgb[edge] = palette[labels[edge]]
    return rgb


def write_png(path: Path, rgb: np.ndarray) -> None:
    import io

    from PIL import Image

    from bench.util import atomic_write_bytes

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def predict_folder(lm: LoadedModel, images: Path, out: Path, raw: bool = False, skip_bad: bool = False,
                   label_format: str = "png", progress: bool = True) -> InferResult:
    """``out/predictions.jsonl.gz``, ``out/labels/<id>.<png|tif>`` (uint16), ``out/overlays/<id>.png``."""
    from bench.data.predictions import write_predictions

    if label_format not in ("png", "tif"):
        raise ValueError(f"--label-format must be png or tif, not {label_format!r}")
    paths = list_images(images)
    out = Path(out)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)

    def save(iid: str, img: np.ndarray, pred: Instances) -> None:
        lab = label_image(pred)
        write_label_image(out / "labels" / f"{iid}.{label_format}", lab)
        write_png(out / "overlays" / f"{iid}.png", overlay(img, lab))

    mode = "raw" if raw else "tuned"
    res = infer_folder(lm, paths, mode, skip_bad, save, progress)
    post = ("raw" if raw else "tuned" if lm.tuning else "overlaps resolved (no tuning.json: run `bench tune`)")
    write_predictions(out / "predictions.jsonl.gz", res.preds, lm.classes, {
        "model": lm.job.spec, "label": lm.label, "run": str(lm.model_dir.parent.parent.resolve()),
        "device": lm.device,
        "postprocess": post, "thresholds": (lm.tuning or {}).get("thresholds") if not raw else None,
        "class_source": (lm.tuning or {}).get("class_source") if not raw else None,
        "thresholds_used": res.classes_used, "skipped": [str(p) for p, _ in res.bad]})
    return res


# ---------------------------------------------------------------------------
# `bench submit`
# ---------------------------------------------------------------------------

def check_submission(path: Path, preds: dict[str, Instances], sizes: dict[str, tuple[int, int]],
                     classes: list[str]) -> int:
    """Re-read a written submission with cellbench's own reader and check it says what was meant.

    Header ``id,predicted``; rows sorted by id; every image present (an empty row for an
    image without instances); masks decode to exactly the predicted ones; no pixel claimed
    twice. Returns the number of data rows; raises :class:`DataError` naming the file."""
    from bench.data.predictions import read_submission
    from bench.metrics.matching import overlapping_pixels

    path = Path(path)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] != ["id", "predicted"]:
        raise DataError(path, f"header is {rows[0] if rows else None}, want ['id', 'predicted']")
    ids = [r[0] for r in rows[1:]]
    if any(len(r) != 2 for r in rows[1:]):
        raise DataError(path, "a row does not have exactly 2 fields")
    if ids != sorted(ids):
        raise DataError(path, "rows are not sorted by id")
    back = read_submission(path, sizes, classes)
    missing = sorted(set(preds) - set(back))
    if missing:
        raise DataError(path, f"{len(missing)} image(s) have no row, e.g. {missing[:3]}")
    for iid, p in preds.items():
        b = back[iid]
        if len(b) != len(p):
            raise DataError(path, f"image {iid}: {len(b)} masks read back, {len(p)} written")
        for k, (c1, c2) in enumerate(zip(p.counts, b.counts)):
            if not np.array_equal(np.asarray(c1, np.int64), np.asarray(c2, np.int64)):
                raise DataError(path, f"image {iid}: mask {k} reads back differently")
        n = overlapping_pixels(b.counts)
        if n:
            raise DataError(path, f"image {iid}: masks overlap ({n} pixels claimed twice)")
    return len(rows) - 1


def submit_folder(lm: LoadedModel, images: Path, out: Path, raw: bool = False, skip_bad: bool = False,
                  progress: bool = True) -> tuple[InferResult, int]:
    """Write the Kaggle csv to ``out`` only after it has been re-read and checked."""
    from bench.data.predictions import write_submission

    out = Path(out)
    paths = list_images(images)
    res = infer_folder(lm, paths, "resolve" if raw else "tuned", skip_bad, None, progress)
    # Kaggle: no overlaps (resolved above), and no empty masks (an empty run string would read back
    # as "no instance")
    preds = {}
    for iid, p in res.preds.items():
        if overlaps := _overlap_guard(p):
            raise RuntimeError(f"image {iid}: {overlaps} pixels still overlap after resolution")
        preds[iid] = p.subset(p.areas > 0) if len(p) else p
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.unchecked.{os.getpid()}"
    try:
        write_submission(tmp, preds)
        n_rows = check_submission(tmp, preds, res.sizes, lm.classes)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    res.preds = preds
    return res, n_rows


def _overlap_guard(p: Instances) -> int:
    from bench.metrics.matching import overlapping_pixels

    return overlapping_pixels(p.counts)
