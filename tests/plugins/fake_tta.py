"""A fake adapter whose output cannot be inverted (it declares no TTA): every tta is refused."""

from __future__ import annotations

from bench.adapters.base import Adapter, Capabilities
from bench.adapters.registry import register


@register("fake-noinvert")
class FakeNoInvert(Adapter):
    framework = "numpy"
    framework_modules = ("numpy",)
    capabilities = Capabilities(predicts_classes=True, overlapping_masks=True, devices=("cpu",), tta=(),
                                tta_note="it predicts in a cropped frame it does not report")

    def fit(self, train, val, cfg, ctx):
        raise AssertionError("a refused tta must stop the run before fit")

    def predict(self, samples):
        raise AssertionError("a refused tta must stop the run before predict")

    def save(self, directory):
        directory.mkdir(parents=True, exist_ok=True)

    def load(self, directory):
        pass
