"""Small shared helpers: atomic writes (finished results are never half-written), where ../shared is."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _umask() -> int:
    """The process umask: from /proc (no side effect) where there is one, else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target.

    The file gets the mode an ordinary ``open(path, "w")`` would give it (``0o666`` less the
    umask; ``mkstemp`` alone makes 0600, unreadable to colleagues on a shared cluster). On any
    failure (disk full, permission denied, the target is a folder) the temporary file is removed
    and the error names ``path``.
    """
    path = Path(path)
    tmp = None
    try:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "it is a folder, not a file")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        why = f"cannot write {path}: {e.strerror or e}"
        raise (OSError(e.errno, why) if e.errno is not None else OSError(why)) from e
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


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
