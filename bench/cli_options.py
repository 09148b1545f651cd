"""Command-line options that more than one command declares (one definition, one help text).

``bench run`` and ``bench sweep`` take the same executor options: a *job* is one model of a run,
or one variant x seed of a sweep (README: Running on a cluster). Typer reads these objects as the
parameters' defaults; nothing here imports the rest of the CLI.
"""

from __future__ import annotations

import typer

EXECUTOR = typer.Option("local", "--executor", help="local | slurm: where the jobs run (a job: one model of "
                                                    "bench run, one variant x seed of bench sweep; README: "
                                                    "Running on a cluster).")
JOBS = typer.Option(None, "--jobs", min=1, help="local: jobs at once (default 1, or one per --gpus); the cores "
                                                "are divided between them.")
GPUS = typer.Option(None, "--gpus", help="local: GPUs for the jobs, e.g. 0,1 (each job its own: "
                                         "CUDA_VISIBLE_DEVICES).")
MAX_PARALLEL = typer.Option(None, "--max-parallel", min=1, help="slurm: jobs running at once.")
SLURM = typer.Option([], "--slurm", help="KEY=VALUE per job (repeatable), over each model's resources: and the "
                                         "sweep file's slurm: section: gpus, cpus, mem_gb, time_min, partition, "
                                         "account, qos, additional={...}.")
