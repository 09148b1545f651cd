"""The ``bench`` command line (typer). Every command has --help; bad input exits 2 naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from bench import cli_options
from bench.data.errors import DataError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="cellbench: compare cell instance-segmentation models fairly.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: synthesise, check, describe, split, download.")
app.add_typer(data_app, name="data")


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _check_output_file(path: Path | None, what: str) -> None:
    """An output file must be writable where it is asked for: its folder exists, it is not a
    folder itself. Checked before any work, so a typo costs nothing (and prints no traceback)."""
    if path is None:
        return
    if path.is_dir():
        _fail(DataError(path, f"{what} is a folder; give a file name"))
    if not path.parent.is_dir():
        _fail(DataError(path, f"folder {path.parent} does not exist"))


# ---------------------------------------------------------------------------
# bench data ...
# ---------------------------------------------------------------------------

@data_app.command("synth")
def data_synth(out: Path = typer.Option(..., "--out", help="Folder to write train.csv and train/*.png into."),
               images: int = typer.Option(100, "--images", min=1, help="Number of images (>= 1)."),
               size: str = typer.Option("704x520", "--size", help="WIDTHxHEIGHT."),
               seed: int = typer.Option(0, "--seed")):
    """Write the built-in synthetic Sartorius-like dataset (deterministic per seed)."""
    import time

    from bench.data.synth import generate

    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        _fail(ValueError(f"--size must be WIDTHxHEIGHT, got {size!r}"))
    if out.exists() and not out.is_dir():
        _fail(DataError(out, "--out is a file, not a folder"))
    t = time.perf_counter()
    try:
        generate(out, n_images=images, size=(w, h), seed=seed)
    except (OSError, ValueError) as e:
        _fail(e)
    typer.echo(f"wrote {images} images of {w}x{h} to {out} in {time.perf_counter() - t:.1f} s")


@data_app.command("check")
def data_check(data: Path = typer.Argument(..., help="Sartorius folder/csv, COCO json or label-image folder.")):
    """Read every image and mask; exit non-zero naming the file, row and problem."""
    from bench.data.io import load_dataset
    from bench.data.stats import check_dataset

    try:
        ds = load_dataset(data)
        s = check_dataset(ds)
    except (DataError, OSError) as e:
        _fail(e)
    typer.echo(f"ok: {s['images']} images, {s['masks']} masks, classes {', '.join(s['classes'])}; "
               f"{100 * s['overlapping_pixel_fraction']:.2f}% of annotated pixels are in overlapping masks"
               + (f"; {s['duplicate_masks']} masks repeat another mask of their image (kept)"
                  if s["duplicate_masks"] else "")
               + (f"; {len(s['label_gaps'])} label image(s) have gaps in their ids (accepted: one cell per "
                  f"label), e.g. {s['label_gaps'][0]}" if s.get("label_gaps") else ""))


@data_app.command("stats")
def data_stats(data: Path = typer.Argument(..., help="Dataset (annotations only is fine: csv or json)."),
               json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the numbers as JSON.")):
    """Per class: images, instances, instances per image, mask area quantiles, intensity."""
    from dataclasses import asdict

    from bench.data.io import load_dataset
    from bench.data.stats import dataset_stats, stats_table

    _check_output_file(json_out, "--json")
    try:
        ds = load_dataset(data, require_images=False)
        rows = dataset_stats(ds, with_images=any(s.path and s.path.is_file() for s in ds))
    except (DataError, OSError) as e:
        _fail(e)
    typer.echo(stats_table(rows))
    if json_out:
        from bench.util import atomic_write_text

        try:
            atomic_write_text(json_out, json.dumps([asdict(r) for r in rows], indent=1))
        except OSError as e:
            _fail(e)


@data_app.command("split")
def data_split(data: Path = typer.Argument(...), val: float = typer.Option(0.2, "--val"),
               seed: int = typer.Option(0, "--seed"),
               out: Optional[Path] = typer.Option(None, "--out", help="Default: DATA/split.json.")):
    """Write split.json: stratified by cell type, grouped by sample/well, hashed."""
    from bench.data.io import load_dataset
    from bench.data.split import make_split, write_split

    try:
        ds = load_dataset(data, require_images=False)
        split = make_split(ds, val, seed)
    except (DataError, OSError, ValueError) as e:
        _fail(e)
    dest = out or ((data if data.is_dir() else data.parent) / "split.json")
    write_split(split, dest)
    typer.echo(f"{len(split['train'])} train / {len(split['val'])} val images, hash {split['hash']} -> {dest}")


@data_app.command("get")
def data_get(name: Optional[str] = typer.Argument(None, help="dsb2018 | livecell | usiigaci | sartorius "
                                                             "(none: list them with their URLs)."),
             to: Optional[Path] = typer.Option(None, "--to", help="Target folder (must not exist or be empty)."),
             variant: Optional[str] = typer.Option(None, "--variant", help="dsb2018: bbbc038 (default) | fixed; "
                                                                           "livecell: all (default) or a cell line "
                                                                           "(a172, bt474, bv2, huh7, mcf7, shsy5y, "
                                                                           "skbr3, skov3)."),
             url: Optional[str] = typer.Option(None, "--url", help="Base URL of a mirror holding the files by "
                                                                   "name (default: $CELLBENCH_DATA_MIRROR, else the "
                                                                   "public sources)."),
             no_verify: bool = typer.Option(False, "--no-verify", help="Proceed where no sha256 is published "
                                                                       "(the sha256 of what was fetched is printed)."),
             check: bool = typer.Option(False, "--check", help="Do not download: read and check the folder --to "
                                                               "(every image and mask)."),
             retries: int = typer.Option(3, "--retries", min=0, help="Resumed attempts of an interrupted transfer.")):
    """Download a public dataset (progress bar, sha256, unpacked into a layout `bench run --data` reads).
    Never runs implicitly; an existing non-empty --to is left untouched."""
    from bench.data import download as dl

    if name is None:
        typer.echo(dl.listing())
        return
    try:
        info = dl.dataset_info(name)
        if to is None:
            raise DataError(name, "--to DIR is required")
        if check:
            from bench.data.io import load_dataset
            from bench.data.stats import check_dataset

            marker = to / dl.MARKER
            rel = json.loads(marker.read_text()).get("data", ".") if marker.is_file() else info.data
            s = check_dataset(load_dataset(to / rel))
            typer.echo(f"ok: {to / rel}: {s['images']} images, {s['masks']} masks, classes "
                       f"{', '.join(s['classes'])}")
            return
        if info.plan is None:
            typer.echo(info.manual.format(to=to))
            return
        res = dl.get(name, to, variant, url, verify=not no_verify, retries=retries, echo=typer.echo)
    except (DataError, OSError, ValueError) as e:
        _fail(e)
    if res.status == "present":
        typer.echo(f"{res.target} already holds {name} (left untouched)")
    else:
        typer.echo(f"{name}: {res.images} images in {res.target}"
                   + (f" ({res.resumed} interrupted transfer(s) resumed)" if res.resumed else ""))
    typer.echo(f"use: bench run --data {res.data} ...")


# ---------------------------------------------------------------------------
# bench eval
# ---------------------------------------------------------------------------

@app.command("eval")
def eval_cmd(gt: Path = typer.Option(..., "--gt", help="Sartorius folder or train.csv, or a COCO json."),
             pred: Path = typer.Option(..., "--pred", help="Kaggle submission csv, COCO results json, or "
                                                           "cellbench predictions file."),
             json_out: Optional[Path] = typer.Option(None, "--json", help="Write all numbers as JSON."),
             resolve_overlaps: bool = typer.Option(False, "--resolve-overlaps",
                                                   help="Give each pixel to the highest-scoring instance "
                                                        "instead of rejecting overlapping predictions."),
             max_dets: int = typer.Option(1000, "--max-dets", min=1, help="COCO maxDets per image (>= 1)."),
             class_aware: bool = typer.Option(False, "--class-aware",
                                              help="COCO AP per predicted class (useCats=1) instead of "
                                                   "class-agnostic (LIVECell's way, the default)."),
             seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
             cluster: str = typer.Option("auto", "--cluster", help="Bootstrap unit: auto (groups of images of "
                                                                  "one sample/well when there are such groups, "
                                                                  "else images), none (images), or an image "
                                                                  "attribute, e.g. sample_id (every image must "
                                                                  "have it)."),
             remove_boundary_cells: bool = typer.Option(False, "--remove-boundary-cells",
                                                        help="Also report F1 with NeurIPS-CellSeg's removal "
                                                             "of cells touching the image's 2-pixel border."),
             breakdown: Optional[str] = typer.Option(None, "--breakdown", help="Per-image attribute (modality, "
                                                     "cell_type, cell_line, ...): mAP, CI and counts per value.")):
    """Score predictions: Kaggle mAP (exact), COCO AP, F1/PQ/AJI/mean matched IoU, per class and
    threshold, the error taxonomy, 95% CIs (clustered by sample/well where images come in groups),
    and per value of a per-image attribute with --breakdown.

    Prediction ids are matched to the ground truth by image id, else by file name, else by file
    stem (one key for the whole file; the one used is printed and written to --json)."""
    from bench.data.attributes import attribute_values
    from bench.data.io import load_dataset
    from bench.data.predictions import load_predictions_for
    from bench.metrics.breakdown import breakdown_table
    from bench.metrics.evaluator import evaluate_predictions
    from bench.report.tables import eval_table
    from bench.util import atomic_write_json

    _check_output_file(json_out, "--json")
    try:
        ds = load_dataset(gt, require_images=False)
        preds, matched_by = load_predictions_for(pred, ds, ds.classes)
        gtd = {s.image_id: (s.instances, s.cell_type(ds.classes)) for s in ds}
        from bench.metrics.resample import cluster_option

        groups, attr = cluster_option(ds, cluster)
        bd = (breakdown, attribute_values(ds, breakdown)) if breakdown else None
        res = evaluate_predictions(gtd, preds, ds.classes, resolve_overlaps=resolve_overlaps, max_dets=max_dets,
                                   class_aware_coco=class_aware, seed=seed, groups=groups, cluster=attr,
                                   remove_boundary_cells=remove_boundary_cells, breakdown=bd)
    except (DataError, OSError, ValueError) as e:
        _fail(e)
    res["matched_by"] = matched_by
    typer.echo(f"predictions of {len(preds)} image(s) matched to the ground truth by {matched_by}")
    typer.echo(eval_table(res))
    if "breakdown" in res:
        typer.echo("\n" + breakdown_table(res["breakdown"]))
    if json_out:
        try:
            atomic_write_json(json_out, res)
        except OSError as e:
            _fail(e)
        typer.echo(f"wrote {json_out}")


# ---------------------------------------------------------------------------
# bench models / run / report
# ---------------------------------------------------------------------------

@app.command("models")
def models_cmd():
    """List registered models: framework, installed or not (and how to install), version, devices."""
    from bench import envs
    from bench.adapters import registry

    typer.echo(f"{'model':<14} {'framework':<14} {'installed':<10} {'version':<12} {'devices':<10} classes  "
               f"{'environment':<24} notes")
    for name, cls in registry.registered().items():
        a = envs.availability(cls)  # asked in the model's own environment
        caps = cls.capabilities
        where = f"{a['environment']} ({'set up' if a['ready'] else 'missing'})"
        typer.echo(f"{name:<14} {cls.framework:<14} {'yes' if a['ok'] else 'no':<10} {a['version'] or '-':<12} "
                   f"{','.join(caps.devices):<10} {'yes' if caps.predicts_classes else 'no':<8} {where:<24} "
                   f"{'' if a['ok'] else a['hint']}")


@app.command("run")
def run_cmd(models: str = typer.Option(..., "--models", help="Comma-separated specs NAME[:KEY=VALUE,...], e.g. "
                                                             "'cellpose:diam_mean=20,maskrcnn-tv:lr_steps=[100,140]"
                                                             ",watershed' (values are YAML)."),
            opts: list[str] = typer.Option([], "--opt", help="MODEL.KEY=VALUE: one model's option (repeatable; "
                                                             "YAML value, e.g. --opt maskrcnn-tv.lr_steps=[100,140]); "
                                                             "goes over the spec's own."),
            sets: list[str] = typer.Option([], "--set", help="KEY=VALUE for every model (repeatable); an error "
                                                             "naming the models that have no such option."),
            data: Optional[str] = typer.Option(None, "--data", help="Dataset; default: built-in synthetic."),
            preset: str = typer.Option("smoke", "--preset", help="smoke | default | paper"),
            device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N (a CPU-only model "
                                                                "runs on the CPU and says so)"),
            seed: int = typer.Option(0, "--seed"),
            out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default results/runs/<stamp>)."),
            resume: bool = typer.Option(False, "--resume", help="Continue --out (which must hold a run) or the "
                                                                "latest run."),
            val: float = typer.Option(0.2, "--val", help="Validation fraction of the split."),
            timeout: Optional[float] = typer.Option(None, "--timeout", min=1,
                                                    help="Seconds per model (fit + predict + score); a model "
                                                         "past it is stopped and reported as timed out."),
            skip_bad: bool = typer.Option(False, "--skip-bad", help="Drop images that cannot be read (missing, "
                                                                    "corrupt, wrong size) instead of refusing the "
                                                                    "run; each is printed and listed in the "
                                                                    "manifest."),
            executor: str = cli_options.EXECUTOR, jobs: Optional[int] = cli_options.JOBS,
            gpus: Optional[str] = cli_options.GPUS, max_parallel: Optional[int] = cli_options.MAX_PARALLEL,
            slurm: list[str] = cli_options.SLURM):
    """Train and score models on one split; each model in its own process. Exit code = failed models."""
    from bench.adapters.registry import ConfigError, compose_specs
    from bench.cli_executor import executor_spec
    from bench.runner.run import RunInterrupted, run_benchmark, summary_table

    try:
        specs = compose_specs(models, opts, sets)  # every name, key and value checked before anything runs
        if data is not None and not Path(data).exists():
            raise DataError(data, "dataset path does not exist")
        spec = executor_spec(executor, jobs, gpus, max_parallel, slurm, device)
        run_dir, outcomes = run_benchmark(specs, data, preset, device, seed, out, resume, val, timeout_s=timeout,
                                          skip_bad=skip_bad, executor=spec)
    except RunInterrupted as e:  # the worker was stopped and recorded as interrupted: --resume continues
        typer.secho(f"stopped: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(130)
    except (DataError, ConfigError, OSError, ValueError, RuntimeError) as e:
        _fail(e)
    typer.echo("\n" + summary_table(outcomes))
    failed = sum(o.state == "failed" for o in outcomes)
    missing = [o.label for o in outcomes if o.state == "not installed"]
    typer.echo(f"\nrun folder: {run_dir}" + (f"\nnot installed: {', '.join(missing)}" if missing else ""))
    raise typer.Exit(min(failed, 100))


@app.command("report")
def report_cmd(runs: Optional[list[Path]] = typer.Argument(None, help="Run folders (default: the latest), "
                                                                      "or one sweep folder."),
               out: Path = typer.Option(Path("results"), "--out", help="Where leaderboard.* and plots go."),
               breakdown: Optional[str] = typer.Option(None, "--breakdown", help="Also per value of a per-image "
                                                       "attribute (modality, cell_type, cell_line, ...; auto: the one the "
                                                       "split is stratified by, if not cell_type).")):
    """Leaderboard (md, csv, html), PNG plots and the interactive report.html from one or more runs, or a sweep's report."""
    from bench.report.leaderboard import write_report
    from bench.runner.run import latest_run

    runs = list(runs or [])
    from bench.sweep import is_sweep

    if len(runs) == 1 and is_sweep(runs[0]):  # a sweep folder: its own report (default: SWEEP/report)
        from bench.report.sweep_report import write_sweep_report

        try:
            paths = write_sweep_report(runs[0], None if out == Path("results") else out)
        except (DataError, OSError, ValueError, KeyError) as e:
            _fail(e)
        for p in paths:
            typer.echo(f"wrote {p}")
        return
    if not runs:
        last = latest_run()
        if last is None:
            _fail(FileNotFoundError("no run found in results/runs: run `bench run` first"))
        runs = [last]
    try:
        paths = write_report(runs, out, breakdown)
    except (DataError, OSError, ValueError) as e:
        _fail(e)
    for p in paths:
        typer.echo(f"wrote {p}")


from bench import cli_extra, cli_sweep  # noqa: E402,F401  (register tune/predict/submit and sweep)
from bench import cli_matches  # noqa: E402,F401  (register matches)
from bench import cli_executor  # noqa: E402,F401  (register status)
from bench import cli_ensemble  # noqa: E402,F401  (register ensemble and tta)
