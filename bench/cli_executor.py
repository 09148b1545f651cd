"""``bench status``, and the executor options of ``bench sweep`` and ``bench run`` (registered from :mod:`bench.cli`)."""

from __future__ import annotations

from pathlib import Path

import typer

from bench.cli import _fail, app
from bench.data.errors import DataError


def executor_spec(executor: str, jobs: int | None, gpus: str | None, max_parallel: int | None, slurm: list[str],
                  device: str = "auto", sweep_file: Path | None = None, check: bool = True):
    """The executor options of ``bench run`` and ``bench sweep`` (``--executor/--jobs/--gpus/
    --max-parallel/--slurm``), over the ``slurm:`` section of ``sweep_file`` when given. With
    ``check``, refused before anything is written: no sbatch, ``--gpus`` on a CPU run (``bench
    sweep`` leaves that to ``run_sweep``, which checks against the sweep's resolved device)."""
    from bench.executor import ExecutorSpec, check_executor, parse_gpus, parse_slurm_options
    from bench.runner.devices import resolve_device

    gpu_list = parse_gpus(gpus)
    file_opts = {}
    if sweep_file is not None:
        from bench.sweep import load_sweep

        file_opts = load_sweep(sweep_file).slurm.model_dump(exclude_unset=True)
    items = list(slurm) + ([f"max_parallel={max_parallel}"] if max_parallel is not None else [])
    spec = ExecutorSpec(name=executor, jobs=jobs if jobs is not None else max(1, len(gpu_list)), gpus=gpu_list,
                        slurm=parse_slurm_options(file_opts, items))
    if check and not spec.serial:
        check_executor(spec, resolve_device(device))
    return spec


@app.command("status")
def status_cmd(path: Path = typer.Argument(..., help="A sweep folder (results/sweeps/...) or a run folder.")):
    """Every job of a sweep (or model of a run): pending, running (with its SLURM id), done, failed (with
    the last lines of its log). Reads the folders and squeue; changes nothing."""
    from bench.executor.status import status_text

    try:
        typer.echo(status_text(path))
    except (DataError, OSError, ValueError) as e:
        _fail(e)
