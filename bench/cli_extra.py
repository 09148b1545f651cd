"""``bench tune``, ``bench predict`` and ``bench submit``, registered on the ``bench`` typer app.

Imported at the end of :mod:`bench.cli` (after ``app`` exists), so these commands are
part of ``bench`` whichever module is imported first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bench.cli import _fail, app
from bench.data.errors import DataError


def _errors():
    from bench.adapters.registry import ConfigError

    return (DataError, ConfigError, OSError, ValueError, RuntimeError)


def _notes(lm, run: Path, raw: bool) -> None:
    """Where the model runs when not where asked (never silently), and a missing tuning."""
    from bench.store import ModelDir

    if lm.device_note:
        typer.secho(f"note: {lm.label} {lm.device_note}", fg=typer.colors.YELLOW, err=True)
    if not raw and lm.tuning is None:
        typer.secho(f"note: {ModelDir(lm.model_dir).tuning} not found (run `bench tune {run}`): only "
                    "overlaps are resolved", fg=typer.colors.YELLOW, err=True)


@app.command("tune")
def tune_cmd(run: Path = typer.Argument(..., help="Run folder (results/runs/<stamp>-<hash>)."),
             models: Optional[str] = typer.Option(None, "--models",
                                                  help="Comma-separated model labels or specs (default: all "
                                                       "with saved validation predictions)."),
             folds: int = typer.Option(5, "--folds", min=2, help="k of the k-fold cross-validation (>= 2; at "
                                                                 "most the number of validation images)."),
             seed: Optional[int] = typer.Option(None, "--seed", help="Fold shuffle seed (default: the run's).")):
    """Tune score threshold and minimum mask area per class on the saved validation predictions.

    Reports untuned, tuned in-sample (optimistic: fitted and scored on the same images) and
    tuned cross-validated (k-fold over validation images) Kaggle mAP; saves the thresholds
    fitted on all validation images to models/<label>/tuning.json (shown by `bench report`).
    No inference is redone.
    """
    from bench.tune import tune_run, tuning_table

    try:
        if not run.is_dir():
            raise DataError(run, "run folder does not exist")
        names = [m.strip() for m in models.split(",") if m.strip()] if models else None
        if names:
            from bench.adapters.registry import split_specs

            names = split_specs(",".join(names))
        res = tune_run(run, names, k=folds, seed=seed, echo=typer.echo)
    except _errors() as e:
        _fail(e)
    typer.echo("\n" + tuning_table(res))


@app.command("predict")
def predict_cmd(run: Path = typer.Option(..., "--run", help="Run folder holding the trained model."),
                model: str = typer.Option(..., "--model", help="Model label (folder under models/) or spec."),
                images: Path = typer.Option(..., "--images", help="Folder of PNG/TIF images."),
                out: Path = typer.Option(..., "--out", help="Output folder: predictions.jsonl.gz, labels/, "
                                                            "overlays/."),
                raw: bool = typer.Option(False, "--raw", help="The model's raw output: no overlap resolution, "
                                                              "no tuned thresholds."),
                skip_bad: bool = typer.Option(False, "--skip-bad", help="Report unreadable images and go on "
                                                                        "(default: stop, naming the file)."),
                label_format: str = typer.Option("png", "--label-format", help="png | tif (uint16 labels)."),
                device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N")):
    """Run a trained model of a run on new images: predictions file, label images, overlay PNGs.

    Applies the tuned post-processing (models/<label>/tuning.json from `bench tune`: overlaps
    resolved, per-class score and area thresholds) unless --raw; without tuning.json only
    overlaps are resolved.
    """
    from bench.infer import load_model, predict_folder

    try:
        lm = load_model(run, model, device)
        _notes(lm, run, raw)
        res = predict_folder(lm, images, out, raw=raw, skip_bad=skip_bad, label_format=label_format)
    except _errors() as e:
        _fail(e)
    for p, why in res.bad:
        typer.secho(f"skipped {p}: {why}", fg=typer.colors.YELLOW, err=True)
    n = sum(len(p) for p in res.preds.values())
    typer.echo(f"{len(res.preds)} images, {n} instances -> {out / 'predictions.jsonl.gz'}, {out / 'labels'}, "
               f"{out / 'overlays'}" + (f"; {len(res.bad)} unreadable image(s) skipped" if res.bad else ""))


@app.command("submit")
def submit_cmd(run: Path = typer.Option(..., "--run", help="Run folder holding the trained model."),
               model: str = typer.Option(..., "--model", help="Model label (folder under models/) or spec."),
               images: Path = typer.Option(..., "--images", help="Folder of the test images (PNG/TIF)."),
               out: Path = typer.Option(Path("submission.csv"), "--out", help="The Kaggle csv to write."),
               raw: bool = typer.Option(False, "--raw", help="No tuned thresholds (overlaps are resolved "
                                                             "anyway: Kaggle rejects them)."),
               skip_bad: bool = typer.Option(False, "--skip-bad", help="Report unreadable images and go on "
                                                                       "(they will be missing from the file)."),
               device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N")):
    """Write a Kaggle submission (id,predicted; one row per instance; empty row for an image without).

    The file is re-read with cellbench's own reader and checked (sorted rows, every image
    present, masks read back identical, no overlaps) before it is put at --out.
    """
    from bench.infer import load_model, submit_folder

    if out.is_dir():
        _fail(DataError(out, "--out is a folder; give the csv file to write, e.g. "
                             f"{out / 'submission.csv'}"))
    try:
        lm = load_model(run, model, device)
        _notes(lm, run, raw)
        res, n_rows = submit_folder(lm, images, out, raw=raw, skip_bad=skip_bad)
    except _errors() as e:
        _fail(e)
    for p, why in res.bad:
        typer.secho(f"skipped {p}: {why} (missing from the submission)", fg=typer.colors.YELLOW, err=True)
    empty = sum(len(p) == 0 for p in res.preds.values())
    typer.echo(f"wrote {out}: {n_rows} rows for {len(res.preds)} images ({empty} without instances); "
               "checked: re-read, sorted, no overlaps, every image present")
