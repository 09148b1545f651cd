"""The one input policy: how every model's pixels are scaled before it sees them.

Fairness starts at the input. Before this module each adapter scaled intensities its own way
(divide by the dtype maximum, by each image's maximum, by training-set percentiles, by
per-image percentiles), so a uint16 phase-contrast image reached four models four ways.
Now every adapter calls :func:`normalize` with the same :class:`InputPolicy` (the
``input_norm`` / ``input_percentiles`` options of every model, identical by default and
recorded in the manifest and in each checkpoint), then only re-lays the result out for
its framework (channels, tensor type, uint8 for frameworks that read files).

Policies (all return float32 in [0, 1], channels kept: H x W or H x W x 3):

* ``percentile`` (default): each image's low/high percentiles (1, 99.8: CSBDeep/StarDist's
  ``normalize``; Cellpose uses 1/99) map to 0/1, values outside are clipped. Robust to
  bit depth, exposure and hot pixels; the choice of the two cell-segmentation tool kits.
* ``minmax``: each image's minimum/maximum map to 0/1.
* ``fixed``: divide by the dtype's range (255 for 8-bit, 65535 for 16-bit, no change for
  floats already in [0, 1]); keeps absolute intensities comparable across images.

RGBA images lose their alpha channel; two-channel images are not segmentation inputs here.
RGB statistics are taken over all three channels together, so colour balance is kept.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

InputNorm = Literal["percentile", "minmax", "fixed"]
POLICIES: tuple[str, ...] = ("percentile", "minmax", "fixed")


@dataclass(frozen=True)
class InputPolicy:
    norm: InputNorm = "percentile"
    percentiles: tuple[float, float] = (1.0, 99.8)

    def __post_init__(self) -> None:
        if self.norm not in POLICIES:
            raise ValueError(f"input_norm must be one of {', '.join(POLICIES)}, got {self.norm!r}")
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"input_percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")

    @classmethod
    def of(cls, cfg) -> "InputPolicy":
        """The policy of an adapter config (its ``input_norm`` and ``input_percentiles``)."""
        return cls(getattr(cfg, "input_norm", "percentile"),
                   tuple(getattr(cfg, "input_percentiles", (1.0, 99.8))))  # type: ignore[arg-type]

    def as_dict(self) -> dict:
        d = asdict(self)
        d["percentiles"] = list(self.percentiles)
        return d

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return normalize(image, self)


def drop_alpha(image: np.ndarray) -> np.ndarray:
    """H x W x 4 -> H x W x 3; anything else as is (a single channel axis is squeezed)."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 4:
        return img[:, :, :3]
    if img.ndim == 3 and img.shape[2] == 1:
        return img[:, :, 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise ValueError(f"expected a grayscale, RGB or RGBA image, got an array of shape {img.shape}")
    return img


def _dtype_range(img: np.ndarray) -> float:
    if img.dtype == np.uint8:
        return 255.0
    if img.dtype == np.uint16:
        return 65535.0
    if np.issubdtype(img.dtype, np.integer):
        return float(np.iinfo(img.dtype).max)
    return 1.0


def normalize(image: np.ndarray, policy: InputPolicy = InputPolicy()) -> np.ndarray:
    """``image`` (any bit depth, gray/RGB/RGBA) -> float32 in [0, 1] under ``policy``."""
    img = drop_alpha(image)
    x = img.astype(np.float32, copy=False)
    if policy.norm == "fixed":
        out = x / np.float32(_dtype_range(img))
    else:
        if policy.norm == "percentile":
            # a strided sample keeps this O(1e5) on large images; exact for small ones
            flat = x.reshape(-1)
            step = max(1, flat.size // 1_000_000)
            lo, hi = np.percentile(flat[::step], policy.percentiles)
        else:
            lo, hi = float(x.min()), float(x.max())
        if hi <= lo:  # a flat image: all zeros, not a division by zero
            return np.zeros(x.shape, np.float32)
        out = (x - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out if out is not x else None).astype(np.float32, copy=False)


def to_uint8(image01: np.ndarray) -> np.ndarray:
    """A normalised image -> uint8 0..255, for frameworks that read image files (MMDetection)."""
    return np.round(np.asarray(image01, np.float32) * 255.0).astype(np.uint8)


def to_gray(image01: np.ndarray) -> np.ndarray:
    """H x W x 3 -> H x W by the channel mean (what Cellpose's channels=[0, 0] does); gray as is."""
    return image01.mean(axis=2, dtype=np.float32) if image01.ndim == 3 else image01


def to_rgb(image01: np.ndarray) -> np.ndarray:
    """H x W -> H x W x 3 (gray copied to three channels, what ImageNet-shaped backbones take)."""
    return np.repeat(image01[:, :, None], 3, axis=2) if image01.ndim == 2 else image01
