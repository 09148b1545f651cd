"""The one in-memory currency shared by datasets, adapters and the evaluator.

A :class:`Sample` is an image plus its :class:`Instances`; predictions are
:class:`Instances` too (with scores). Masks are COCO uncompressed counts
(see :mod:`bench.data.rle`), never dense stacks: a 780-cell 704x520 image would be
285 MB as a dense boolean stack and a few hundred KB as runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from bench.data import rle


@dataclass
class Instances:
    """Instance masks of one image: counts per mask, class per mask, optional scores.

    ``classes`` index the dataset's class list; -1 means "no class" (class-agnostic
    models such as Cellpose or watershed). ``scores`` is None for ground truth.
    """

    height: int
    width: int
    counts: list[np.ndarray] = field(default_factory=list)
    classes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    scores: np.ndarray | None = None
    # (starts, lengths, owner) of every foreground run, column-major; readers that already have
    # them (the Kaggle decoder) hand them over so that the metrics do not recompute them
    _runs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)

    def runs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._runs is None:
            self._runs = rle.runs_of_many(self.counts)
        return self._runs

    def __post_init__(self):
        self.classes = np.asarray(self.classes, dtype=np.int64).reshape(-1)
        if len(self.classes) != len(self.counts):
            raise ValueError(f"{len(self.counts)} masks but {len(self.classes)} classes")
        if self.scores is not None:
            self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
            if len(self.scores) != len(self.counts):
                raise ValueError(f"{len(self.counts)} masks but {len(self.scores)} scores")

    def __len__(self) -> int:
        return len(self.counts)

    @property
    def areas(self) -> np.ndarray:
        return np.array([rle.area(c) for c in self.counts], dtype=np.int64)

    def subset(self, keep: np.ndarray | Sequence[int] | Sequence[bool]) -> "Instances":
        keep = np.asarray(keep)
        idx = np.flatnonzero(keep) if keep.dtype == bool else keep.astype(np.int64)
        return Instances(
            self.height, self.width, [self.counts[i] for i in idx], self.classes[idx],
            None if self.scores is None else self.scores[idx],
        )

    def boxes_xywh(self) -> np.ndarray:
        """Tight boxes (x, y, w, h) in pixels, from the runs (no dense masks)."""
        out = np.zeros((len(self), 4), dtype=np.float64)
        for i, c in enumerate(self.counts):
            pix = rle.pixel_indices(c)
            if pix.size == 0:
                continue
            x, y = np.divmod(pix, self.height)
            out[i] = [x.min(), y.min(), x.max() - x.min() + 1, y.max() - y.min() + 1]
        return out

    def to_label_image(self) -> np.ndarray:
        """Label image 1..N; later (lower-score or later) masks never overwrite earlier ones."""
        lab = np.zeros(self.height * self.width, dtype=np.int32)
        order = range(len(self)) if self.scores is None else np.argsort(-self.scores, kind="stable")
        for i in reversed(list(order)):
            lab[rle.pixel_indices(self.counts[i])] = i + 1
        return lab.reshape((self.width, self.height)).T

    def dense(self, i: int) -> np.ndarray:
        return rle.decode_mask(self.counts[i], self.height, self.width)

    @classmethod
    def from_label_image(cls, labels: np.ndarray, scores: np.ndarray | None = None, cls_id: int = -1) -> "Instances":
        h, w = labels.shape
        ids, counts = rle.encode_label_image(labels)
        sc = None if scores is None else np.asarray(scores)[ids - 1] if len(ids) else np.zeros(0)
        return cls(h, w, counts, np.full(len(counts), cls_id, dtype=np.int64), sc)

    @classmethod
    def from_masks(cls, masks: np.ndarray, classes=None, scores=None) -> "Instances":
        """From a dense N x H x W stack (adapters with per-instance masks, one image at a time)."""
        masks = np.asarray(masks, dtype=bool)
        n, h, w = masks.shape
        counts = [rle.encode_mask(m) for m in masks]
        classes = np.full(n, -1) if classes is None else classes
        return cls(h, w, counts, classes, scores)

    @classmethod
    def empty(cls, height: int, width: int, with_scores: bool = True) -> "Instances":
        return cls(height, width, [], np.zeros(0, dtype=np.int64), np.zeros(0) if with_scores else None)


@dataclass
class Sample:
    """One image with its instances. The image is read lazily from ``path`` unless given."""

    image_id: str
    instances: Instances
    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    _image: np.ndarray | None = None

    @property
    def image(self) -> np.ndarray:
        if self._image is not None:
            return self._image
        if self.path is None:
            raise ValueError(f"sample {self.image_id} has neither an image nor a path")
        from bench.data.io import read_image

        return read_image(self.path, expect_hw=(self.instances.height, self.instances.width))

    @property
    def height(self) -> int:
        return self.instances.height

    @property
    def width(self) -> int:
        return self.instances.width

    @property
    def group(self) -> str:
        """Images sharing a group (well, sample) never straddle the split."""
        return str(self.meta.get("group", self.image_id))

    def cell_type(self, classes: Sequence[str]) -> str:
        """The image's class: its annotated cell type, else the majority ground-truth class."""
        if self.meta.get("cell_type"):
            return str(self.meta["cell_type"])
        cl = self.instances.classes[self.instances.classes >= 0]
        return classes[int(np.bincount(cl).argmax())] if cl.size else "all"


@dataclass
class Dataset:
    """A named list of samples sharing one class list."""

    name: str
    classes: list[str]
    samples: list[Sample]
    root: Path | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def by_id(self) -> dict[str, Sample]:
        return {s.image_id: s for s in self.samples}

    def subset(self, ids: Sequence[str]) -> "Dataset":
        index = self.by_id()
        missing = [i for i in ids if i not in index]
        if missing:
            raise KeyError(f"ids not in dataset {self.name}: {missing[:5]}")
        return Dataset(self.name, self.classes, [index[i] for i in ids], self.root)
