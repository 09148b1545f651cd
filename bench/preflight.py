"""Preflight: everything about the data and the output folder that can be checked before training.

``bench run`` used to find a corrupt validation image in the predict stage, after the whole
training, and a corrupt (or wrongly sized) training image not at all when the model never read
it. :func:`preflight` reads every image of the split (train and val), checks its size against
the annotations and checks that the output folder can be written and has room, and returns
*every* problem found (not the first), each naming the file. It writes nothing (the
writability probe is a temporary file in the nearest existing folder above the run folder,
removed at once), so a failed preflight leaves no run folder behind.

The caller decides what to do with the problems: :func:`require_preflight` raises one
:class:`PreflightError` listing them all. :func:`check_images` returns the bad samples
themselves, for a ``--skip-bad`` that drops them and records them in the manifest.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

from bench.data.errors import DataError
from bench.data.sample import Dataset, Sample

DEFAULT_MIN_FREE_MB = 200.0   # a smoke run's checkpoints and predictions take well under this


class PreflightError(DataError):
    """Every problem preflight found, one per line (``problems`` keeps them as a list)."""

    def __init__(self, problems: Sequence[str], shown: int = 30, where: str = "preflight",
                 when: str = "found before anything was written"):
        self.problems = list(problems)
        lines = [f"  - {p}" for p in self.problems[:shown]]
        if len(self.problems) > shown:
            lines.append(f"  ... and {len(self.problems) - shown} more")
        n = len(self.problems)
        super().__init__(where, f"{n} problem{'s' if n != 1 else ''} {when}:\n" + "\n".join(lines))


def split_ids(split: dict | Iterable[str] | None, dataset: Dataset) -> list[str]:
    """The image ids a run uses: a split dict's ``train`` + ``val`` (in that order), an id list,
    or every image of the dataset."""
    if split is None:
        return [s.image_id for s in dataset]
    if isinstance(split, dict):
        train = list(split.get("train", []))
        seen = set(train)
        return train + [i for i in split.get("val", []) if i not in seen]
    return list(split)


def _check_sample(s: Sample) -> str | None:
    """None if the image reads and has the annotated size, else the problem (naming the file)."""
    if s._image is not None:
        if tuple(s._image.shape[:2]) != (s.height, s.width):
            return (f"image {s.image_id}: in-memory image is {s._image.shape[1]}x{s._image.shape[0]} but its "
                    f"annotations say {s.width}x{s.height}")
        return None
    if s.path is None:
        where = s.meta.get("expected_image")
        return f"{where}: image of id {s.image_id} is missing" if where else \
            f"image {s.image_id}: no image file (annotations only)"
    from bench.data.io import read_image

    try:
        read_image(s.path, expect_hw=(s.height, s.width))
    except DataError as e:
        return str(e)
    except (OSError, ValueError, MemoryError) as e:  # anything a decoder may raise that read_image did not wrap
        return f"{s.path}: cannot read image ({type(e).__name__}: {e})"
    return None


def check_images(dataset: Dataset, ids: Iterable[str] | None = None, threads: int = 2
                 ) -> list[tuple[Sample, str]]:
    """Read every image of ``ids`` (default: all); (sample, problem) for each that cannot be read
    or whose size is not the annotated one, in the order of ``ids``. Unknown ids are problems too."""
    index = dataset.by_id()
    ids = [s.image_id for s in dataset] if ids is None else list(ids)
    bad: list[tuple[Sample, str]] = []
    samples = []
    for i in ids:
        if i not in index:
            bad.append((Sample(str(i), _no_instances()), f"image id {i!r} of the split is not in dataset "
                                                          f"{dataset.name}"))
        else:
            samples.append(index[i])
    with ThreadPoolExecutor(max(1, threads)) as pool:  # decoders release the GIL
        results = list(pool.map(_check_sample, samples))
    bad += [(s, why) for s, why in zip(samples, results) if why is not None]
    return bad


def _no_instances():
    from bench.data.sample import Instances

    return Instances.empty(1, 1, with_scores=False)


def check_output_folder(out_dir: str | Path, min_free_mb: float = DEFAULT_MIN_FREE_MB) -> list[str]:
    """Problems with writing under ``out_dir`` (which need not exist yet): the nearest existing
    folder must be a writable folder with ``min_free_mb`` free. Creates nothing that stays."""
    out_dir = Path(out_dir)
    probe = out_dir
    while not probe.exists():
        if probe.parent == probe:
            return [f"{out_dir}: no existing folder above it"]
        probe = probe.parent
    if not probe.is_dir():
        return [f"{out_dir}: {probe} is a file, not a folder"]
    problems = []
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".cellbench-preflight.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        problems.append(f"{out_dir}: cannot write in {probe} ({e.strerror or e})")
    try:
        free_mb = shutil.disk_usage(probe).free / 2 ** 20
    except OSError as e:
        problems.append(f"{out_dir}: cannot tell the free space of {probe} ({e.strerror or e})")
    else:
        if free_mb < min_free_mb:
            problems.append(f"{out_dir}: only {free_mb:.0f} MB free on the disk of {probe}, at least "
                            f"{min_free_mb:.0f} MB needed for checkpoints and predictions")
    return problems


def preflight(dataset: Dataset, split: dict | Iterable[str] | None, out_dir: str | Path | None,
              min_free_mb: float = DEFAULT_MIN_FREE_MB, threads: int = 2) -> list[str]:
    """Every problem that would stop or spoil a run, found before anything is written.

    ``split``: the run's split dict (train + val are checked), an id list, or None (every image).
    ``out_dir``: where the run folder will be (it need not exist); None skips the folder check.
    Returns the problems, each naming the file (or folder); empty when all is well.
    """
    problems = [why for _, why in check_images(dataset, split_ids(split, dataset), threads)]
    if out_dir is not None:
        problems += check_output_folder(out_dir, min_free_mb)
    return problems


def require_preflight(dataset: Dataset, split: dict | Iterable[str] | None, out_dir: str | Path | None,
                      **kw) -> None:
    """:func:`preflight`, raising one :class:`PreflightError` that lists every problem."""
    problems = preflight(dataset, split, out_dir, **kw)
    if problems:
        raise PreflightError(problems)


def skip_bad_images(dataset: Dataset, split: dict, threads: int = 2) -> tuple[dict, list[dict]]:
    """``bench run --skip-bad``: the split without the images that cannot be read (missing,
    corrupt, of another size than annotated), and one ``{"id", "problem"}`` per image dropped.

    The split keeps its ``dataset_hash`` (the annotations are unchanged); its ``hash`` is
    recomputed over the ids that remain, and it lists what was skipped. An error if nothing
    remains in train or in val: a benchmark of no images is no benchmark.
    """
    from bench.data.split import split_hash

    bad = check_images(dataset, split_ids(split, dataset), threads)
    if not bad:
        return split, []
    skipped = [{"id": s.image_id, "problem": why} for s, why in bad]
    drop = {d["id"] for d in skipped}
    out = dict(split)
    out["train"] = [i for i in split["train"] if i not in drop]
    out["val"] = [i for i in split["val"] if i not in drop]
    for part in ("train", "val"):
        if not out[part]:
            raise PreflightError([d["problem"] for d in skipped], where=dataset.root or dataset.name,
                                 when=f"with the images, and --skip-bad would leave no {part} image")
    out["hash"] = split_hash(out["train"], out["val"], split["dataset_hash"])
    out["skipped"] = skipped
    return out, skipped
