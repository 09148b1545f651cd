"""``bench sweep``, registered on the ``bench`` typer app (imported at the end of :mod:`bench.cli`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bench import cli_options
from bench.cli import _fail, app
from bench.data.errors import DataError


@app.command("sweep")
def sweep_cmd(config: Path = typer.Argument(..., help="Sweep file, e.g. configs/experiments/study-smoke.yaml."),
              seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma-separated training seeds "
                                                                        "(default: the file's)."),
              preset: Optional[str] = typer.Option(None, "--preset", help="smoke | default | paper for the "
                                                   "base (variants that name a preset keep theirs)."),
              variants: Optional[str] = typer.Option(None, "--variants", help="Comma-separated subset of "
                                                                              "variants (default: all)."),
              sets: list[str] = typer.Option([], "--set", help="KEY=VALUE for every variant run (repeatable; YAML "
                                                               "value), e.g. --set eval_every=50; an error naming "
                                                               "the models that have no such option."),
              opts: list[str] = typer.Option([], "--opt", help="MODEL.KEY=VALUE for the variants of one model "
                                                               "(repeatable), e.g. --opt cellpose.eval_every=25; "
                                                               "goes over --set."),
              data: Optional[str] = typer.Option(None, "--data", help="Dataset instead of the file's."),
              device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
              out: Optional[Path] = typer.Option(None, "--out", help="Sweep folder (default "
                                                                     "results/sweeps/<stamp>-<name>)."),
              resume: bool = typer.Option(False, "--resume", help="Continue --out (or the latest sweep of "
                                                                  "this name); finished runs are kept."),
              report: bool = typer.Option(True, "--report/--no-report", help="Write the sweep report after."),
              executor: str = cli_options.EXECUTOR, jobs: Optional[int] = cli_options.JOBS,
              gpus: Optional[str] = cli_options.GPUS, max_parallel: Optional[int] = cli_options.MAX_PARALLEL,
              slurm: list[str] = cli_options.SLURM):
    """Run every variant x seed of an experiment on one split, then report it. Exit code = failed runs."""
    from bench.adapters.registry import ConfigError
    from bench.cli_executor import executor_spec
    from bench.executor import ExecutorError
    from bench.runner.run import RunInterrupted
    from bench.store import RunLocked
    from bench.sweep import parse_opts, parse_sets, run_sweep

    try:
        try:
            seed_list = sorted({int(s) for s in seeds.split(",") if s.strip()}) if seeds else None
        except ValueError:
            raise ValueError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
        if data is not None and not Path(data).exists():
            raise DataError(data, "dataset path does not exist")
        spec = executor_spec(executor, jobs, gpus, max_parallel, slurm, sweep_file=config, check=False)
        sweep_dir, states = run_sweep(config, seed_list, preset, device, out, resume,
                                      [v.strip() for v in variants.split(",")] if variants else None,
                                      parse_sets(sets), data, opts=parse_opts(opts), executor=spec)
    except RunInterrupted as e:  # the jobs were stopped and recorded as interrupted: --resume continues
        typer.secho(f"stopped: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(130)
    except (ConfigError, DataError, OSError, ValueError, RuntimeError, ExecutorError, RunLocked) as e:
        _fail(e)
    typer.echo("")
    for key, st in states.items():
        typer.echo(f"{key:<40} {st['state']}" + (f"  {st.get('detail', '')[:100]}" if st["state"] != "done" else ""))
    if report:
        from bench.report.sweep_report import write_sweep_report

        try:
            for p in write_sweep_report(sweep_dir):
                typer.echo(f"wrote {p}")
        except (DataError, OSError, ValueError, KeyError) as e:  # the runs are kept; `bench report` retries
            typer.secho(f"error writing the sweep report (runs kept in {sweep_dir}): {e}", fg=typer.colors.RED,
                        err=True)
    typer.echo(f"sweep folder: {sweep_dir}")
    raise typer.Exit(min(sum(st["state"] == "failed" for st in states.values()), 100))
