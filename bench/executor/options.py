"""What an executor is asked for: its name, local slots, SLURM resources (no submitit import here).

:class:`SlurmOptions` is also the ``slurm:`` section of a sweep file; ``--slurm KEY=VALUE``
on the command line goes over it. Resource options never change results, so they are left
out of a sweep's identity (a resumed sweep may ask for another partition or time limit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bench.adapters.registry import ConfigError

EXECUTORS = ("local", "slurm")


class SlurmOptions(BaseModel):
    """Per-job resources of ``--executor slurm`` (sbatch's options of the same meaning)."""

    model_config = ConfigDict(extra="forbid")

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus: int = Field(0, ge=0)              # GPUs per job (--gpus-per-node)
    cpus: int = Field(1, ge=1)              # CPUs per job (--cpus-per-task): also the job's thread count
    mem_gb: float | None = Field(None, gt=0)  # memory per job (--mem)
    time_min: int = Field(60, ge=1)         # time limit per job (--time) in minutes
    max_parallel: int | None = Field(None, ge=1)   # jobs of the array running at once (--array=...%N)
    signal_delay_s: int = Field(90, ge=1)   # the USR2 before the time limit that checkpoints and requeues
    max_requeue: int = Field(3, ge=0)       # time-outs a job may be requeued after
    probe: bool = True                      # a first job checks the sweep folder is visible from the nodes
    additional: dict[str, Any] = Field(default_factory=dict)  # any other sbatch option, e.g. {constraint: a100}


def parse_slurm_options(base: dict[str, Any] | None, items: list[str], where: str = "--slurm") -> SlurmOptions:
    """The sweep file's ``slurm:`` section with ``KEY=VALUE`` items (YAML values) over it."""
    import yaml

    doc = dict(base or {})
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{where}: expected KEY=VALUE, got {item!r}")
        doc[key.strip()] = yaml.safe_load(value)
    try:
        return SlurmOptions(**doc)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '?'}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{where}: {problems} (options: {', '.join(SlurmOptions.model_fields)})") from None


@dataclass
class ExecutorSpec:
    """``--executor``, ``--jobs``, ``--gpus`` and the SLURM options of one ``bench sweep``."""

    name: str = "local"
    jobs: int = 1
    gpus: list[str] = field(default_factory=list)
    slurm: SlurmOptions = field(default_factory=SlurmOptions)

    def __post_init__(self) -> None:
        if self.name not in EXECUTORS:
            raise ConfigError(f"unknown executor {self.name!r} (one of {', '.join(EXECUTORS)})")
        if self.jobs < 1:
            raise ConfigError(f"--jobs must be >= 1, got {self.jobs}")
        if self.gpus and self.name == "local" and self.jobs > len(self.gpus):
            raise ConfigError(f"--jobs {self.jobs} with --gpus {','.join(self.gpus)}: each job gets its own GPU, "
                              f"so at most {len(self.gpus)} jobs at once")

    @property
    def serial(self) -> bool:
        """One job after the other in this process: exactly what ``bench sweep`` did before executors."""
        return self.name == "local" and self.jobs == 1 and not self.gpus


def parse_gpus(text: str | None) -> list[str]:
    """'0,1,3' -> ['0', '1', '3'] (CUDA device indices or UUIDs, as CUDA_VISIBLE_DEVICES takes them)."""
    if not text:
        return []
    gpus = [g.strip() for g in text.split(",") if g.strip()]
    if len(set(gpus)) != len(gpus):
        raise ConfigError(f"--gpus lists a GPU twice: {text!r}")
    return gpus
