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
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench.adapters import registry
from bench.data.errors import DataError
from bench.data.io import load_dataset
from bench.data.split import make_split, read_split, write_split
from bench.util import atomic_write_json, atomic_write_text

RESULTS = Path("results")
PACKAGES = ("cellbench", "numpy", "scipy", "scikit-image", "pycocotools", "torch", "torchvision", "cellpose",
            "mmengine", "mmcv", "mmdet", "detectron2", "opencv-python", "opencv-python-headless")

# the built-in data: Sartorius-like synthetic images, sized to the preset
BUILTIN = {"smoke": {"n_images": 30, "size": (352, 260)}, "default": {"n_images": 200, "size": (704, 520)},
           "paper": {"n_images": 200, "size": (704, 520)}}
SYNTH_VERSION = 1


@dataclass
class ModelOutcome:
    label: str
    state: str          # done | failed | not installed
    detail: str = ""
    metrics: dict = field(default_factory=dict)


def resolve_device(device: str) -> str:
    if device != "auto":
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


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


def model_label(spec: str) -> str:
    """A folder-safe name: 'cellpose:diam_mean=20' -> 'cellpose--diam_mean=20'."""
    name, opts = registry.parse_spec(spec)
    tail = ",".join(f"{k}={v}" for k, v in sorted(opts.items()))
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", name + (f"--{tail}" if tail else ""))


def latest_run(results: Path = RESULTS) -> Path | None:
    runs = sorted((results / "runs").glob("*/manifest.json"))
    return runs[-1].parent if runs else None


def run_benchmark(models: list[str], data: str | None = None, preset: str = "smoke", device: str = "auto",
                  seed: int = 0, out: Path | None = None, resume: bool = False, val_fraction: float = 0.2,
                  results: Path = RESULTS, config_root: Path | None = None, echo=print,
                  timeout_s: float | None = None, overrides: dict[str, dict] | None = None,
                  split_file: Path | None = None, train_on: str = "train") -> tuple[Path, list[ModelOutcome]]:
    """Fit, predict and score every model; returns the run folder and one outcome per model.

    For sweeps: ``overrides`` (spec -> config values, merged over the spec's own options; lists
    and nested values that a ``key=value`` string cannot carry), ``split_file`` (a split made
    once for every run of the sweep) and ``train_on="train+val"`` (a stage that retrains on
    every labelled image: its validation scores are in-sample).
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

    if resume and out is None:
        out = latest_run(results)
        if out is None:
            raise FileNotFoundError(f"--resume: no earlier run in {results / 'runs'}")
    if out is not None and (out / "manifest.json").is_file():
        if not resume:
            raise FileExistsError(f"{out} already holds a run: use --resume to continue it or another --out")
        manifest = json.loads((out / "manifest.json").read_text())
        data_path = manifest["data"]
        dataset = load_dataset(data_path)
        split = read_split(out / "split.json", dataset)
        if manifest["seed"] != seed or manifest["preset"] != preset:
            raise ValueError(f"{out}: --resume with seed/preset {seed}/{preset} but the run has "
                             f"{manifest['seed']}/{manifest['preset']}")
    else:
        data_path = str(Path(data).resolve()) if data else str(builtin_dataset(preset, results / "cache").resolve())
        dataset = load_dataset(data_path)
        split = read_split(split_file, dataset) if split_file else make_split(dataset, val_fraction, seed)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        key = hashlib.sha256(json.dumps([specs, preset, seed, split["hash"]]).encode()).hexdigest()[:6]
        out = out or results / "runs" / f"{stamp}-{key}"
        out.mkdir(parents=True, exist_ok=True)
        write_split(split, out / "split.json")
        manifest = {
            "command": " ".join(sys.argv), "models": specs, "preset": preset, "seed": seed, "device": device,
            "data": data_path, "builtin_data": data is None, "dataset": dataset.name, "classes": dataset.classes,
            "split_hash": split["hash"], "dataset_hash": split["dataset_hash"],
            "n_train": len(split["train"]), "n_val": len(split["val"]), "configs": configs, "train_on": train_on,
            "packages": package_versions(), "git_commit": git_commit(), "python": sys.version.split()[0],
            "host": platform.node(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "gpu": _gpu_name(device), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "models_state": {},
        }
        atomic_write_json(out / "manifest.json", manifest)
    for spec in specs:  # resumed runs may add models, never change one
        if spec not in manifest["models"]:
            manifest["models"].append(spec)
            manifest["configs"][spec] = configs[spec]
        elif manifest["configs"][spec] != configs[spec]:
            changed = sorted(k for k in set(configs[spec]) | set(manifest["configs"][spec])
                             if configs[spec].get(k) != manifest["configs"][spec].get(k))
            raise ValueError(f"{out}: {spec} was started with another config (differs in {changed}); "
                             "start a new run instead of resuming")

    echo(f"run {out}  ({len(split['train'])} train / {len(split['val'])} val images, split {split['hash']}, "
         f"device {device})")
    outcomes = []
    for spec in specs:
        outcome = _run_model(out, spec, manifest["configs"][spec], data_path, device, seed, echo, timeout_s,
                             manifest.get("train_on", "train"))
        outcomes.append(outcome)
        manifest["models_state"][outcome.label] = {"state": outcome.state, "detail": outcome.detail[:2000]}
        atomic_write_json(out / "manifest.json", manifest)
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_json(out / "manifest.json", manifest)
    return out, outcomes


def _gpu_name(device: str) -> str | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.get_device_name(0)


def _run_model(run_dir: Path, spec: str, config: dict, data: str, device: str, seed: int, echo,
               timeout_s: float | None, train_on: str = "train") -> ModelOutcome:
    label = model_label(spec)
    mdir = run_dir / "models" / label
    mdir.mkdir(parents=True, exist_ok=True)
    if (mdir / "metrics.json").is_file():
        echo(f"[{label}] finished earlier: skipped")
        return ModelOutcome(label, "done", "", json.loads((mdir / "metrics.json").read_text()))
    cfg_path = mdir / "config.yaml"
    if cfg_path.is_file():
        earlier = yaml.safe_load(cfg_path.read_text())
        if earlier != config:
            raise ValueError(f"{cfg_path}: the run was started with another config for {label}; "
                             "start a new run instead of resuming")
    else:
        atomic_write_text(cfg_path, yaml.safe_dump(config, sort_keys=True))
    atomic_write_json(mdir / "job.json", {"spec": spec, "label": label, "config": config, "data": data,
                                          "device": device, "seed": seed, "train_on": train_on})
    echo(f"[{label}] starting")
    t0 = time.perf_counter()
    with open(mdir / "log.txt", "ab") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {spec} =====\n".encode())
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
            proc = subprocess.Popen([sys.executable, "-m", "bench.runner.worker", str(mdir)], stdout=log,
                                    stderr=subprocess.STDOUT, env=env,
                                    pass_fds=(progress_fd,) if progress_fd is not None else ())
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
                _append_status(mdir, "failed", f"timed out after {timeout_s:.0f} s")
            except KeyboardInterrupt:
                proc.send_signal(signal.SIGINT)
                proc.wait()
                raise
        finally:
            if progress_fd is not None:
                os.close(progress_fd)
    took = time.perf_counter() - t0
    status = json.loads((mdir / "status.json").read_text()) if (mdir / "status.json").is_file() else {}
    if code == 3 or status.get("state") == "not installed":
        echo(f"[{label}] not installed: {status.get('hint', '')}")
        return ModelOutcome(label, "not installed", status.get("hint", ""))
    if code != 0 or not (mdir / "metrics.json").is_file():
        if code < 0:
            why = f"killed by signal {-code}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
        else:
            why = status.get("error") or f"exit code {code}"
        _append_status(mdir, "failed", why)
        echo(f"[{label}] FAILED in stage {status.get('stage')}: {why}  (log: {mdir / 'log.txt'})")
        return ModelOutcome(label, "failed", why)
    m = json.loads((mdir / "metrics.json").read_text())
    echo(f"[{label}] done in {took:.0f} s: Kaggle mAP {m['kaggle_map']:.4f} "
         f"[{m['kaggle_map_ci95'][0]:.4f}, {m['kaggle_map_ci95'][1]:.4f}]")
    return ModelOutcome(label, "done", "", m)


def _append_status(mdir: Path, state: str, error: str) -> None:
    p = mdir / "status.json"
    cur = json.loads(p.read_text()) if p.is_file() else {}
    cur.update(state=state, error=error)
    atomic_write_json(p, cur)


def summary_table(outcomes: list[ModelOutcome]) -> str:
    rows = ["model                      state          Kaggle mAP [95% CI]          COCO AP   train s   ms/img"]
    for o in outcomes:
        if o.state == "done":
            m = o.metrics
            t = m.get("timings", {})
            ci = m["kaggle_map_ci95"]
            rows.append(f"{o.label:<26} {o.state:<14} {m['kaggle_map']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]   "
                        f"{m.get('coco', {}).get('AP', float('nan')):7.4f}  {t.get('train_seconds', 0):8.1f}  "
                        f"{(t.get('infer_ms_per_image') or 0):7.1f}")
        else:
            rows.append(f"{o.label:<26} {o.state:<14} {o.detail[:60]}")
    return "\n".join(rows)


def check_data(path: str) -> None:
    """Fail early, naming the file, if --data is unreadable."""
    if not Path(path).exists():
        raise DataError(path, "dataset path does not exist")
