"""The one interface every model sits behind (installed as ``bench.adapters.base``).

Modelled on lm-evaluation-harness' ``api/model.py``: an abstract class, capabilities
declared up front (so the runner can refuse a job before training rather than fail
after), and models built from a name plus ``key=value`` options. Framework imports
live inside each adapter module's methods, never at module import time, so
``bench models`` works whatever is installed.
"""

from __future__ import annotations

import abc
import importlib
import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Sequence

from pydantic import BaseModel, ConfigDict

from bench.data.sample import Instances, Sample

ProgressFn = Callable[[int, int, dict], None]  # (done, total, info)
LossLogFn = Callable[[dict], None]               # one record per logged step/epoch


class AdapterConfig(BaseModel):
    """Base of every adapter's config: unknown keys and wrong types are errors before training."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    weights: str | None = None  # local file to start from; never downloaded


@dataclass(frozen=True)
class Capabilities:
    predicts_classes: bool
    overlapping_masks: bool          # raw predictions may overlap (evaluator resolves)
    devices: tuple[str, ...] = ("cpu", "cuda")
    trainable: bool = True
    needs_weights: bool = False      # cannot run without a weights file


@dataclass
class Availability:
    ok: bool
    version: str | None = None
    hint: str = ""


@dataclass
class FitContext:
    """What the runner hands to ``fit``: where to write, how to report."""

    workdir: Path
    device: str = "cpu"
    seed: int = 0
    progress: ProgressFn | None = None
    log_loss: LossLogFn | None = None
    extra: dict = field(default_factory=dict)

    def report(self, done: int, total: int, **info) -> None:
        if self.progress:
            self.progress(done, total, info)

    def log(self, **record) -> None:
        if self.log_loss:
            self.log_loss(record)


class Adapter(abc.ABC):
    """A segmentation model. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    framework: ClassVar[str]               # distribution name, for version and install checks
    framework_modules: ClassVar[tuple[str, ...]] = ()  # modules that must import
    install_hint: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities]
    Config: ClassVar[type[AdapterConfig]] = AdapterConfig

    def __init__(self, cfg: AdapterConfig, classes: Sequence[str], device: str = "cpu"):
        self.cfg = cfg
        self.classes = list(classes)
        self.device = device

    # ---- declared up front -------------------------------------------------
    @classmethod
    def available(cls) -> Availability:
        """Whether the framework imports here, its version, and how to install it if not."""
        for mod in cls.framework_modules:
            try:
                importlib.import_module(mod)
            except Exception as e:  # ImportError, or a broken compiled extension
                return Availability(False, None, f"{cls.install_hint} ({type(e).__name__}: {e})")
        try:
            version = importlib.metadata.version(cls.framework)
        except importlib.metadata.PackageNotFoundError:
            version = None
        return Availability(True, version, "")

    # ---- the work ------------------------------------------------------------
    @abc.abstractmethod
    def fit(self, train: Sequence[Sample], val: Sequence[Sample], cfg: AdapterConfig, ctx: FitContext) -> None:
        """Train on ``train`` (``val`` only for monitoring; never for model selection by default)."""

    @abc.abstractmethod
    def predict(self, samples: Sequence[Sample]) -> list[Instances]:
        """One :class:`Instances` per sample, same order, with scores (and classes if predicted)."""

    @abc.abstractmethod
    def save(self, directory: Path) -> None:
        """Everything needed to predict again: weights and the config they were trained with."""

    @abc.abstractmethod
    def load(self, directory: Path) -> None:
        """Restore what ``save`` wrote; predictions must be identical afterwards."""


def check_weights_file(path: str | None, what: str = "weights") -> Path | None:
    """A configured weights file must exist locally: cellbench never downloads."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} file {p} does not exist (cellbench never downloads weights: "
                                "download it yourself and give its local path)")
    return p
