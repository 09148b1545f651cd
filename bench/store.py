"""The run folder's layout, in one place: every path, every record, the one-writer lock.

Layout (unchanged file names, so older ``results/`` read as before)::

    RUN/manifest.json          Manifest: what was asked, where each model runs, state of each model
    RUN/split.json             the split (bench.data.split writes and reads its content)
    RUN/run.lock               advisory lock: pid and host of the one process writing RUN
    RUN/models/<label>/        ModelDir:
        config.yaml            the model's validated config
        job.json               Job: what the worker is to do (spec, config, data, device, stages)
        status.json            Status: running / done / failed / interrupted, stage, error
        log.txt                the worker's stdout and stderr
        train_log.jsonl        one line per logged training step
        val_curve.jsonl        validation-curve points
        work/                  the adapter's scratch folder during fit
        resume/                mid-training checkpoints (checkpoint_every): state.json + iter<k>/; removed
                               once fit.done.json is written, kept while the fit is unfinished
        checkpoint/            what ``Adapter.save`` wrote (``checkpoint.tmp`` while being written)
        fit.done.json          FitDone: the fit stage finished (timings, memory)
        predictions.jsonl.gz   validation predictions
        predict.done.json      PredictDone: the predict stage finished (timings, memory)
        metrics.json           the evaluator's scores (+ timings, device): the model is finished
        tuning.json            ``bench tune``'s thresholds
        matches.csv.gz         the match table: every gt and predicted instance (bench.metrics.matches)
        match_pairs.csv.gz     every overlapping gt/pred pair of the match table

    RUN/executor.json          where a sweep's executor ran the run (job ids, its stdout/stderr)

    SWEEP/sweep.json, SWEEP/split.json, SWEEP/runs/<variant>/seed<k>[-pretrain<j>]/  (SweepDir)
    SWEEP/jobs/<variant>/seed<k>/   SweepJobDir: request.json, state.json, log.txt of an executor's job
    SWEEP/jobs/<variant>/seed<k>-pretrain<j>/   the same for a pretrain stage's own job
    RUN/jobs/<label>/               the same for one model's job of ``bench run --jobs N`` / SLURM
    RUN/slurm/                      submitit's folder of ``bench run --executor slurm``
    SWEEP/slurm/                    submitit's folder (sbatch scripts, pickles, %j_%t_log.out/.err)

Nothing else in ``bench`` spells these names. Records are written atomically
(:func:`bench.util.atomic_write_json`) and read back into dataclasses; keys a record
does not know (written by another version) are kept in ``extra`` and written back.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import platform
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.util import atomic_write_json, atomic_write_text

MANIFEST = "manifest.json"
SPLIT = "split.json"
LOCK = "run.lock"
MODELS = "models"
SWEEP_MANIFEST = "sweep.json"
SWEEP_RUNS = "runs"


# ---------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------

class _Record:
    """A dataclass that reads/writes a JSON object, keeping keys it does not know in ``extra``."""

    extra: dict

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}  # type: ignore[arg-type]
        known = {k: v for k, v in d.items() if k in names}
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})  # type: ignore[call-arg]

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}  # type: ignore[arg-type]
        return {**self.extra, **out}

    @classmethod
    def read(cls, path: Path):
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            from bench.data.errors import DataError

            raise DataError(path, f"not JSON ({e})") from None
        if not isinstance(d, dict):
            from bench.data.errors import DataError

            raise DataError(path, "not a JSON object")
        return cls.from_dict(d)

    def write(self, path: Path) -> None:
        atomic_write_json(path, self.to_dict())


@dataclass
class DevicePlan:
    """Where one model runs: decided by the parent from the adapter's declared capabilities."""

    device: str                 # what the worker uses: cpu, cuda, cuda:1
    requested: str              # the run's (resolved) device
    fit: str = "train"          # "train" | "skip" (the adapter is not trainable: nothing to fit)
    resolve_overlaps: bool = True   # the adapter's raw masks may overlap: the evaluator resolves them
    note: str = ""              # why device differs from requested, or why fit is skipped

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DevicePlan":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Manifest(_Record):
    """``manifest.json``: what was asked (command, configs, seed, split, versions, host) and what came of it."""

    models: list[str]
    preset: str
    seed: int
    data: str
    configs: dict[str, dict] = field(default_factory=dict)
    device: str = "cpu"                                   # the run's device (cuda:N keeps its index)
    gpu: str | None = None                                # name of that device, if a GPU
    devices: dict[str, dict] = field(default_factory=dict)  # label -> DevicePlan.to_dict()
    # spec -> the input policy its model reads images with (bench/data/normalize.py; the same by default)
    input_policies: dict[str, dict] = field(default_factory=dict)
    command: str = ""
    builtin_data: bool = False
    dataset: str = ""
    classes: list[str] = field(default_factory=list)
    split_hash: str = ""
    dataset_hash: str = ""
    n_train: int = 0
    n_val: int = 0
    train_on: str = "train"
    packages: dict[str, str | None] = field(default_factory=dict)
    git_commit: str | None = None
    python: str = ""
    host: str = ""
    platform: str = ""
    cpu_count: int | None = None
    started: str = ""
    finished: str | None = None
    models_state: dict[str, dict] = field(default_factory=dict)  # label -> {"state", "detail", "device"}
    extra: dict = field(default_factory=dict)


@dataclass
class Job(_Record):
    """``job.json``: everything the worker needs (it reads nothing else but the data and the split)."""

    spec: str
    label: str
    config: dict
    data: str
    device: str
    seed: int
    train_on: str = "train"
    requested_device: str | None = None
    fit: str = "train"               # "train" | "skip"
    resolve_overlaps: bool = True
    warmup: int = 1
    max_dets: int = 1000
    extra: dict = field(default_factory=dict)


@dataclass
class Status(_Record):
    """``status.json``: the worker's (or the parent's) last word on a model."""

    state: str                       # running | done | failed | interrupted | not installed
    stage: str | None = None         # fit | predict | evaluate while running / where it failed
    error: str | None = None
    hint: str | None = None          # install hint when not installed
    traceback: str | None = None
    device: str | None = None
    updated: float = field(default_factory=time.time)
    extra: dict = field(default_factory=dict)


@dataclass
class FitDone(_Record):
    """``fit.done.json``: the fit stage finished (or was skipped: the adapter is not trainable)."""

    train_seconds: float = 0.0
    validation_curve_seconds: float = 0.0
    iterations: int = 0
    seconds_per_iteration: float = 0.0
    peak_rss_mb: float | None = None
    cuda_peak_mb: float | None = None
    skipped: bool = False
    device: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class PredictDone(_Record):
    """``predict.done.json``: validation predictions written."""

    images: int = 0
    warmup_images: int = 0
    infer_ms_per_image: float | None = None
    infer_ms_per_image_median: float | None = None
    io_ms_per_image: float | None = None
    peak_rss_mb: float | None = None
    cuda_peak_mb: float | None = None
    device: str | None = None
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------
# folders
# ---------------------------------------------------------------------------

def model_label(spec: str) -> str:
    """A folder-safe name: 'cellpose:diam_mean=20' -> 'cellpose--diam_mean=20'."""
    from bench.adapters import registry

    name, opts = registry.parse_spec(spec)
    tail = ",".join(f"{k}={v}" for k, v in sorted(opts.items()))
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", name + (f"--{tail}" if tail else ""))


class ModelDir:
    """``RUN/models/<label>/``: its paths and records."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"ModelDir({str(self.path)!r})"

    label = property(lambda self: self.path.name)
    run = property(lambda self: RunDir(self.path.parent.parent))
    config = property(lambda self: self.path / "config.yaml")
    job = property(lambda self: self.path / "job.json")
    status = property(lambda self: self.path / "status.json")
    log = property(lambda self: self.path / "log.txt")
    train_log = property(lambda self: self.path / "train_log.jsonl")
    val_curve = property(lambda self: self.path / "val_curve.jsonl")
    work = property(lambda self: self.path / "work")
    resume = property(lambda self: self.path / "resume")   # mid-training checkpoints (adapters/trainable.py)
    checkpoint = property(lambda self: self.path / "checkpoint")
    checkpoint_tmp = property(lambda self: self.path / "checkpoint.tmp")
    predictions = property(lambda self: self.path / "predictions.jsonl.gz")
    raw_outputs = property(lambda self: self.path / "raw_outputs.jsonl.gz")     # every pass, above the raw floor
    raw_maps = property(lambda self: self.path / "raw_maps")                     # per-pixel maps, one npz per image
    ensemble_record = property(lambda self: self.path / "ensemble.json")        # bench ensemble: members, tuning
    fit_done = property(lambda self: self.path / "fit.done.json")
    predict_done = property(lambda self: self.path / "predict.done.json")
    metrics = property(lambda self: self.path / "metrics.json")
    tuning = property(lambda self: self.path / "tuning.json")
    matches = property(lambda self: self.path / "matches.csv.gz")
    match_pairs = property(lambda self: self.path / "match_pairs.csv.gz")

    def mkdir(self) -> "ModelDir":
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def raw_map(self, image_id: str) -> Path:
        """One image's per-pixel maps (bench/raw.py); an id that is not folder-safe gets a hash tail."""
        import hashlib

        safe = re.sub(r"[^A-Za-z0-9_.=,+-]", "_", image_id)
        if safe != image_id or safe.startswith("."):
            safe = f"{safe}-{hashlib.sha1(image_id.encode()).hexdigest()[:8]}"
        return self.raw_maps / f"{safe}.npz"

    def is_dir(self) -> bool:
        return self.path.is_dir()

    # ---- records ---------------------------------------------------------------
    def read_job(self) -> Job:
        return Job.read(self.job)

    def write_job(self, job: Job) -> None:
        job.write(self.job)

    def read_status(self) -> Status | None:
        return Status.read(self.status) if self.status.is_file() else None

    def write_status(self, status: Status) -> None:
        status.updated = time.time()
        status.write(self.status)

    def update_status(self, **kw) -> Status:
        """Change some fields of the status (creating it if absent), keep the rest."""
        cur = self.read_status() or Status(state=kw.get("state", "running"))
        for k, v in kw.items():
            if k in {f.name for f in dataclasses.fields(Status)}:
                setattr(cur, k, v)
            else:
                cur.extra[k] = v
        self.write_status(cur)
        return cur

    def read_fit_done(self) -> FitDone | None:
        return FitDone.read(self.fit_done) if self.fit_done.is_file() else None

    def write_fit_done(self, rec: FitDone) -> None:
        rec.write(self.fit_done)

    def read_predict_done(self) -> PredictDone | None:
        return PredictDone.read(self.predict_done) if self.predict_done.is_file() else None

    def write_predict_done(self, rec: PredictDone) -> None:
        rec.write(self.predict_done)

    def has_metrics(self) -> bool:
        return self.metrics.is_file()

    def read_metrics(self) -> dict | None:
        return json.loads(self.metrics.read_text()) if self.metrics.is_file() else None

    def write_metrics(self, metrics: dict) -> None:
        atomic_write_json(self.metrics, metrics)

    def read_tuning(self) -> dict | None:
        return json.loads(self.tuning.read_text()) if self.tuning.is_file() else None

    def write_tuning(self, tuning: dict) -> None:
        atomic_write_json(self.tuning, tuning)

    def read_config(self) -> dict | None:
        import yaml

        return yaml.safe_load(self.config.read_text()) if self.config.is_file() else None

    def write_config(self, config: dict) -> None:
        import yaml

        atomic_write_text(self.config, yaml.safe_dump(config, sort_keys=True))

    def read_jsonl(self, which: str) -> list[dict]:
        """``train_log`` or ``val_curve`` as records ([] when absent)."""
        p = getattr(self, which)
        return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []


class RunLocked(RuntimeError):
    """Another process holds the run folder's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _host() -> str:
    return platform.node() or socket.gethostname()


class RunLock:
    """``fcntl.flock`` on ``RUN/run.lock``, the holder's pid, host and start time written into it.

    The kernel drops a flock when its holder dies, so a lock file left by a dead process is
    simply taken over. Should the lock still be held while the file names a dead pid of this
    host (a leaked descriptor), the file is replaced and the lock taken on the new one.
    The descriptor is not inherited by the workers (Python opens files non-inheritable).
    """

    def __init__(self, path: Path, what: str = "run"):
        self.path = Path(path)
        self.what = what
        self.fd: int | None = None
        self.took_over: dict | None = None  # the stale holder, when one was replaced

    def holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(2):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                h = self.holder()
                pid, host = h.get("pid"), h.get("host")
                if attempt == 0 and isinstance(pid, int) and host == _host() and not _pid_alive(pid):
                    self.took_over = h
                    self.path.unlink(missing_ok=True)  # a leaked lock of a dead process: a fresh file
                    continue
                raise RunLocked(f"{self.path.parent} is in use: another {self.what} (pid {pid} on host {host}, "
                                f"since {h.get('since', '?')}) holds {self.path}; wait for it to finish or stop "
                                "it first") from None
            old = self.holder()
            if old.get("pid") and old.get("pid") != os.getpid():
                self.took_over = old  # left by a process that is gone (its flock went with it)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": _host(),
                                      "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode(), 0)
            os.fsync(fd)
            self.fd = fd
            return self
        raise RunLocked(f"{self.path}: could not take the lock")  # pragma: no cover

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # no stale holder left behind
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire() if self.fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()


class RunDir:
    """A run folder of ``bench run``."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    manifest_path = property(lambda self: self.path / MANIFEST)
    split = property(lambda self: self.path / SPLIT)
    executor_record = property(lambda self: self.path / "executor.json")
    models_dir = property(lambda self: self.path / MODELS)
    lock_path = property(lambda self: self.path / LOCK)

    def exists(self) -> bool:
        """Whether the folder holds a run (its manifest was written)."""
        return self.manifest_path.is_file()

    def mkdir(self) -> "RunDir":
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def lock(self) -> RunLock:
        """The one-writer lock (a context manager; taken on enter)."""
        return RunLock(self.lock_path, "bench run")

    def read_manifest(self) -> Manifest:
        if not self.exists():
            from bench.data.errors import DataError

            raise DataError(self.manifest_path, "not a run folder (no manifest.json)")
        return Manifest.read(self.manifest_path)

    def write_manifest(self, manifest: Manifest) -> None:
        manifest.write(self.manifest_path)

    jobs_dir = property(lambda self: self.path / "jobs")
    slurm_dir = property(lambda self: self.path / "slurm")

    def job(self, label: str) -> "SweepJobDir":
        """One model's executor job (``bench run --jobs N`` / ``--executor slurm``)."""
        return SweepJobDir(self.jobs_dir / label)

    def model(self, label: str) -> ModelDir:
        return ModelDir(self.models_dir / label)

    def model_for(self, spec: str) -> ModelDir:
        return self.model(model_label(spec))

    def models(self) -> list[ModelDir]:
        """Every model folder, sorted by label."""
        return [ModelDir(p) for p in sorted(self.models_dir.glob("*")) if p.is_dir()] if self.models_dir.is_dir() \
            else []

    def labels(self) -> list[str]:
        return [m.label for m in self.models()]

    def resolve(self, model: str) -> ModelDir:
        """A model folder from a label or a spec ('cellpose:diam_mean=20'); DataError naming the run's models."""
        if self.model(model).is_dir():
            return self.model(model)
        md = self.model_for(model)
        if md.is_dir():
            return md
        from bench.data.errors import DataError

        raise DataError(md.path, f"no model {model!r} in this run (models: {', '.join(self.labels()) or 'none'})")


def latest_run(results: Path) -> RunDir | None:
    """The newest run folder under ``results/runs`` (names start with a time stamp)."""
    runs = sorted(Path(results, "runs").glob(f"*/{MANIFEST}"))
    return RunDir(runs[-1].parent) if runs else None


class SweepDir:
    """A sweep folder of ``bench sweep``: its manifest, its split, one run folder per variant x seed."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    manifest_path = property(lambda self: self.path / SWEEP_MANIFEST)
    split = property(lambda self: self.path / SPLIT)
    lock_path = property(lambda self: self.path / LOCK)

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def lock(self) -> RunLock:
        return RunLock(self.lock_path, "bench sweep")

    def run(self, variant: str, seed: int) -> RunDir:
        return RunDir(self.path / SWEEP_RUNS / variant / f"seed{seed}")

    def pretrain_run(self, variant: str, seed: int, stage: int) -> RunDir:
        return RunDir(self.path / SWEEP_RUNS / variant / f"seed{seed}-pretrain{stage}")

    jobs_dir = property(lambda self: self.path / "jobs")
    slurm_dir = property(lambda self: self.path / "slurm")

    def job(self, variant: str, seed: int) -> "SweepJobDir":
        return SweepJobDir(self.jobs_dir / variant / f"seed{seed}")

    def stage_job(self, variant: str, seed: int, stage: int) -> "SweepJobDir":
        return SweepJobDir(self.jobs_dir / variant / f"seed{seed}-pretrain{stage}")

    def read_manifest(self) -> dict | None:
        return json.loads(self.manifest_path.read_text()) if self.manifest_path.is_file() else None

    def write_manifest(self, manifest: dict) -> None:
        atomic_write_json(self.manifest_path, manifest)


class SweepJobDir:
    """``SWEEP/jobs/<variant>/seed<k>/``: one job of a sweep's executor (bench.executor).

    ``request.json`` is what the job runs (written before it starts), ``state.json`` what came
    of it (written by the job when it ends), ``log.txt`` its stdout and stderr (local executor;
    SLURM's go to submitit's files, named in the sweep's state)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    request = property(lambda self: self.path / "request.json")
    state = property(lambda self: self.path / "state.json")
    log = property(lambda self: self.path / "log.txt")

    def mkdir(self) -> "SweepJobDir":
        self.path.mkdir(parents=True, exist_ok=True)
        return self
