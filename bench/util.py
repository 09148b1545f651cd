"""Small shared helpers: atomic writes (finished results are never half-written), where ../shared is."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=_json_default) + "\n")


def _json_default(o):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def append_jsonl(path: str | Path, obj: Any) -> None:
    """Append one line (the train log): a crash loses at most the line being written."""
    with open(path, "a") as f:
        f.write(json.dumps(obj, default=_json_default) + "\n")
        f.flush()


def shared_data() -> Path | None:
    """The small real data beside the checkout (``../shared/data``, or ``$CELLBENCH_SHARED``), if present.

    Tests and ``make bench`` read it when it is there and skip what needs it when not.
    """
    repo = Path(__file__).resolve().parents[1]
    for cand in (repo.parent / "shared" / "data", Path(os.environ.get("CELLBENCH_SHARED", "/nonexistent")),
                 Path("/work/shared/data")):
        if cand.is_dir():
            return cand
    return None
