"""``bench matches``: a run's match tables (every gt and predicted instance with its best partner)
and the error taxonomy computed from them, registered on the ``bench`` typer app."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bench.cli import _check_output_file, _fail, app
from bench.data.errors import DataError


@app.command("matches")
def matches_cmd(run: Path = typer.Argument(..., help="Run folder (results/runs/<stamp>-<hash>)."),
                model: Optional[str] = typer.Option(None, "--model", help="Model label or spec (default: every "
                                                                          "model with predictions)."),
                out: Optional[Path] = typer.Option(None, "--out", help="Write the table here (.csv, or .csv.gz "
                                                                       "compressed); default: print a summary."),
                pairs: bool = typer.Option(False, "--pairs", help="--out writes the pair table (every overlapping "
                                                                  "gt/prediction pair) instead."),
                iou: float = typer.Option(0.5, "--iou", help="IoU threshold of the taxonomy printed (0.1 < iou "
                                                             "< 1; the stored outcomes are at 0.5).")):
    """Every gt and predicted instance of every validation image with its best partner, IoU, score,
    class, area, size bin and outcome (matched, missed, spurious, split, merge, poor boundary,
    duplicate), and the error taxonomy with the Kaggle mAP if each error type were fixed.

    Read from models/<label>/matches.csv.gz; a run of an older cellbench has none: it is computed
    from the stored predictions (no inference) and saved there."""
    from bench.metrics.matches import load_run_matches
    from bench.metrics.taxonomy import taxonomy, taxonomy_table
    from bench.util import atomic_write_bytes

    _check_output_file(out, "--out")
    try:
        if not run.is_dir():
            raise DataError(run, "run folder does not exist")
        if not 0.1 < iou < 1:
            raise ValueError(f"--iou must be between 0.1 and 1 (exclusive), got {iou}")
        from bench.store import RunDir

        classes = RunDir(run).read_manifest().classes
        table = load_run_matches(run, [model] if model else None)
        for label in table.models():
            t = table.select(model=label)
            typer.echo(taxonomy_table(taxonomy(t.images(classes), iou), f"## {label}") + "\n")
        if out is not None:
            data = table.to_csv_gz("pairs" if pairs else "instances")
            if not out.name.endswith(".gz"):
                import gzip

                data = gzip.decompress(data)
            atomic_write_bytes(out, data)
            typer.echo(f"wrote {out}: {len(table.pairs['image_id']) if pairs else len(table)} rows "
                       f"({', '.join(table.models())})")
    except (DataError, OSError, ValueError) as e:
        _fail(e)
