"""Classical baseline: threshold, distance transform, watershed. No training, no classes.

The floor every learned model must clear. It reads its pixels through the same input
policy as the models (:mod:`bench.data.normalize`, its ``input_norm`` / ``input_percentiles``
options), made gray by the channel mean, so the floor row sees what the models see.
Phase-contrast cells differ from the background by local contrast (halos, texture)
rather than by brightness, so the foreground is thresholded on the smoothed absolute
deviation from a blurred background, not on raw intensity.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from pydantic import Field

from bench.adapters.base import Adapter, AdapterConfig, Capabilities, FitContext
from bench.adapters.registry import register
from bench.data.normalize import InputPolicy, normalize, to_gray
from bench.data.sample import Instances, Sample


class WatershedConfig(AdapterConfig):
    # phase contrast: local contrast; fluorescence (bright cells on dark): plain intensity
    feature: Literal["contrast", "intensity"] = "contrast"
    # bounds checked before anything runs (NaN/inf and yes/no words are refused by AdapterConfig)
    background_sigma: float = Field(12.0, gt=0)   # px; scale of the illumination/background estimate
    smooth_sigma: float = Field(1.5, ge=0)        # px; smoothing of the contrast image (0: none)
    threshold: Literal["otsu", "li", "triangle"] = "otsu"
    threshold_scale: float = Field(1.0, gt=0)     # multiply the automatic threshold
    min_distance: int = Field(4, ge=1)            # px between seeds
    min_size: int = Field(20, ge=0)               # px; smaller objects are dropped
    fill_holes: bool = True


@register("watershed")
class WatershedAdapter(Adapter):
    framework = "scikit-image"
    framework_modules = ("skimage", "scipy.ndimage")
    install_hint = "pip install scikit-image scipy"
    capabilities = Capabilities(predicts_classes=False, overlapping_masks=False, devices=("cpu",), trainable=False)
    Config = WatershedConfig

    def fit(self, train: Sequence[Sample], val: Sequence[Sample], cfg: AdapterConfig, ctx: FitContext) -> None:
        self.cfg = cfg  # nothing to learn: the baseline is defined by its config
        ctx.report(1, 1)

    def predict(self, samples: Sequence[Sample]) -> list[Instances]:
        return [self.segment(s.image) for s in samples]

    def segment(self, image: np.ndarray) -> Instances:
        from scipy import ndimage as ndi
        from skimage import filters, segmentation
        from skimage.feature import peak_local_max

        c: WatershedConfig = self.cfg  # type: ignore[assignment]
        img = to_gray(normalize(image, InputPolicy.of(c)))  # float32 in [0, 1], as the models see it
        if c.feature == "contrast":
            contrast = filters.gaussian(np.abs(img - filters.gaussian(img, c.background_sigma)), c.smooth_sigma)
        else:
            contrast = filters.gaussian(img, c.smooth_sigma)
        thr_fn = {"otsu": filters.threshold_otsu, "li": filters.threshold_li, "triangle": filters.threshold_triangle}
        fg = contrast > thr_fn[c.threshold](contrast) * c.threshold_scale
        if c.fill_holes:
            fg = ndi.binary_fill_holes(fg)
        fg = _drop_small(ndi.label(fg)[0], c.min_size) > 0
        dist = ndi.distance_transform_edt(fg)
        peaks = peak_local_max(dist, min_distance=c.min_distance, labels=ndi.label(fg)[0], exclude_border=False)
        markers = np.zeros(fg.shape, dtype=np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        labels = segmentation.watershed(-dist, markers, mask=fg)
        labels = _drop_small(labels, c.min_size)
        # score: mean contrast inside the cell, scaled to [0, 1] (ranks cells for COCO AP)
        n = int(labels.max())
        sums = ndi.sum_labels(contrast, labels, index=np.arange(1, n + 1)) if n else np.zeros(0)
        sizes = ndi.sum_labels(np.ones_like(contrast), labels, index=np.arange(1, n + 1)) if n else np.zeros(0)
        mean = np.divide(sums, sizes, out=np.zeros_like(sums), where=sizes > 0)
        return Instances.from_label_image(labels, scores=mean / (mean.max() + 1e-9) if n else mean)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "watershed.json").write_text(self.cfg.model_dump_json(indent=1))

    def load(self, directory: Path) -> None:
        self.cfg = self.Config(**json.loads((directory / "watershed.json").read_text()))


def _drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Zero out labelled objects with fewer than ``min_size`` pixels."""
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    return np.where(small[labels], 0, labels)
