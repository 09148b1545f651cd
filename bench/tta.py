"""Test-time augmentation for every adapter, through one mechanism (``MODEL:tta=flip``).

The option ``tta`` (every adapter has it, :class:`bench.adapters.base.AdapterConfig`) names
the augmented passes, tokens joined by ``+``:

==============  ===========================================================
``none``        one pass, as the model is (the default)
``flip``        + horizontal, vertical and both flips (4 passes)
``hflip``       + horizontal flip; ``vflip``, ``hvflip`` likewise
``scale``       + the image resized by 0.8 and by 1.25 (3 passes)
``scale0.75``   + one given factor (0.25 to 4)
``flip+scale``  the union: identity, 3 flips, 2 scales (6 passes)
==============  ===========================================================

Each pass predicts on the transformed image; the inverse transform is applied to every
predicted mask (flips exactly, on the run-length pixel indices; scales by bilinear
resampling of the mask's box crop back onto the original pixel grid, kept at >= 0.5);
the passes' instance sets are then merged by mask IoU with mask and score averaging
(:func:`bench.fusion.fuse_sets`, ``score-average``: an instance found in one pass of four
keeps a quarter of its score), never by box NMS.

An adapter declares in ``capabilities.tta`` which kinds (``flip``, ``scale``) its output can
be inverted for; anything else is refused before the run starts (:func:`check_supported`).
Detectron2's and torchvision's Mask R-CNN declare ``flip`` only: they resize every image to a
fixed short side, so a scale pass would be undone before the network sees it (Cascade rescales by
a factor and takes both). Framework-internal TTA (Cellpose's
own tile flips) is that adapter's ``native_tta`` option, a different thing.

The timing the worker reports: ms per image for all passes, inversion and merging, the
identity pass alone, and their ratio (the factor TTA costs).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from bench.data import rle
from bench.data.sample import Instances, Sample

DEFAULT_SCALES = (0.8, 1.25)
KINDS = ("flip", "scale")
MERGE_METHOD = "score-average"
MERGE_IOU = 0.5


@dataclass(frozen=True)
class Aug:
    """One pass: flips, then a resize by ``scale``."""

    hflip: bool = False
    vflip: bool = False
    scale: float = 1.0

    @property
    def name(self) -> str:
        flip = ("h" if self.hflip else "") + ("v" if self.vflip else "")
        parts = [f"{flip}flip"] if flip else []
        if self.scale != 1.0:
            parts.append(f"scale{self.scale:g}")
        return "+".join(parts) or "identity"

    @property
    def kinds(self) -> set[str]:
        return ({"flip"} if self.hflip or self.vflip else set()) | ({"scale"} if self.scale != 1.0 else set())


IDENTITY = Aug()
_FLIPS = {"hflip": (Aug(True, False),), "vflip": (Aug(False, True),), "hvflip": (Aug(True, True),)}
_FLIPS["flip"] = _FLIPS["hflip"] + _FLIPS["vflip"] + _FLIPS["hvflip"]


def parse_tta(text: str | None) -> tuple[Aug, ...]:
    """``'flip+scale'`` -> the passes, identity first; ValueError naming the bad token."""
    text = "none" if text is None else str(text).strip().lower()
    if text in ("", "none", "off", "false"):
        return (IDENTITY,)
    augs: list[Aug] = [IDENTITY]
    for tok in text.split("+"):
        tok = tok.strip()
        if tok in _FLIPS:
            new = _FLIPS[tok]
        elif tok == "scale":
            new = tuple(Aug(scale=s) for s in DEFAULT_SCALES)
        elif m := re.fullmatch(r"scale(\d+(?:\.\d+)?)", tok):
            s = float(m.group(1))
            if not 0.25 <= s <= 4.0:
                raise ValueError(f"tta {text!r}: scale {s:g} is outside 0.25..4")
            new = (Aug(scale=s),)
        else:
            raise ValueError(f"tta {text!r}: unknown part {tok!r} (none, flip, hflip, vflip, hvflip, scale, "
                             "scale<factor>, joined by '+', e.g. flip+scale)")
        augs += [a for a in new if a not in augs]
    return tuple(augs)


def validate_tta(text: str) -> str:
    """The option's canonical form (for the config): checked, lower case."""
    parse_tta(text)
    return "none" if str(text).strip().lower() in ("", "none", "off", "false") else str(text).strip().lower()


def check_supported(name: str, capabilities, text: str | None) -> None:
    """Refuse a TTA the adapter cannot invert, before anything runs (ValueError naming both)."""
    need = set().union(*(a.kinds for a in parse_tta(text)))
    have = set(getattr(capabilities, "tta", ()) or ())
    missing = sorted(need - have)
    if missing:
        why = getattr(capabilities, "tta_note", "") or "its output cannot be mapped back through that transform"
        raise ValueError(f"model {name!r}: tta={text} needs {'+'.join(missing)}, which {name} does not support "
                         f"({why}); it supports: {', '.join(sorted(have)) or 'no TTA'}")


# ---------------------------------------------------------------------------
# forward (images) and inverse (masks)
# ---------------------------------------------------------------------------

def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def transform_image(image: np.ndarray, aug: Aug) -> np.ndarray:
    """The image a pass predicts on: flipped, then resized (bilinear, same dtype)."""
    out = image
    if aug.hflip:
        out = out[:, ::-1]
    if aug.vflip:
        out = out[::-1]
    if aug.scale != 1.0:
        from skimage.transform import resize

        h, w = scaled_size(image.shape[0], image.shape[1], aug.scale)
        res = resize(out.astype(np.float32), (h, w) + out.shape[2:], order=1, preserve_range=True,
                     anti_aliasing=aug.scale < 1.0)
        if np.issubdtype(image.dtype, np.integer):
            info = np.iinfo(image.dtype)
            res = np.clip(np.rint(res), info.min, info.max)
        out = res.astype(image.dtype)
    return np.ascontiguousarray(out)


def transform_sample(sample: Sample, aug: Aug) -> Sample:
    """A sample holding the transformed image (its instances: an empty set of the new size)."""
    img = transform_image(sample.image, aug)
    return Sample(sample.image_id, Instances.empty(img.shape[0], img.shape[1], with_scores=False),
                  None, dict(sample.meta), img)


def _flip_counts(counts: np.ndarray, height: int, width: int, hflip: bool, vflip: bool) -> np.ndarray:
    """Flip a mask exactly on its column-major pixel indices (no dense image)."""
    idx = rle.pixel_indices(counts)
    x, y = np.divmod(idx, height)
    if hflip:
        x = width - 1 - x
    if vflip:
        y = height - 1 - y
    return rle.counts_from_indices(np.sort(x * height + y), height * width)


def _unscale_counts(counts: np.ndarray, small: tuple[int, int], full: tuple[int, int]) -> np.ndarray:
    """A mask predicted on the resized image, resampled onto the original pixel grid.

    Only the mask's box (plus one pixel) is decoded; every original pixel centre in the
    corresponding region is mapped into the resized image and read bilinearly (>= 0.5 kept)."""
    from scipy.ndimage import map_coordinates

    (hs, ws), (H, W) = small, full
    idx = rle.pixel_indices(counts)
    if idx.size == 0:
        return rle.counts_from_indices(idx, H * W)
    xs, ys = np.divmod(idx, hs)
    y0, y1, x0, x1 = ys.min() - 1, ys.max() + 2, xs.min() - 1, xs.max() + 2
    crop = np.zeros((y1 - y0, x1 - x0), dtype=np.float32)
    crop[ys - y0, xs - x0] = 1.0
    fy, fx = H / hs, W / ws
    ry0, ry1 = max(int(np.floor((y0 + 0.5) * fy - 0.5)), 0), min(int(np.ceil((y1 - 0.5) * fy + 0.5)), H)
    rx0, rx1 = max(int(np.floor((x0 + 0.5) * fx - 0.5)), 0), min(int(np.ceil((x1 - 0.5) * fx + 0.5)), W)
    if ry1 <= ry0 or rx1 <= rx0:
        return rle.counts_from_indices(idx[:0], H * W)
    gy = (np.arange(ry0, ry1) + 0.5) / fy - 0.5 - y0
    gx = (np.arange(rx0, rx1) + 0.5) / fx - 0.5 - x0
    yy, xx = np.meshgrid(gy, gx, indexing="ij")
    vals = map_coordinates(crop, [yy, xx], order=1, mode="constant", cval=0.0)
    return rle.encode_mask_at(vals >= 0.5, ry0, rx0, H, W)


def invert(pred: Instances, aug: Aug, height: int, width: int) -> Instances:
    """Masks predicted on the transformed image, mapped back onto the original (height, width).
    Masks that vanish (a sliver lost to resampling) are dropped with their scores."""
    if aug == IDENTITY:
        return pred
    counts = list(pred.counts)
    if aug.scale != 1.0:
        small = (pred.height, pred.width)
        counts = [_unscale_counts(c, small, (height, width)) for c in counts]
    elif (pred.height, pred.width) != (height, width):
        raise ValueError(f"a flip pass returned a {pred.width}x{pred.height} prediction for a "
                         f"{width}x{height} image")
    if aug.hflip or aug.vflip:
        counts = [_flip_counts(c, height, width, aug.hflip, aug.vflip) for c in counts]
    keep = np.array([rle.area(c) > 0 for c in counts], dtype=bool)
    scores = None if pred.scores is None else np.asarray(pred.scores)[keep]
    return Instances(height, width, [c for c, k in zip(counts, keep) if k], pred.classes[keep], scores)


# ---------------------------------------------------------------------------
# predicting with TTA
# ---------------------------------------------------------------------------

@dataclass
class TTAPredictor:
    """``predict(sample) -> Instances``: the adapter's prediction, with TTA if asked for.

    Keeps each image's inverted pass outputs (``raw``: the cache that lets other merges be
    tried without inference) and the timings the worker reports."""

    predict: Callable[[Sequence[Sample]], list[Instances]]
    text: str = "none"
    augs: tuple[Aug, ...] = ()
    raw: dict[str, dict[str, Instances]] = field(default_factory=dict)   # image -> pass name -> instances
    identity_seconds: list[float] = field(default_factory=list)
    total_seconds: list[float] = field(default_factory=list)
    keep_raw: bool = True
    # the adapter declares non-overlapping masks (watershed, Cellpose): merged passes may overlap,
    # so they are resolved by score as the evaluator would, and the adapter's contract holds
    resolve_overlaps: bool = False
    # bench/raw.py: ``predict`` returns instances down to the raw floor; the published ones (and the
    # passes merged) keep scores above ``threshold``. ``take_maps``: the adapter's per-pixel maps of
    # the samples just predicted (kept in ``maps`` for the identity pass)
    threshold: float | None = None
    take_maps: Callable[[], list[dict]] | None = None
    maps: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self):
        self.augs = parse_tta(self.text)

    @property
    def active(self) -> bool:
        return len(self.augs) > 1

    def _maps(self, ids: Sequence[str] | None) -> None:
        from bench.raw import quantise

        got = self.take_maps() if self.take_maps else []
        if ids is not None and self.keep_raw:  # quantised at once: uint8 is what is kept
            self.maps.update({i: {k: quantise(v) for k, v in m.items()} for i, m in zip(ids, got) if m})

    def batch(self, samples: Sequence[Sample], record: bool = True) -> list[Instances]:
        """Several samples in one ``predict`` call (no TTA): raw kept, published returned."""
        from bench.raw import publish

        if self.active:
            return [self(s, record) for s in samples]
        outs = self.predict(list(samples))
        self._maps([s.image_id for s in samples] if record else None)
        if record and self.keep_raw:
            self.raw.update({s.image_id: {IDENTITY.name: o} for s, o in zip(samples, outs)})
        return [publish(o, self.threshold) for o in outs]

    def __call__(self, sample: Sample, record: bool = True) -> Instances:
        from bench.raw import publish

        if not self.active:
            return self.batch([sample], record)[0]
        t0 = time.perf_counter()
        outs, t_id = [], 0.0
        for aug in self.augs:
            ta = time.perf_counter()
            s = sample if aug == IDENTITY else transform_sample(sample, aug)
            out = invert(self.predict([s])[0], aug, sample.height, sample.width)
            self._maps([sample.image_id] if record and aug == IDENTITY else None)
            if aug == IDENTITY:
                t_id = time.perf_counter() - ta
            outs.append(out)
        merged = fuse_passes([publish(o, self.threshold) for o in outs])
        if self.resolve_overlaps:
            from bench.metrics.kaggle import resolve_overlaps

            merged = resolve_overlaps(merged)
        if record:
            self.identity_seconds.append(t_id)
            self.total_seconds.append(time.perf_counter() - t0)
            if self.keep_raw:
                self.raw[sample.image_id] = {a.name: o for a, o in zip(self.augs, outs)}
        return merged

    def raw_header(self, floor: float | None, predictions=None) -> dict:
        """What the raw cache's header says about how it was made (bench/raw.py reads it), with the
        digest of the ``predictions`` file published from it (a cache no longer matching is not used)."""
        from bench.raw import file_digest

        return {"score_floor": floor, "score_threshold": self.threshold, "passes": [a.name for a in self.augs],
                "resolve_overlaps_after_merge": bool(self.resolve_overlaps and self.active),
                "predictions_sha1": file_digest(predictions) if predictions is not None else None}

    def timing(self) -> dict:
        """What ``predict.done.json`` records about TTA (empty without TTA)."""
        if not self.active:
            return {}
        ident = 1000 * float(np.mean(self.identity_seconds)) if self.identity_seconds else None
        total = 1000 * float(np.mean(self.total_seconds)) if self.total_seconds else None
        return {"tta": self.text, "tta_passes": [a.name for a in self.augs], "tta_merge": MERGE_METHOD,
                "tta_identity_ms_per_image": ident,
                "tta_factor": (total / ident) if ident and total else None}


def fuse_passes(outs: Sequence[Instances]) -> Instances:
    """The passes of one image merged: mask IoU matching, mask and score averaging."""
    from bench.fusion import fuse_sets

    return fuse_sets(list(outs), None, MERGE_METHOD, MERGE_IOU)


# ---------------------------------------------------------------------------
# the raw cache: every pass of every image, inverted, before merging
# ---------------------------------------------------------------------------

def write_raw_outputs(path, raw: dict[str, dict[str, Instances]], classes: list[str], meta: dict | None = None) -> None:
    """``raw_outputs.jsonl.gz``: one line per (image, pass), the pass named in ``aug`` (atomic)."""
    import gzip
    import json

    from bench.data.predictions import FORMAT, encode_record
    from bench.util import atomic_write_bytes

    lines = [json.dumps({"format": FORMAT + "-raw", "version": 1, "classes": classes, **(meta or {})})]
    for iid, passes in raw.items():
        lines += [json.dumps({**encode_record(iid, inst), "aug": name}) for name, inst in passes.items()]
    atomic_write_bytes(path, gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0))


def read_raw_outputs(path) -> tuple[dict[str, dict[str, Instances]], dict]:
    """Image -> pass name -> instances, and the header; DataError naming the file and line."""
    import gzip
    import json
    from pathlib import Path

    from bench.data.errors import DataError
    from bench.data.predictions import decode_record

    path = Path(path)
    try:
        text = gzip.decompress(path.read_bytes()).decode()
    except FileNotFoundError:
        raise DataError(path, "raw outputs not found (only a model predicted with tta has them)") from None
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(path, f"raw outputs unreadable ({e})") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DataError(path, "raw outputs file is empty")
    header = json.loads(lines[0])
    out: dict[str, dict[str, Instances]] = {}
    for k, ln in enumerate(lines[1:], start=2):
        rec = json.loads(ln)
        iid, inst = decode_record(rec, f"{path}:{k}")
        out.setdefault(iid, {})[str(rec.get("aug", "identity"))] = inst
    return out, header
