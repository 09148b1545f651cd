"""``bench ensemble`` and ``bench tta``: new leaderboard rows from a run's trained models, without
training again (registered on the ``bench`` app by one import at the end of :mod:`bench.cli`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bench.cli import _fail, app
from bench.data.errors import DataError


def _errors():
    from bench.adapters.registry import ConfigError

    return (DataError, ConfigError, OSError, ValueError, RuntimeError)


@app.command("ensemble")
def ensemble_cmd(run: Path = typer.Argument(..., help="Run folder: the ensemble becomes one of its models."),
                 models: str = typer.Option(..., "--models", help="Comma-separated members: model labels of RUN "
                                                                  "or paths of model folders of runs on the same "
                                                                  "split (RUN2/models/cellpose)."),
                 name: str = typer.Option(..., "--name", help="Folder name of the ensemble under RUN/models/."),
                 method: str = typer.Option("score-average", "--method",
                                            help="mask-vote | score-average | wbf-masks (bench/fusion.py)."),
                 weights: Optional[str] = typer.Option(None, "--weights", help="One weight per member, in --models "
                                                                               "order (default: tuned by CV, or "
                                                                               "equal with --no-tune)."),
                 tune: bool = typer.Option(True, "--tune/--no-tune", help="Choose weights (unless given) and bench "
                                                                          "tune's thresholds (score, min area per "
                                                                          "class) by k-fold CV."),
                 folds: int = typer.Option(5, "--folds", min=2, help="k of the cross-validation."),
                 seed: Optional[int] = typer.Option(None, "--seed", help="Fold shuffle seed (default: the run's).")):
    """Fuse the cached validation predictions of 2+ models of the same split into a new model folder.

    No inference is redone. With --tune (default) the leaderboard number is the cross-validated
    one (each image fused with the weights/threshold chosen on the other folds); the in-sample
    figure is printed as optimistic. Prints the paired test against every member.
    """
    from bench.ensemble import build_ensemble, parse_weights, summary_table

    try:
        if not run.is_dir():
            raise DataError(run, "run folder does not exist")
        refs = [m.strip() for m in models.split(",") if m.strip()]
        w = parse_weights(weights, len(refs))
        res = build_ensemble(run, refs, name, method, w, tune, folds, seed, echo=typer.echo)
    except _errors() as e:
        _fail(e)
    typer.echo(summary_table(res))


@app.command("tta")
def tta_cmd(run: Path = typer.Argument(..., help="Run folder holding the trained model."),
            model: str = typer.Option(..., "--model", help="Model label (folder under models/) or spec."),
            tta: str = typer.Option("flip", "--tta", help="flip | hflip | vflip | hvflip | scale | scale<f> joined "
                                                          "by '+' (bench/tta.py)."),
            device: str = typer.Option("cpu", "--device", help="auto | cpu | cuda | cuda:N")):
    """Predict a trained model of a run again with test-time augmentation, as a new model folder
    (RUN/models/<label>--tta=...): the leaderboard pairs it with the model without TTA."""
    from bench.tta_run import summary, tta_model

    try:
        if not run.is_dir():
            raise DataError(run, "run folder does not exist")
        res = tta_model(run, model, tta, device, echo=typer.echo)
    except _errors() as e:
        _fail(e)
    typer.echo(summary(res))
