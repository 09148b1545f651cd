"""``bench sweep``: an experiment as one config: a base, named variants, seeds, one split.

A sweep file (``configs/experiments/*.yaml``) names a base (model, preset, dataset, split)
and variants, each a set of config overrides, optionally with ``pretrain`` stages (train
on another dataset, or on train+val, then start the variant from those weights). Every
variant x seed is an ordinary run of the runner (its own folder, manifest, subprocess per
model), all on the split the sweep makes once, so the report can pair them image by image.

Layout::

    SWEEP/sweep.json                     what was asked, package versions, state of every run
    SWEEP/split.json                     the one split
    SWEEP/runs/<variant>/seed<k>/        a run folder (bench run's layout)
    SWEEP/runs/<variant>/seed<k>-pretrain<j>/   its stages, when it has some

``--resume`` reopens a sweep and runs only what is unfinished; a changed sweep file is an
error (start a new sweep) except for added seeds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bench.adapters import registry
from bench.adapters.registry import ConfigError
from bench.executor.options import ExecutorSpec, SlurmOptions
from bench import store
from bench.store import RunDir, SweepDir
from bench.util import atomic_write_json

SWEEP_FILE = store.SWEEP_MANIFEST


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class StudyFigure(_Strict):
    """A number published by the study this sweep reproduces: shown beside ours, labelled theirs."""

    value: float                      # the study's validation mAP for this variant
    reference: float | None = None    # the study's figure for what it compared against
    text: str = ""


class Stage(_Strict):
    """Training before the variant's own fit; the variant starts from the stage's weights.

    ``data``: a dataset path, ``builtin:livecell`` (the built-in LIVECell stand-in) or
    ``split:train+val`` (the sweep's data, training on train and val together: the variant's
    scores become in-sample). A stage trains with the base options (for the base model), then
    its own ``options``; the variant's ``options`` are for the variant's own fit after the
    stages (e.g. a lower learning rate to fine-tune).
    """

    data: str
    options: dict[str, Any] = Field(default_factory=dict)
    note: str = ""


class EnsembleSpec(_Strict):
    """An ensemble variant: the given variants' models of each seed fused (``bench ensemble``)."""

    members: list[str] = Field(min_length=2)
    method: Literal["score-average", "mask-vote", "wbf-masks"] = "score-average"
    weights: list[float] | None = None     # None: tuned by CV with the threshold (or equal, tune: false)
    tune: bool = True                      # weights and fused score threshold by k-fold CV


class Variant(_Strict):
    model: str | None = None          # None: the base model
    preset: str | None = None         # None: the sweep's preset
    options: dict[str, Any] = Field(default_factory=dict)
    pretrain: list[Stage] = Field(default_factory=list)
    note: str = ""
    study: StudyFigure | None = None
    ensemble: EnsembleSpec | None = None   # a fusion of other variants' models: trains nothing itself

    @model_validator(mode="after")
    def _ensemble_alone(self) -> "Variant":
        if self.ensemble is not None and (self.model or self.preset or self.options or self.pretrain):
            raise ValueError("an ensemble variant trains nothing: give its members, not model/preset/options/pretrain")
        if self.ensemble is not None and self.ensemble.weights is not None \
                and len(self.ensemble.weights) != len(self.ensemble.members):
            raise ValueError(f"ensemble: {len(self.ensemble.weights)} weight(s) for "
                             f"{len(self.ensemble.members)} members")
        return self

    @property
    def in_sample(self) -> bool:
        return any(st.data == "split:train+val" for st in self.pretrain)


class Base(_Strict):
    model: str
    preset: str = "smoke"
    data: str | None = None           # None: the built-in synthetic data of the preset
    val_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 0
    options: dict[str, Any] = Field(default_factory=dict)  # for every variant of the base model


class SweepConfig(_Strict):
    name: str
    description: str = ""
    study_source: str = ""            # where the study's figures come from
    base: Base
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    reference: str = "base"           # the variant every other one is compared with
    variants: dict[str, Variant]
    slurm: SlurmOptions = Field(default_factory=SlurmOptions)  # --executor slurm's resources (bench.executor)

    @field_validator("name")
    @classmethod
    def _folder_safe(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", v):
            raise ValueError(f"sweep name {v!r} must be folder-safe (letters, digits, _.+-)")
        return v

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds repeat ({v}): a repeated seed would count one run twice")
        return v

    @field_validator("variants")
    @classmethod
    def _names(cls, v: dict[str, Variant]) -> dict[str, Variant]:
        if not v:
            raise ValueError("needs at least one variant")
        bad = [n for n in v if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", n)]
        if bad:
            raise ValueError(f"variant names must be folder-safe (letters, digits, _.+-): {bad}")
        return v

    @model_validator(mode="after")
    def _reference(self) -> "SweepConfig":
        if self.reference not in self.variants:
            raise ValueError(f"reference variant {self.reference!r} is not among the variants")
        for name, v in self.variants.items():
            for m in (v.ensemble.members if v.ensemble else []):
                if m not in self.variants or self.variants[m].ensemble is not None:
                    raise ValueError(f"variant {name}: ensemble member {m!r} is not a (non-ensemble) variant")
        return self


# ---------------------------------------------------------------------------
# reading and planning (no training)
# ---------------------------------------------------------------------------

def load_sweep(path: str | Path) -> SweepConfig:
    """Read and validate a sweep file; every problem names the file."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: sweep file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    try:
        return SweepConfig(**(doc or {}))
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '?'}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{path}: {problems}") from None
    except TypeError as e:
        raise ConfigError(f"{path}: {e}") from None


def variant_model(cfg: SweepConfig, name: str) -> str:
    return cfg.variants[name].model or cfg.base.model


def variant_options(cfg: SweepConfig, name: str, sets: dict[str, Any] | None = None,
                    opts: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The variant's own fit: base options (base model only), the variant's options, --set, --opt."""
    return _layered_options(cfg, name, cfg.variants[name].options, sets, opts)


def stage_options(cfg: SweepConfig, name: str, j: int, sets: dict[str, Any] | None = None,
                  opts: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """A pretrain stage: base options (base model only), the stage's options, --set, --opt."""
    return _layered_options(cfg, name, cfg.variants[name].pretrain[j].options, sets, opts)


def _layered_options(cfg: SweepConfig, name: str, own: dict[str, Any], sets: dict[str, Any] | None,
                     opts: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """The base options apply to the base model only (another model has other keys); then the
    variant's (or stage's) own; then ``--set`` (every model of the plan has its keys:
    :func:`validate_plan`); then ``--opt`` for this variant's model (the most specific wins)."""
    out = dict(cfg.base.options) if cfg.variants[name].model in (None, cfg.base.model) else {}
    out.update(own)
    out.update(sets or {})
    out.update((opts or {}).get(variant_model(cfg, name), {}))
    return out


def variant_preset(cfg: SweepConfig, name: str, preset: str | None = None) -> str:
    return cfg.variants[name].preset or preset or cfg.base.preset


def validate_plan(cfg: SweepConfig, where: Path, variants: list[str], preset: str | None,
                  sets: dict[str, Any], opts: dict[str, dict[str, Any]] | None = None) -> None:
    """Every variant's (and stage's) config is built before anything trains: a typo fails now.

    ``--set`` applies to every variant run: a key that any model of the run variants lacks is
    an error naming those models. ``--opt MODEL.KEY`` needs MODEL among those models.
    """
    unknown = [v for v in variants if v not in cfg.variants]
    if unknown:
        raise ConfigError(f"{where}: no variant(s) {unknown} (has {', '.join(cfg.variants)})")
    variants = [v for v in variants if cfg.variants[v].ensemble is None]  # fusions: nothing to configure
    models = []
    for v in variants:
        try:
            registry.get(variant_model(cfg, v))
        except ConfigError as e:
            raise ConfigError(f"{where}: variant {v}: {e}") from None
        models.append(variant_model(cfg, v))
    models = list(dict.fromkeys(models))
    if sets:
        registry.check_sets(sets, models)
    if opts:
        registry.check_opts(opts, models)
    for v in variants:
        model, pre = variant_model(cfg, v), variant_preset(cfg, v, preset)
        if pre not in registry.PRESETS:
            raise ConfigError(f"{where}: variant {v}: unknown preset {pre!r}")
        try:
            registry.make_config(model, pre, variant_options(cfg, v, sets, opts))
            for j, st in enumerate(cfg.variants[v].pretrain):
                _check_stage_data(st.data, j)
                registry.make_config(model, pre, stage_options(cfg, v, j, sets, opts))
                if registry.get(model).warm_start_name is None:
                    raise ConfigError(f"{model} cannot start from its own checkpoint (pretrain stage {j})")
        except ConfigError as e:
            raise ConfigError(f"{where}: variant {v}: {e}") from None


def _check_stage_data(data: str, j: int) -> None:
    from bench.data.synth import STYLES

    others = [f"builtin:{k}" for k in STYLES if k != "sartorius"]
    if data == "split:train+val":
        return
    if data.startswith("builtin:"):
        if data not in others:
            raise ConfigError(f"pretrain stage {j}: unknown built-in dataset {data!r} ({', '.join(others)}; "
                              "the sweep's own data is split:train+val)")
        return
    if data.startswith("split:") or not Path(data).exists():
        raise ConfigError(f"pretrain stage {j}: data {data!r} is neither a dataset path that exists nor one of "
                          f"{', '.join(others)}, split:train+val")


def config_hash(cfg: SweepConfig) -> str:
    """Identity of a sweep for --resume: everything but the seeds (seeds may be added) and the
    SLURM resources (they do not change results)."""
    doc = cfg.model_dump(mode="json", exclude={"seeds", "slurm"})
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------

def run_sweep(config_path: str | Path, seeds: list[int] | None = None, preset: str | None = None,
              device: str = "auto", out: Path | None = None, resume: bool = False,
              variants: list[str] | None = None, sets: dict[str, Any] | None = None,
              data: str | None = None, results: Path = Path("results"), echo=print,
              timeout_s: float | None = None,
              opts: dict[str, dict[str, Any]] | None = None,
              executor: ExecutorSpec | None = None) -> tuple[Path, dict[str, dict]]:
    """Run every (chosen) variant x seed; returns the sweep folder and the state of each run.

    ``sets``: ``--set`` values for every model of the chosen variants; ``opts``: ``--opt``
    values per model name (``{model: {key: value}}``). ``executor``: None or ``--jobs 1`` runs
    them here one after the other; else :mod:`bench.executor` runs them (N at once, or SLURM).
    """
    from bench.data.io import load_dataset
    from bench.data.split import make_split, write_split
    from bench.runner.run import builtin_dataset, git_commit, package_versions, resolve_device

    config_path = Path(config_path)
    cfg = load_sweep(config_path)
    chosen = with_members(cfg, variants or list(cfg.variants))
    if out is None:
        if resume:
            found = [m.parent for m in sorted((results / "sweeps").glob(f"*/{SWEEP_FILE}"))
                     if json.loads(m.read_text()).get("name") == cfg.name]
            if not found:
                raise FileNotFoundError(f"--resume: no earlier sweep {cfg.name!r} in {results / 'sweeps'}")
            out = found[-1]
        else:
            out = results / "sweeps" / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.name}"
    manifest_path = out / SWEEP_FILE
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    if manifest is not None:
        if not resume:
            raise FileExistsError(f"{out} already holds a sweep: use --resume to continue it or another --out")
        # what the sweep was started with holds unless given again, and then it must agree
        preset = preset or manifest["preset"]
        sets = manifest["sets"] if sets is None or sets == {} else dict(sets)
        opts = manifest.get("opts", {}) if not opts else dict(opts)
        if (manifest["config_hash"] != config_hash(cfg) or manifest["sets"] != sets
                or manifest.get("opts", {}) != opts):
            raise ValueError(f"{config_path} (or --set/--opt) changed since {out} was started: start a new sweep")
        if manifest["preset"] != preset:
            raise ValueError(f"{out}: --resume with preset {preset} but the sweep has {manifest['preset']}")
        if data is not None and str(Path(data).resolve()) != manifest["data"]:
            raise ValueError(f"{out}: --resume with --data {data} but the sweep runs on {manifest['data']}")
    sets, opts = dict(sets or {}), {m: dict(kv) for m, kv in (opts or {}).items()}
    validate_plan(cfg, config_path, chosen, preset, sets, opts)
    base_preset = preset or cfg.base.preset
    device = resolve_device(device)
    if executor is not None and not executor.serial:  # refused before anything is written
        from bench.executor import check_executor

        check_executor(executor, device)

    if manifest is not None:
        # seeds added on the command line or in the file join those already run
        seeds = sorted(set(manifest["seeds"]) | set(seeds or cfg.seeds))
        data_path = manifest["data"]
    else:
        seeds = sorted(set(seeds or cfg.seeds))
        data_path = data or cfg.base.data
        data_path = str(Path(data_path).resolve()) if data_path else str(
            builtin_dataset(base_preset, results / "cache").resolve())
        dataset = load_dataset(data_path)
        split = make_split(dataset, cfg.base.val_fraction, cfg.base.split_seed)
        out.mkdir(parents=True, exist_ok=True)
        write_split(split, SweepDir(out).split)
        manifest = {
            "kind": "sweep", "name": cfg.name, "config_file": str(config_path), "config": cfg.model_dump(mode="json"),
            "config_hash": config_hash(cfg), "sets": sets, "opts": opts, "seeds": seeds, "preset": base_preset,
            "variants_run": [], "device": device, "data": data_path, "builtin_data": not (data or cfg.base.data),
            "split_hash": split["hash"], "n_train": len(split["train"]), "n_val": len(split["val"]),
            "command": " ".join(sys.argv), "packages": package_versions(), "git_commit": git_commit(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": {},
        }
    manifest["seeds"] = seeds
    manifest["variants_run"] = [v for v in cfg.variants if v in set(manifest["variants_run"]) | set(chosen)]
    atomic_write_json(manifest_path, manifest)

    echo(f"sweep {cfg.name}: {len(chosen)} variant(s) x {len(seeds)} seed(s) -> {out}")
    keys = [(v, seed) for v in chosen for seed in seeds]
    if executor is not None and not executor.serial:  # N jobs at once, or a SLURM job array
        from bench.executor import run_sweep_jobs

        run_sweep_jobs(executor, out, manifest, keys, echo=echo, request=dict(
            data=data_path, base_preset=base_preset, preset=preset, device="cuda" if executor.gpus else device,
            sets=sets, opts=opts, timeout_s=timeout_s, cache=str((results / "cache").resolve())))
        keys = []
    with SweepDir(out).lock() if keys else contextlib.nullcontext():  # one sweep process per folder
        for v, seed in keys:  # --jobs 1: one after the other in this process
            key = f"{v}/seed{seed}"
            state = _run_one(cfg, v, seed, out, data_path, base_preset, preset, device, sets, opts, echo,
                             timeout_s, results / "cache")
            manifest["runs"][key] = state
            atomic_write_json(manifest_path, manifest)
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_json(manifest_path, manifest)
    return out, {k: manifest["runs"][k] for k in (f"{v}/seed{s}" for v in chosen for s in seeds)}


def _run_one(cfg: SweepConfig, v: str, seed: int, out: Path, data_path: str, base_preset: str,
             preset: str | None, device: str, sets: dict, opts: dict, echo, timeout_s, cache: Path,
             stages_done: bool = False) -> dict:
    """One variant x seed: its pretrain stages in order, then its own fit. ``stages_done``: a stage
    whose run is finished (by its own executor job) is taken as it is, without reopening it."""
    from bench.executor.status import run_done
    from bench.runner.run import run_benchmark

    variant = cfg.variants[v]
    if variant.ensemble is not None:
        return _run_ensemble(cfg, v, seed, out, echo)
    model = variant_model(cfg, v)
    pre = variant_preset(cfg, v, preset)
    own = variant_options(cfg, v, sets, opts)
    run_dir = SweepDir(out).run(v, seed).path
    say = lambda msg: echo(f"[{v} seed {seed}] {msg}")  # noqa: E731
    state: dict[str, Any] = {"variant": v, "seed": seed, "model": model, "run_dir": str(run_dir.relative_to(out)),
                             "stages": []}
    for j, st in enumerate(variant.pretrain):
        st_dir = SweepDir(out).pretrain_run(v, seed, j)
        if stages_done and run_done(st_dir):
            state["stages"].append({"data": st.data, "run_dir": str(st_dir.path.relative_to(out)), "state": "done"})
            continue
        st_state = run_stage(cfg, v, seed, j, out, data_path, base_preset, preset, device, sets, opts, echo,
                             timeout_s, cache)
        state["stages"].append({k: st_state[k] for k in ("data", "run_dir", "state")})
        if st_state["state"] != "done":
            state.update(state=st_state["state"], detail=st_state["detail"])
            return state
    if variant.pretrain:
        own["weights"] = stage_weights(cfg, v, seed, len(variant.pretrain) - 1, out)
    _, outcomes = run_benchmark([model], data_path, pre, device, seed, run_dir, RunDir(run_dir).exists(),
                                cfg.base.val_fraction, overrides={model: own}, split_file=SweepDir(out).split,
                                echo=say,
                                timeout_s=timeout_s)
    o = outcomes[0]
    state.update(state=o.state, detail=o.detail, label=o.label)
    return state


def stage_weights(cfg: SweepConfig, v: str, seed: int, j: int, out: Path) -> str:
    """The warm-start file of pretrain stage ``j``'s checkpoint: what the next stage starts from."""
    model = variant_model(cfg, v)
    ckpt = SweepDir(out).pretrain_run(v, seed, j).model_for(model).checkpoint.resolve()
    return str(registry.get(model).warm_start_file(ckpt))


def run_stage(cfg: SweepConfig, v: str, seed: int, j: int, out: Path, data_path: str, base_preset: str,
              preset: str | None, device: str, sets: dict, opts: dict, echo, timeout_s, cache: Path) -> dict:
    """Pretrain stage ``j`` of a variant x seed (starting from stage ``j-1``'s weights); its state."""
    from bench.runner.run import builtin_dataset, run_benchmark

    st = cfg.variants[v].pretrain[j]
    model = variant_model(cfg, v)
    st_dir = SweepDir(out).pretrain_run(v, seed, j).path
    st_opts = stage_options(cfg, v, j, sets, opts)
    if j > 0:
        st_opts["weights"] = stage_weights(cfg, v, seed, j - 1, out)
    kw: dict[str, Any] = {}
    if st.data == "split:train+val":
        st_data, kw = data_path, {"split_file": SweepDir(out).split, "train_on": "train+val"}
    elif st.data.startswith("builtin:"):
        st_data = str(builtin_dataset(base_preset, cache, style=st.data.split(":", 1)[1]))
    else:
        st_data = st.data
    say = lambda msg: echo(f"[{v} seed {seed}] {msg}")  # noqa: E731
    say(f"pretrain stage {j} on {st.data}")
    _, outcomes = run_benchmark([model], st_data, variant_preset(cfg, v, preset), device, seed, st_dir,
                                RunDir(st_dir).exists(), cfg.base.val_fraction,
                                overrides={model: st_opts}, echo=say, timeout_s=timeout_s, **kw)
    o = outcomes[0]
    return {"variant": v, "seed": seed, "stage": j, "model": model, "data": st.data,
            "run_dir": str(st_dir.relative_to(out)), "state": o.state,
            "detail": "" if o.state == "done" else f"pretrain stage {j}: {o.detail}"}


def with_members(cfg: SweepConfig, chosen: list[str]) -> list[str]:
    """The chosen variants plus the members of chosen ensembles, trained variants first."""
    out = list(dict.fromkeys(chosen))
    for v in list(out):
        if v in cfg.variants and cfg.variants[v].ensemble is not None:
            out += [m for m in cfg.variants[v].ensemble.members if m not in out]
    return [v for v in out if v not in cfg.variants or cfg.variants[v].ensemble is None] + \
        [v for v in out if v in cfg.variants and cfg.variants[v].ensemble is not None]


def _run_ensemble(cfg: SweepConfig, v: str, seed: int, out: Path, echo) -> dict:
    """An ensemble variant of one seed: its members' models of that seed fused into a run folder of
    its own (a copy of the first member's manifest and the sweep's split), like any variant's."""
    import shutil

    from bench.ensemble import build_ensemble

    spec = cfg.variants[v].ensemble
    run = SweepDir(out).run(v, seed)
    say = lambda msg: echo(f"[{v} seed {seed}] {msg}")  # noqa: E731
    state: dict[str, Any] = {"variant": v, "seed": seed, "model": "ensemble", "label": v, "stages": [],
                             "run_dir": str(run.path.relative_to(out))}
    members = []
    for m in spec.members:
        done = [md for md in SweepDir(out).run(m, seed).models() if md.has_metrics()]
        if not done:
            state.update(state="failed", detail=f"member {m} (seed {seed}) has no finished model to fuse")
            return state
        members.append(done[0])
    if run.model(v).has_metrics():
        state.update(state="done", detail="")
        return state
    if not run.exists():
        manifest = members[0].run.read_manifest()
        manifest.models, manifest.configs, manifest.models_state = [v], {}, {}
        manifest.command = f"ensemble of {', '.join(spec.members)} ({spec.method})"
        run.mkdir()
        shutil.copyfile(SweepDir(out).split, run.split)
        run.write_manifest(manifest)
    shutil.rmtree(run.model(v).path, ignore_errors=True)  # an unfinished fusion starts over
    say(f"ensemble of {', '.join(spec.members)} ({spec.method})")
    try:
        build_ensemble(run.path, [str(md.path) for md in members], v, spec.method, spec.weights, spec.tune,
                       seed=seed, echo=say)
    except (ValueError, OSError) as e:
        state.update(state="failed", detail=f"{type(e).__name__}: {e}")
        return state
    state.update(state="done", detail="")
    return state


def parse_sets(items: list[str]) -> dict[str, Any]:
    """['iterations=8', 'lr_steps=[5,7]'] -> {'iterations': 8, 'lr_steps': [5, 7]} (values read as YAML)."""
    return {k: v for k, (_, v) in registry.parse_sets(items).items()}


def parse_opts(items: list[str]) -> dict[str, dict[str, Any]]:
    """['cellpose.epochs=5'] -> {'cellpose': {'epochs': 5}} (models and keys checked by :func:`validate_plan`)."""
    return {m: {k: v for k, (_, v) in kv.items()} for m, kv in registry.parse_opts(items).items()}


def is_sweep(path: Path) -> bool:
    return (Path(path) / SWEEP_FILE).is_file()
