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
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, ClassVar, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bench.data.sample import Instances, Sample

ProgressFn = Callable[[int, int, dict], None]  # (done, total, info)
LossLogFn = Callable[[dict], None]               # one record per logged step/epoch
PredictFn = Callable[[Sequence[Sample]], "list[Instances]"]


class AdapterConfig(BaseModel):
    """Base of every adapter's config: unknown keys and wrong types are errors before training."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    weights: str | None = None  # local file to start from; never downloaded
    # the one input policy (bench/data/normalize.py): identical for every model unless overridden
    input_norm: Literal["percentile", "minmax", "fixed"] = "percentile"
    input_percentiles: tuple[float, float] = (1.0, 99.8)
    # Kaggle mAP of the validation split every N iterations (epochs for Cellpose) during
    # training, for validation curves; 0: off. Never used for model selection.
    eval_every: int = Field(0, ge=0)
    # cellbench's test-time augmentation (bench/tta.py), the same for every model: none, flip,
    # scale, flip+scale, ... (a framework's own TTA, e.g. Cellpose's, is that adapter's native_tta)
    tta: str = "none"
    # images larger than this (px) are predicted as overlapping tiles stitched back at native scale
    # (bench/tiling.py), the same for every model; 0: whole images, as the model is
    # auto (detectors with train_crop=auto): the derived training crop, so train and test scales agree
    predict_tile: Annotated[int, Field(ge=0)] | Literal["auto"] = 0
    predict_tile_overlap: int = Field(64, ge=0)   # px shared by neighbouring tiles (> a cell's diameter)
    # the raw-output cache (bench/raw.py): an adapter with a score threshold of its own predicts down
    # to this floor once, the cache keeps all of it and the published predictions keep what passes
    # the configured threshold, as before
    raw_floor: float = Field(0.05, ge=0, le=1)

    @field_validator("tta")
    @classmethod
    def _tta_grammar(cls, v: str) -> str:
        from bench.tta import validate_tta

        return validate_tta(v)

    @model_validator(mode="after")
    def _tile_overlap(self):
        if isinstance(self.predict_tile, int) and self.predict_tile and self.predict_tile_overlap >= self.predict_tile:
            raise ValueError(f"predict_tile_overlap={self.predict_tile_overlap} must be smaller than "
                             f"predict_tile={self.predict_tile}")
        return self

    @field_validator("input_percentiles")
    @classmethod
    def _percentiles_ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"must satisfy 0 <= low < high <= 100, got {list(v)}")
        return v

    # issue 19: no option value may turn into a plausible wrong number
    @field_validator("*", mode="before")
    @classmethod
    def _no_yes_no_for_numbers(cls, v, info):
        """``min_distance=yes`` is YAML's True: refused for a number field, not read as 1."""
        if not _all_finite(v):  # before the bounds, whose message for NaN would be misleading
            raise ValueError("NaN and infinite values are not allowed")
        if isinstance(v, bool):
            ann = cls.model_fields[info.field_name].annotation
            kinds = {ann, *typing.get_args(ann)}
            if bool not in kinds and kinds & {int, float}:
                raise ValueError(f"{v!r} is a yes/no value, not a number")
        return v

    @field_validator("*", mode="after")
    @classmethod
    def _finite_numbers(cls, v):
        """``threshold_scale=.nan`` (or inf) is refused rather than scoring 0 without complaint."""
        if not _all_finite(v):
            raise ValueError("NaN and infinite values are not allowed")
        return v


def _all_finite(v) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, (list, tuple, set)):
        return all(_all_finite(x) for x in v)
    if isinstance(v, dict):
        return all(_all_finite(x) for x in v.values())
    return True


@dataclass(frozen=True)
class Capabilities:
    predicts_classes: bool
    overlapping_masks: bool          # raw predictions may overlap (evaluator resolves)
    devices: tuple[str, ...] = ("cpu", "cuda")
    trainable: bool = True
    needs_weights: bool = False      # cannot run without a weights file
    tta: tuple[str, ...] = ("flip", "scale")   # test-time transforms its output can be inverted for
    tta_note: str = ""               # why a kind is missing (shown when a tta option is refused)


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
    # validation curves: the samples, how often (0: never), where each point goes
    val: Sequence[Sample] = ()
    eval_every: int = 0
    log_val: LossLogFn | None = None
    validation_seconds: float = 0.0   # time spent in validate(), taken out of the training time
    # mid-training checkpoints (checkpoint_every; bench.store.ModelDir.resume): None, none are written
    # or read; on_begin(k) is called once before training, k the iteration a resumed fit continues
    # from (0: from the start), so the caller can trim its logs to what the checkpoint holds
    resume_dir: Path | None = None
    on_begin: Callable[[int], None] | None = None
    resumed_from: int = 0             # iteration the fit continued from (0: it started over)
    seconds_before: float = 0.0       # training seconds of the interrupted attempts before it
    _t0: float | None = None

    def report(self, done: int, total: int, **info) -> None:
        if self.progress:
            self.progress(done, total, info)

    def log(self, **record) -> None:
        """One training-log record in the shared schema (see :func:`log_record`)."""
        if self.log_loss:
            self.log_loss(log_record(record))

    def log_step(self, step: int, loss: float | None = None, parts: dict | None = None, lr: float | None = None,
                 epoch: int | None = None, seconds: float | None = None, **extra) -> None:
        """The shared schema spelled out: ``step``, ``epoch``, ``loss``, named loss parts, ``lr``,
        ``seconds`` (since the start of training when not given)."""
        import time

        if self._t0 is None:
            self._t0 = time.perf_counter()
        rec = {"step": int(step), "epoch": epoch, "loss": loss, **(parts or {}), "lr": lr,
               "seconds": round(time.perf_counter() - self._t0, 4) if seconds is None else seconds, **extra}
        self.log(**{k: v for k, v in rec.items() if v is not None})

    def start_clock(self) -> None:
        """Mark the start of training: ``seconds`` of log records count from here."""
        import time

        self._t0 = time.perf_counter()

    def begin(self, iteration: int = 0, seconds: float = 0.0) -> None:
        """Training starts at ``iteration`` (a resumed fit: after ``seconds`` of earlier training,
        which the log's clock continues from)."""
        import time

        self.resumed_from, self.seconds_before = int(iteration), float(seconds)
        self._t0 = time.perf_counter() - self.seconds_before
        if self.on_begin:
            self.on_begin(self.resumed_from)

    def training_seconds(self) -> float:
        """Seconds of training so far (earlier attempts of a resumed fit included, validation not)."""
        import time

        if self._t0 is None:
            return 0.0
        return time.perf_counter() - self._t0 - self.validation_seconds

    @property
    def curve_wanted(self) -> bool:
        """Whether a validation curve was asked for (and there is a validation split)."""
        return bool(self.eval_every and self.val)

    def validation_due(self, step: int, total: int) -> bool:
        """Every ``eval_every`` steps and at the last one, when there is a validation split."""
        return self.curve_wanted and (step % self.eval_every == 0 or step == total)

    def validate(self, step: int, predict: PredictFn) -> float:
        """Kaggle mAP of ``predict`` on the validation split, logged as one curve point.

        The adapter passes a function predicting with its current (mid-training) weights
        and must restore its training mode afterwards. Overlapping predictions are
        resolved as the evaluator does for the final score, so curve and result agree.
        """
        import time

        from bench.metrics.kaggle import quick_map

        t0 = time.perf_counter()
        owner = getattr(predict, "__self__", None)  # the adapter's own predict: tiled as the final one is
        if owner is not None and getattr(getattr(owner, "cfg", None), "predict_tile", 0):
            from bench.tiling import predictor

            predict = predictor(owner)
        preds = predict(list(self.val))
        value = quick_map([s.instances for s in self.val], preds)
        took = time.perf_counter() - t0
        self.validation_seconds += took
        if self.log_val:
            self.log_val({"step": int(step), "kaggle_map": value, "seconds": round(took, 3)})
        return value


class Adapter(abc.ABC):
    """A segmentation model. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    framework: ClassVar[str]               # distribution name, for version and install checks
    framework_modules: ClassVar[tuple[str, ...]] = ()  # modules that must import
    install_hint: ClassVar[str] = ""
    environment: ClassVar[str] = "main"    # the Python environment its worker runs in (bench/envs.py)
    capabilities: ClassVar[Capabilities]
    Config: ClassVar[type[AdapterConfig]] = AdapterConfig
    # the file inside a ``save``d checkpoint that ``weights=`` accepts: what a sweep's pretrain
    # stage hands to the next stage (None: the model cannot start from its own checkpoint)
    warm_start_name: ClassVar[str | None] = None

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

    @classmethod
    def warm_start_file(cls, checkpoint: Path) -> Path:
        """``checkpoint`` (a folder ``save`` wrote) -> the weights file to give as ``weights=``."""
        if cls.warm_start_name is None:
            raise ValueError(f"{cls.name} cannot start from its own checkpoint (no pretrain stage for it)")
        return Path(checkpoint) / cls.warm_start_name

    # ---- the work ------------------------------------------------------------
    @abc.abstractmethod
    def fit(self, train: Sequence[Sample], val: Sequence[Sample], cfg: AdapterConfig, ctx: FitContext) -> None:
        """Train on ``train`` (``val`` only for monitoring; never for model selection by default)."""

    # ---- raw outputs (bench/raw.py) --------------------------------------------------
    # while the worker captures raw outputs: the floor the adapter predicts down to instead of
    # its configured score threshold, and where it appends per-pixel maps, one dict per sample
    raw_floor: float | None = None
    raw_maps: list | None = None

    def score_threshold(self) -> float | None:
        """The configured instance score threshold its published predictions keep scores above
        (strictly, as the frameworks do); None: it has none, raw and published are the same."""
        return None

    def predict_threshold(self) -> float | None:
        """The threshold to hand the framework now: the configured one, or the raw floor if lower."""
        thr = self.score_threshold()
        return thr if thr is None or self.raw_floor is None else min(thr, self.raw_floor)

    def keep_map(self, **maps) -> None:
        """Record per-pixel maps of the sample just predicted (only while raw maps are captured)."""
        if self.raw_maps is not None:
            self.raw_maps.append(maps)

    @classmethod
    def tta_capabilities(cls, cfg: AdapterConfig) -> Capabilities:
        """The capabilities for this config (an adapter whose TTA support depends on an option overrides)."""
        return cls.capabilities

    @abc.abstractmethod
    def predict(self, samples: Sequence[Sample]) -> list[Instances]:
        """One :class:`Instances` per sample, same order, with scores (and classes if predicted)."""

    @abc.abstractmethod
    def save(self, directory: Path) -> None:
        """Everything needed to predict again: weights and the config they were trained with."""

    @abc.abstractmethod
    def load(self, directory: Path) -> None:
        """Restore what ``save`` wrote; predictions must be identical afterwards."""


# the one training-log schema: these names, whatever the framework calls them
LOG_ALIASES = {"iteration": "step", "iter": "step", "time": "seconds", "time_s": "seconds"}


def log_record(record: dict) -> dict:
    """A record in the shared schema (``step``, ``epoch``, ``loss``, loss parts, ``lr``, ``seconds``):
    framework spellings (``iteration``, ``time``, ``time_s``) are renamed, values made plain floats."""
    out = {}
    for k, v in record.items():
        key = LOG_ALIASES.get(k, k)
        if hasattr(v, "item"):
            v = v.item()
        out[key] = v
    return out


def check_weights_file(path: str | None, what: str = "weights") -> Path | None:
    """A configured weights file must exist locally: cellbench never downloads."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} file {p} does not exist (cellbench never downloads weights: "
                                "download it yourself and give its local path)")
    return p
