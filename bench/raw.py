"""Raw outputs: every instance a model produced above a low floor, and its per-pixel maps.

Why: post-processing variants (``bench tune``'s thresholds, ``bench ensemble``'s fusion) must
never re-run inference, and they can only undo a threshold the cache has not applied already.

* **Instances.** An adapter with a score threshold of its own (torchvision's
  ``box_score_thresh``, Detectron2's ``score_thresh_test``, Cascade's ``score_thr``, YOLO's
  ``conf``, StarDist's ``prob_thresh``) declares it (``Adapter.score_threshold``) and, while the
  worker captures raw outputs, hands the framework ``min(threshold, raw_floor)`` instead
  (``Adapter.predict_threshold``; ``raw_floor`` is the one shared option, default 0.05). The
  cache (``raw_outputs.jsonl.gz``) keeps all of it; the published predictions keep the instances
  scoring strictly above the configured threshold (:func:`publish`, compared in float32 as the
  frameworks do). Every framework applies its threshold before NMS and its detection cap, and a
  lower-scoring box never suppresses a higher one, so the published set is the one predicting at
  the threshold gives (checked on a smoke run: ``tests/test_raw_outputs.py``). The detection cap
  (``detections_per_image``, ``max_det``) still bounds the cache. Cellpose and watershed have no
  instance score threshold: their cache holds the published instances.
* **Per-pixel maps.** Where the model has them (Cellpose's cell probability, StarDist's object
  probability, at StarDist's grid resolution), quantised to uint8 (``round(255 p)``: at most
  1/510 off) in one compressed ``npz`` per image (``ModelDir.raw_map``). Identity pass only.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from bench.data.errors import DataError
from bench.data.sample import Instances

PROB_LEVELS = 255  # uint8 quantisation of a probability in [0, 1]


def file_digest(path) -> str:
    """sha1 of a file's bytes: ties the raw cache to the predictions file published from it."""
    import hashlib

    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def publish(inst: Instances, threshold: float | None) -> Instances:
    """The instances scoring strictly above ``threshold`` (float32 comparison, as the frameworks)."""
    if threshold is None or inst.scores is None or len(inst.counts) == 0:
        return inst
    keep = np.asarray(inst.scores, dtype=np.float32) > np.float32(threshold)
    if keep.all():
        return inst
    return Instances(inst.height, inst.width, [c for c, k in zip(inst.counts, keep) if k],
                     np.asarray(inst.classes)[keep], np.asarray(inst.scores)[keep])


def begin_capture(adapter, floor: float | None, maps: bool = True) -> None:
    """From now on the adapter predicts down to ``floor`` and records per-pixel maps."""
    adapter.raw_floor, adapter.raw_maps = floor, ([] if maps else None)


def end_capture(adapter) -> None:
    """Back to predicting at its configured threshold, recording nothing."""
    adapter.raw_floor, adapter.raw_maps = None, None


@contextlib.contextmanager
def capture(adapter, floor: float | None, maps: bool = True) -> Iterator[None]:
    """While inside: :func:`begin_capture`; afterwards :func:`end_capture`."""
    begin_capture(adapter, floor, maps)
    try:
        yield
    finally:
        end_capture(adapter)


def take_maps(adapter) -> list[dict]:
    """The maps recorded since the last call (one dict per predicted sample), cleared."""
    got = list(adapter.raw_maps or [])
    if adapter.raw_maps is not None:
        adapter.raw_maps.clear()
    return got


# ---------------------------------------------------------------------------
# per-pixel maps: uint8 in a compressed npz
# ---------------------------------------------------------------------------

def quantise(prob: np.ndarray) -> np.ndarray:
    """A probability map as uint8 (0..255); values outside [0, 1] are clipped."""
    return np.rint(np.clip(np.asarray(prob, dtype=np.float32), 0.0, 1.0) * PROB_LEVELS).astype(np.uint8)


def dequantise(q: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) / PROB_LEVELS


def write_maps(path: Path, maps: dict[str, np.ndarray], meta: dict | None = None) -> int:
    """``path``: the maps (already uint8) and a JSON header, compressed; returns its size in bytes."""
    import io

    from bench.util import atomic_write_bytes

    bad = [k for k, v in maps.items() if np.asarray(v).dtype != np.uint8]
    if bad:
        raise ValueError(f"maps {bad} are not quantised (uint8): use quantise()")
    buf = io.BytesIO()
    header = {"encoding": f"uint8 probability x{PROB_LEVELS}", **(meta or {})}
    np.savez_compressed(buf, __meta__=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **maps)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return len(buf.getvalue())


def write_raw_maps(md, maps: dict[str, dict], meta: dict | None = None) -> float | None:
    """Each image's maps (quantised, :func:`quantise`) to ``md.raw_map(image_id)``; the mean size per
    image in bytes (None when the model has no maps)."""
    sizes = [write_maps(md.raw_map(iid), m, {"image_id": iid, **(meta or {})})
             for iid, m in maps.items()]
    return float(np.mean(sizes)) if sizes else None


def read_maps(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The maps as float32 probabilities, and the header; DataError naming the file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(bytes(z["__meta__"]).decode())
            maps = {k: dequantise(z[k]) for k in z.files if k != "__meta__"}
    except FileNotFoundError:
        raise DataError(path, "no per-pixel maps cached for this image (only Cellpose and StarDist have them)") from None
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise DataError(path, f"per-pixel maps unreadable ({type(e).__name__}: {e})") from None
    return maps, header


# ---------------------------------------------------------------------------
# reading the cache for post-processing
# ---------------------------------------------------------------------------

def cached_predictions(md) -> tuple[dict[str, Instances], str, float] | None:
    """A model folder's un-thresholded predictions per image, what they are, and the score floor;
    None without a cache holding a score floor (an older run: its predictions are all there is).

    One pass: that pass. Several (TTA): the passes merged as the model merged them (overlaps
    resolved where the adapter declares none), before its threshold."""
    from bench.tta import fuse_passes, read_raw_outputs

    if not md.raw_outputs.is_file():
        return None
    raw, header = read_raw_outputs(md.raw_outputs)
    if header.get("score_floor") is None:
        return None
    if header.get("predictions_sha1") and header["predictions_sha1"] != file_digest(md.predictions):
        return None  # the predictions were rewritten since (by hand, or by a tool): the cache is not theirs
    out = {}
    for iid, passes in raw.items():
        if len(passes) == 1:
            out[iid] = next(iter(passes.values()))
        else:
            merged = fuse_passes(list(passes.values()))
            if header.get("resolve_overlaps_after_merge"):
                from bench.metrics.kaggle import resolve_overlaps

                merged = resolve_overlaps(merged)
            out[iid] = merged
    floor = float(header["score_floor"])
    return out, f"raw outputs (score floor {floor:g}, threshold {header.get('score_threshold')})", floor
