"""Per-job resources: what one model's job asks of the machine or the cluster.

A model's config (``configs/<model>.yaml``) declares them in a top-level ``resources:`` block,
optionally per preset (the shipped detectors ask for one GPU, watershed for none)::

    resources:
      gpus: 1          # GPUs per job when the run is on cuda (a CPU run asks for none)
      cpus: 4          # cores per job (also its thread count)
      mem_gb: 16       # memory per job
      time_min: 240    # time limit per job (SLURM; locally --timeout is the limit)
      presets:
        smoke: {cpus: 2, time_min: 30}

Precedence, lowest first: the model's ``resources`` (its preset's over its own), the sweep file's
``slurm:`` section, ``--slurm KEY=VALUE`` on the command line (only the keys actually given in the
file or on the command line go over the model's). The local executor uses ``gpus``, ``cpus`` and
``mem_gb`` to decide which jobs fit at once; SLURM gets all four as the job's options. Resources
never change results, so they are no part of a run's or a sweep's identity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bench.adapters.registry import ConfigError

KEYS = ("gpus", "cpus", "mem_gb", "time_min")


class Resources(BaseModel):
    """One job's resources; None: not said (the executor's default)."""

    model_config = ConfigDict(extra="forbid")

    gpus: int | None = Field(None, ge=0)
    cpus: int | None = Field(None, ge=1)
    mem_gb: float | None = Field(None, gt=0)
    time_min: int | None = Field(None, ge=1)

    def over(self, other: "Resources") -> "Resources":
        """``other`` with what this one says on top."""
        return Resources(**{**other.model_dump(exclude_none=True), **self.model_dump(exclude_none=True)})

    def key(self) -> tuple:
        return tuple(getattr(self, k) for k in KEYS)

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.model_dump(exclude_none=True).items()) or "executor defaults"


def _problems(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or '?'}: {err['msg']}" for err in e.errors())


def parse_block(block: Any, where: str) -> Resources:
    """A ``resources:`` mapping (without ``presets``), every problem naming ``where``."""
    if block is None:
        return Resources()
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: expected a mapping of {', '.join(KEYS)}, got {block!r}")
    try:
        return Resources(**block)
    except ValidationError as e:
        raise ConfigError(f"{where}: {_problems(e)} (keys: {', '.join(KEYS)})") from None


def model_resources(name: str, preset: str, config_root: Path | None = None) -> Resources:
    """The ``resources:`` of ``configs/<name>.yaml`` for ``preset`` (the preset's keys over the
    block's own); none declared: all None. Bad keys or values: a ConfigError naming the file."""
    import yaml

    from bench.adapters.registry import config_dir

    path = (config_root or config_dir()) / f"{name}.yaml"
    if not path.is_file():
        return Resources()
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    block = doc.get("resources")
    if block is None:
        return Resources()
    if not isinstance(block, dict):
        raise ConfigError(f"{path}: resources: expected a mapping of {', '.join(KEYS)}, got {block!r}")
    block = dict(block)
    presets = block.pop("presets", None) or {}
    if not isinstance(presets, dict):
        raise ConfigError(f"{path}: resources.presets: expected a mapping preset -> resources, got {presets!r}")
    unknown = [p for p in presets if p not in (doc.get("presets") or {})]
    if unknown:
        raise ConfigError(f"{path}: resources.presets: no preset {unknown[0]!r} in this file "
                          f"(has {', '.join(doc.get('presets') or {}) or 'none'})")
    own = parse_block(block, f"{path}: resources")
    return parse_block(presets.get(preset), f"{path}: resources.presets.{preset}").over(own)


def given(opts: Any) -> Resources:
    """The resource keys a sweep file's ``slurm:`` section or ``--slurm`` actually set (a
    :class:`bench.executor.options.SlurmOptions`): only those go over the model's."""
    return Resources(**{k: getattr(opts, k) for k in KEYS if k in opts.model_fields_set})


def job_resources(model: str, preset: str, opts: Any, config_root: Path | None = None) -> Resources:
    """A job's resources: the model's (its preset's) under what the sweep file's ``slurm:`` section
    and ``--slurm`` said (``opts``: the :class:`SlurmOptions` made of both, the command line's over
    the file's)."""
    return given(opts).over(model_resources(model, preset, config_root))


def job_gpus(res: Resources, device: str, model_devices: tuple[str, ...]) -> int:
    """GPUs the job takes: none on a CPU run or for a model that runs on the CPU only (the runner's
    plan puts it there), else the resources' count (1 when unsaid; 0 for a job on cuda: ValueError)."""
    if not device.startswith("cuda") or "cuda" not in model_devices:
        return 0
    if res.gpus == 0:
        raise ValueError("resources give it gpus=0 but it runs on cuda (give it a GPU, or --device cpu)")
    return 1 if res.gpus is None else res.gpus
