"""``bench run``: every model on the same split, each in its own subprocess.

A run folder is immutable once a stage is finished: ``manifest.json`` records what
was asked (command, configs, seed, split hash, package versions, git commit, device,
host); each model folder holds its config, log, train log, checkpoint, predictions
and metrics. ``--resume`` reopens a run and redoes only unfinished stages.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from bench import envs, store
from bench.adapters import registry
from bench.data.errors import DataError
from bench.data.io import load_dataset
from bench.data.normalize import InputPolicy
from bench.preflight import require_preflight, skip_bad_images
from bench.data.split import make_split, read_split, split_note, write_split
from bench.runner.devices import DeviceError, plan_model, resolve_device  # noqa: F401 (re-exported)
from bench.store import DevicePlan, Job, Manifest, RunDir, RunLocked, model_label  # noqa: F401 (re-exported)

RESULTS = Path("results")
PACKAGES = ("cellbench", "numpy", "scipy", "scikit-image", "pycocotools", "torch", "torchvision", "cellpose",
            "mmengine", "mmcv", "mmdet", "detectron2", "opencv-python", "opencv-python-headless", "ultralytics")

# the built-in data: Sartorius-like synthetic images, sized to the preset
BUILTIN = {"smoke": {"n_images": 30, "size": (352, 260)}, "default": {"n_images": 200, "size": (704, 520)},
           "paper": {"n_images": 200, "size": (704, 520)}}
SYNTH_VERSION = 1


@dataclass
class ModelOutcome:
    label: str
    state: str          # done | failed | not installed | interrupted
    detail: str = ""
    metrics: dict = field(default_factory=dict)
    device: str = ""


class RunInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM reached the runner: forwarded to the worker, which is recorded as interrupted."""

    def __init__(self, signum: int, label: str = ""):
        super().__init__(f"interrupted by {signal.Signals(signum).name}" + (f" while running {label}" if label else ""))
        self.signum = signum


def builtin_dataset(preset: str, cache: Path | None = None, seed: int = 0, style: str = "sartorius") -> Path:
    """Generate the synthetic dataset once into the cache (atomically), then reuse it.

    ``style="livecell"`` is the second built-in dataset (other cell types and shapes, COCO
    format): the stand-in sweeps pretrain on where real LIVECell is not at hand.
    """
    from bench.data.synth import generate

    spec = BUILTIN.get(preset, BUILTIN["smoke"])
    w, h = spec["size"]
    cache = cache or RESULTS / "cache"
    tag = "synth" if style == "sartorius" else f"synth-{style}"
    out = cache / f"{tag}-v{SYNTH_VERSION}-{spec['n_images']}x{w}x{h}-seed{seed}"
    if (out / "train.csv").is_file() or (out / "livecell_like.json").is_file():
        return out
    tmp = cache / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    generate(tmp, n_images=spec["n_images"], size=(w, h), seed=seed, style=style)
    try:
        os.replace(tmp, out)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def package_versions() -> dict[str, str | None]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = None
    return out


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        c = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return c.stdout.strip() + ("-dirty" if dirty else "") if c.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def latest_run(results: Path = RESULTS) -> Path | None:
    run = store.latest_run(results)
    return run.path if run else None


def run_benchmark(models: list[str], data: str | None = None, preset: str = "smoke", device: str = "auto",
                  seed: int = 0, out: Path | None = None, resume: bool = False, val_fraction: float = 0.2,
                  results: Path = RESULTS, config_root: Path | None = None, echo=print,
                  timeout_s: float | None = None, overrides: dict[str, dict] | None = None,
                  split_file: Path | None = None, train_on: str = "train",
                  skip_bad: bool = False, executor=None) -> tuple[Path, list[ModelOutcome]]:
    """Fit, predict and score every model; returns the run folder and one outcome per model.

    For sweeps: ``overrides`` (spec -> config values, merged over the spec's own options; lists
    and nested values that a ``key=value`` string cannot carry), ``split_file`` (a split made
    once for every run of the sweep) and ``train_on="train+val"`` (a stage that retrains on
    every labelled image: its validation scores are in-sample).

    The run folder is locked (:class:`bench.store.RunLock`) from before its manifest is read
    until the last model is done: a second ``bench run``/``--resume`` on it is refused. Where
    each model runs is planned here, before anything is spawned (:mod:`bench.runner.devices`).
    ``resume`` continues ``out`` (or the latest run), which must hold a run. ``skip_bad`` drops
    the split's images that cannot be read (missing, corrupt, wrongly sized) instead of refusing
    the run, and lists them in the manifest (``skipped_images``) and in split.json. ``executor``
    (a :class:`bench.executor.ExecutorSpec`): None or ``--jobs 1`` runs the models one after the
    other here; else each model is a job of :mod:`bench.executor.runs` (N at once, or SLURM).
    """
    if train_on not in ("train", "train+val"):
        raise ValueError(f"train_on must be 'train' or 'train+val', got {train_on!r}")
    if preset not in registry.PRESETS:
        raise registry.ConfigError(f"unknown preset {preset!r} (one of {', '.join(registry.PRESETS)})")
    specs = registry.split_specs(",".join(models))
    if not specs:
        raise registry.ConfigError("no models given")
    # validate every name and config before anything runs (an unknown key fails here, not after training)
    configs = {}
    for spec in specs:
        name, opts = registry.parse_spec(spec)
        opts.update((overrides or {}).get(spec, {}))
        configs[spec] = registry.make_config(name, preset, opts, config_root).model_dump(mode="json")
    device = resolve_device(device)
    # where each model runs; a model that cannot run as asked is refused here, before anything trains
    plans = {}
    for spec in specs:
        name = registry.parse_spec(spec)[0]
        plans[spec] = plan_model(name, registry.get(name).capabilities, device, configs[spec])

    if resume:
        if out is None:
            last = store.latest_run(results)
            if last is None:
                raise FileNotFoundError(f"--resume: no earlier run in {results / 'runs'}")
            out = last.path
        elif not RunDir(out).exists():
            raise FileNotFoundError(f"--resume: {out} holds no run (no {store.MANIFEST}); "
                                    "drop --resume to start a new run there")
    run = RunDir(out) if out is not None else None
    if run is not None and run.exists():
        if not resume:
            raise FileExistsError(f"{out} already holds a run: use --resume to continue it or another --out")
        with run.lock():
            manifest = run.read_manifest()
            data_path = manifest.data
            skipped = manifest.extra.get("skipped_images")
            dataset = load_dataset(data_path, require_images=not skipped, bad=[] if skipped else None)
            split = read_split(run.split, dataset)
            require_preflight(dataset, split, run.path)
            if manifest.seed != seed or manifest.preset != preset:
                raise ValueError(f"{out}: --resume with seed/preset {seed}/{preset} but the run has "
                                 f"{manifest.seed}/{manifest.preset}")
            if manifest.device != device:
                echo(f"note: the run was started on {manifest.device}, resumed on {device}")
            return run.path, _run_models(run, manifest, specs, configs, plans, data_path, split, device, seed,
                                         echo, timeout_s, executor)

    data_path = str(Path(data).resolve()) if data else str(builtin_dataset(preset, results / "cache").resolve())
    reader_bad: list[tuple[str, str]] = []  # ids a reader left out (--skip-bad: a DSB id with a bad mask)
    dataset = load_dataset(data_path, require_images=not skip_bad, bad=reader_bad if skip_bad else None)
    split = read_split(split_file, dataset) if split_file else make_split(dataset, val_fraction, seed)
    skipped: list[dict] = [{"id": i, "problem": why} for i, why in reader_bad]
    if skip_bad:
        split, more = skip_bad_images(dataset, split)  # missing, unreadable, wrongly sized images
        skipped += more
        if skipped:
            split["skipped"] = skipped
        for d in skipped:
            echo(f"skipped (--skip-bad): {d['problem']}")
    if run is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        key = hashlib.sha256(json.dumps([specs, preset, seed, split["hash"]]).encode()).hexdigest()[:6]
        run = RunDir(results / "runs" / f"{stamp}-{key}")
    # every image of the split readable and of its annotated size, the folder writable: all problems
    # listed at once, before the run folder exists and before anything trains
    require_preflight(dataset, split, run.path)
    run.mkdir()
    with run.lock():
        if run.exists():  # another process started a run there between our check and the lock
            raise FileExistsError(f"{run.path} already holds a run: use --resume to continue it or another --out")
        write_split(split, run.split)
        manifest = Manifest(
            command=" ".join(sys.argv), models=list(specs), preset=preset, seed=seed, device=device,
            data=data_path, builtin_data=data is None, dataset=dataset.name, classes=list(dataset.classes),
            split_hash=split["hash"], dataset_hash=split["dataset_hash"],
            input_policies={spec: InputPolicy.of(SimpleNamespace(**configs[spec])).as_dict() for spec in specs},
            n_train=len(split["train"]), n_val=len(split["val"]), configs=dict(configs), train_on=train_on,
            packages=package_versions(), git_commit=git_commit(), python=sys.version.split()[0],
            host=platform.node(), platform=platform.platform(), cpu_count=os.cpu_count(),
            gpu=_gpu_name(device), started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            extra={**split_note(split), **({"skipped_images": skipped} if skip_bad else {})})
        run.write_manifest(manifest)
        return run.path, _run_models(run, manifest, specs, configs, plans, data_path, split, device, seed, echo,
                                     timeout_s, executor)


def _as_now(spec: str, config: dict) -> dict:
    """A config recorded by an older cellbench as today's code reads it: an option added since
    (e.g. ``tta``) takes its default and a renamed one its new name, so that resuming is not
    refused for what the run never set."""
    from bench.adapters import registry

    try:
        return registry.get(registry.parse_spec(spec)[0]).Config(**config).model_dump(mode="json")
    except Exception:  # noqa: BLE001 - unreadable today: compared as recorded (and refused if it differs)
        return config


def _run_models(run: RunDir, manifest: Manifest, specs: list[str], configs: dict, plans: dict[str, DevicePlan],
                data_path: str, split: dict, device: str, seed: int, echo, timeout_s,
                executor=None) -> list[ModelOutcome]:
    """The models of a run, one worker each, under the run's lock (N at once: bench.executor.runs)."""
    for spec in specs:  # resumed runs may add models, never change one
        if spec not in manifest.models:
            manifest.models.append(spec)
            manifest.configs[spec] = configs[spec]
        elif _as_now(spec, manifest.configs[spec]) != configs[spec]:
            old = _as_now(spec, manifest.configs[spec])
            changed = sorted(k for k in set(configs[spec]) | set(old) if configs[spec].get(k) != old.get(k))
            raise ValueError(f"{run.path}: {spec} was started with another config (differs in {changed}); "
                             "start a new run instead of resuming")
    for spec in specs:
        manifest.devices[model_label(spec)] = plans[spec].to_dict()
    run.write_manifest(manifest)

    echo(f"run {run.path}  ({len(split['train'])} train / {len(split['val'])} val images, split {split['hash']}, "
         f"device {device})")
    for spec in specs:
        if plans[spec].note:
            echo(f"[{model_label(spec)}] {plans[spec].note}")
        env = envs.of(registry.get(registry.parse_spec(spec)[0]))
        if not env.ready():  # said before the first model trains; the model is then skipped as not installed
            echo(f"[{model_label(spec)}] {env.missing_hint()}")
    outcomes = []
    if executor is not None and not executor.serial:
        from bench.executor.runs import run_model_jobs

        outcomes = run_model_jobs(executor, run, manifest, specs, plans, data_path, seed, echo, timeout_s)
        specs = []
    for spec in specs:
        try:
            outcome = _run_model(run, spec, manifest.configs[spec], data_path, plans[spec], seed, echo, timeout_s,
                                 manifest.train_on)
        except RunInterrupted as e:
            manifest.models_state[model_label(spec)] = {"state": "interrupted", "detail": str(e),
                                                        "device": plans[spec].device}
            run.write_manifest(manifest)
            raise
        outcomes.append(outcome)
        manifest.models_state[outcome.label] = {"state": outcome.state, "detail": outcome.detail[:2000],
                                                "device": outcome.device}
        run.write_manifest(manifest)
    manifest.finished = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    run.write_manifest(manifest)
    return outcomes


def _gpu_name(device: str) -> str | None:
    """The name of the GPU ``device`` names (``cuda:1`` -> device 1; ``cuda`` -> the current one)."""
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.get_device_name(torch.device(device))


# grace between forwarding SIGINT/SIGTERM to a worker's group and killing the group
KILL_GRACE_S = 10.0


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _run_model(run: RunDir, spec: str, config: dict, data: str, plan: DevicePlan, seed: int, echo,
               timeout_s: float | None, train_on: str = "train") -> ModelOutcome:
    label = model_label(spec)
    md = run.model(label).mkdir()
    if md.has_metrics():
        echo(f"[{label}] finished earlier: skipped")
        m = md.read_metrics()
        return ModelOutcome(label, "done", "", m, m.get("device") or plan.device)
    earlier = md.read_config()
    if earlier is not None:
        if earlier != config:
            raise ValueError(f"{md.config}: the run was started with another config for {label}; "
                             "start a new run instead of resuming")
    else:
        md.write_config(config)
    md.write_job(Job(spec=spec, label=label, config=config, data=data, device=plan.device, seed=seed,
                     train_on=train_on, requested_device=plan.requested, fit=plan.fit,
                     resolve_overlaps=plan.resolve_overlaps))
    cls = registry.get(registry.parse_spec(spec)[0])
    if not envs.of(cls).ready():  # its own environment (bench/envs.py) was never built: say how, train nothing
        hint = envs.of(cls).missing_hint()
        md.write_status(store.Status(state="not installed", hint=hint, device=plan.device))
        echo(f"[{label}] not installed: {hint}")
        return ModelOutcome(label, "not installed", hint, device=plan.device)
    echo(f"[{label}] starting on {plan.device}")
    t0 = time.perf_counter()
    why = None          # the parent's own account of how the worker ended, when the parent ended it
    interrupted: list[int] = []
    with open(md.log, "ab") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {spec} on {plan.device} =====\n".encode())
        log.flush()
        # the worker's output goes to log.txt; its progress bars to our stderr, handed over as an fd
        try:
            progress_fd = os.dup(sys.stderr.fileno())
        except (AttributeError, OSError, ValueError):  # stderr is not a file (captured): no progress bars
            progress_fd = None
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("CELLBENCH_PROGRESS_FD", None)
        if progress_fd is not None:
            env["CELLBENCH_PROGRESS_FD"] = str(progress_fd)
        try:
            # its own session (process group): a timeout or a forwarded signal reaches all it started
            proc = subprocess.Popen(envs.worker_command(cls, md.path), stdout=log,
                                    stderr=subprocess.STDOUT, env=envs.worker_env(cls, env), start_new_session=True,
                                    pass_fds=(progress_fd,) if progress_fd is not None else ())
            code = _wait(proc, timeout_s, interrupted)
            if code is None:  # ran past the timeout: the whole group goes
                why = f"timed out after {timeout_s:.0f} s"
                _killpg(proc.pid, signal.SIGKILL)
                code = proc.wait()
            _killpg(proc.pid, signal.SIGKILL)  # anything the worker left running in its group
        finally:
            if progress_fd is not None:
                os.close(progress_fd)
    took = time.perf_counter() - t0
    status = md.read_status()
    if interrupted:
        name = signal.Signals(interrupted[0]).name
        md.update_status(state="interrupted", error=f"interrupted by {name}", device=plan.device)
        echo(f"[{label}] interrupted by {name}: `bench run --resume --out {run.path}` continues it")
        raise RunInterrupted(interrupted[0], label)
    if code == 3 or (status is not None and status.state == "not installed"):
        hint = (status.hint if status else "") or ""
        echo(f"[{label}] not installed: {hint}")
        return ModelOutcome(label, "not installed", hint, device=plan.device)
    if why is not None or code != 0 or not md.has_metrics():
        if why is None:
            if code < 0:
                why = f"killed by signal {-code}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
            else:
                why = (status.error if status else None) or f"exit code {code}"
        md.update_status(state="failed", error=why, device=plan.device)
        echo(f"[{label}] FAILED in stage {status.stage if status else None}: {why}  (log: {md.log})")
        return ModelOutcome(label, "failed", why, device=plan.device)
    m = md.read_metrics()
    echo(f"[{label}] done on {plan.device} in {took:.0f} s: Kaggle mAP {m['kaggle_map']:.4f} "
         f"[{m['kaggle_map_ci95'][0]:.4f}, {m['kaggle_map_ci95'][1]:.4f}]")
    return ModelOutcome(label, "done", "", m, m.get("device") or plan.device)


def _wait(proc: subprocess.Popen, timeout_s: float | None, interrupted: list[int]) -> int | None:
    """The worker's exit code, or None when it runs past ``timeout_s``.

    SIGINT/SIGTERM to the runner are forwarded to the worker's process group (it has its own
    session, so a terminal's Ctrl-C does not reach it directly) and recorded in
    ``interrupted``; a group still alive ``KILL_GRACE_S`` later is killed."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    kill_at = None

    def forward(signum, _frame):
        nonlocal kill_at
        interrupted.append(signum)
        _killpg(proc.pid, signum)
        if kill_at is None:
            kill_at = time.monotonic() + KILL_GRACE_S

    in_main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    try:
        while True:
            step = 0.5
            if deadline is not None and not interrupted:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                step = min(step, left)
            try:
                return proc.wait(timeout=step)
            except subprocess.TimeoutExpired:
                pass
            if kill_at is not None and time.monotonic() >= kill_at:
                _killpg(proc.pid, signal.SIGKILL)
                return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def summary_table(outcomes: list[ModelOutcome]) -> str:
    rows = ["model                      state          device  Kaggle mAP [95% CI]          COCO AP   train s   "
            "ms/img"]
    for o in outcomes:
        if o.state == "done":
            m = o.metrics
            t = m.get("timings", {})
            ci = m["kaggle_map_ci95"]
            rows.append(f"{o.label:<26} {o.state:<14} {o.device or '-':<7} {m['kaggle_map']:.4f} "
                        f"[{ci[0]:.4f}, {ci[1]:.4f}]   "
                        f"{m.get('coco', {}).get('AP', float('nan')):7.4f}  {t.get('train_seconds', 0):8.1f}  "
                        f"{(t.get('infer_ms_per_image') or 0):7.1f}")
        else:
            rows.append(f"{o.label:<26} {o.state:<14} {o.device or '-':<7} {o.detail[:60]}")
    return "\n".join(rows)


def check_data(path: str) -> None:
    """Fail early, naming the file, if --data is unreadable."""
    if not Path(path).exists():
        raise DataError(path, "dataset path does not exist")
