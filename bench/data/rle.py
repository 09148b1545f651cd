"""Run-length encodings: Kaggle (1-based, row-major) and COCO (column-major counts).

cellbench's one mask currency is the COCO *uncompressed* RLE: a uint32 array of
alternating background/foreground run lengths over the column-major (Fortran)
flattening of an H x W mask, always starting with a background run and summing to
H*W. It is what pycocotools works on, it keeps a 704x520 cell mask in a few dozen
integers, and it can be turned into pixel indices without ever materialising the
dense mask. Compressed COCO strings are only a serialisation format.

The Kaggle conversions work on whole images at once (all runs of all masks in one
numpy pass) because per-mask Python overhead, not arithmetic, dominates here.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Iterable, Sequence

import numpy as np

from bench.data.errors import DataError

Counts = np.ndarray  # uint32 COCO uncompressed counts, column-major


# ---------------------------------------------------------------------------
# dense <-> counts
# ---------------------------------------------------------------------------

def encode_mask(mask: np.ndarray) -> Counts:
    """Dense H x W boolean mask -> COCO counts (column-major)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    return _counts_from_flat(flat)


def _counts_from_flat(flat: np.ndarray) -> Counts:
    n = flat.size
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [n]))
    counts = np.diff(bounds)
    if n and flat[0]:
        counts = np.concatenate(([0], counts))
    return counts.astype(np.uint32)


def decode_mask(counts: Counts, height: int, width: int) -> np.ndarray:
    """COCO counts -> dense H x W boolean mask (only for small or single masks)."""
    flat = np.zeros(height * width, dtype=bool)
    starts, lengths = runs_from_counts(counts)
    for s, l in zip(starts.tolist(), lengths.tolist()):
        flat[s:s + l] = True
    return flat.reshape((width, height)).T


def runs_from_counts(counts: Counts) -> tuple[np.ndarray, np.ndarray]:
    """Foreground runs (0-based start, length) in column-major pixel order."""
    c = np.asarray(counts, dtype=np.int64)
    ends = np.cumsum(c)
    starts = ends[0::2][: len(c) // 2]
    lengths = c[1::2]
    keep = lengths > 0
    return starts[keep], lengths[keep]


def runs_of_many(counts: list[Counts]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Foreground runs of many masks at once: (starts, lengths, owner mask index), no Python loop.

    The metrics need every run of every mask of an image; doing it mask by mask made
    Python overhead, not arithmetic, the cost of scoring.
    """
    n = len(counts)
    if n == 0:
        e = np.zeros(0, dtype=np.int64)
        return e, e, e
    lens = np.fromiter((len(c) for c in counts), dtype=np.int64, count=n)
    flat = np.concatenate(counts).astype(np.int64)
    first = np.cumsum(lens) - lens
    ends = np.cumsum(flat)
    base = np.repeat(ends[first] - flat[first], lens)  # total of the earlier masks
    local = np.arange(flat.size) - np.repeat(first, lens)
    fg = (local % 2 == 1) & (flat > 0)
    lengths = flat[fg]
    starts = ends[fg] - base[fg] - lengths
    owner = np.repeat(np.arange(n, dtype=np.int64), lens)[fg]
    return starts, lengths, owner


def split_counts(starts: np.ndarray, lengths: np.ndarray, owner: np.ndarray, n_masks: int,
                 n_pixels: int) -> list[Counts]:
    """Sorted, non-touching runs of many masks -> COCO counts per mask (inverse of runs_of_many)."""
    nruns = np.bincount(owner, minlength=n_masks)
    first_run = np.cumsum(nruns) - nruns
    ends = starts + lengths
    prev_end = np.empty_like(ends)
    prev_end[1:] = ends[:-1]
    is_first = np.zeros(len(starts), dtype=bool)
    is_first[first_run[nruns > 0]] = True
    prev_end[is_first] = 0
    gaps = starts - prev_end
    size = 2 * nruns + 1
    off = np.cumsum(size) - size
    out = np.empty(int(size.sum()), dtype=np.int64)
    k = np.arange(len(starts)) - first_run[owner]
    out[off[owner] + 2 * k] = gaps
    out[off[owner] + 2 * k + 1] = lengths
    last_end = np.zeros(n_masks, dtype=np.int64)
    has = nruns > 0
    last_end[has] = ends[first_run[has] + nruns[has] - 1]
    out[off + size - 1] = n_pixels - last_end
    out = out.astype(np.uint32)
    stop = np.cumsum(size)
    stop[out[stop - 1] == 0] -= 1  # pycocotools writes no trailing empty background run
    stop = np.maximum(stop, off + 1)
    return [out[a:b] for a, b in zip(off.tolist(), stop.tolist())]


def area(counts: Counts) -> int:
    return int(np.asarray(counts[1::2], dtype=np.int64).sum())


def pixel_indices(counts: Counts) -> np.ndarray:
    """Column-major flat indices of the foreground pixels (sorted)."""
    starts, lengths = runs_from_counts(counts)
    return expand_runs(starts, lengths)


def expand_runs(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """[(s, l), ...] -> s, s+1, ..., s+l-1 for every run, vectorised."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths
    idx = np.arange(total, dtype=np.int64) - np.repeat(offsets, lengths)
    return idx + np.repeat(np.asarray(starts, dtype=np.int64), lengths)


def counts_from_indices(idx: np.ndarray, n_pixels: int) -> Counts:
    """Sorted unique column-major pixel indices -> COCO counts."""
    idx = np.asarray(idx, dtype=np.int64)
    if idx.size == 0:
        return np.array([n_pixels], dtype=np.uint32)
    brk = np.flatnonzero(np.diff(idx) != 1) + 1
    run_start = idx[np.concatenate(([0], brk))]
    run_end = idx[np.concatenate((brk - 1, [idx.size - 1]))] + 1
    gaps = run_start - np.concatenate(([0], run_end[:-1]))
    out = np.empty(2 * len(run_start) + 1, dtype=np.int64)
    out[0:-1:2] = gaps
    out[1::2] = run_end - run_start
    out[-1] = n_pixels - run_end[-1]
    if out[-1] == 0:  # pycocotools never writes a trailing empty background run
        out = out[:-1]
    return out.astype(np.uint32)


def encode_label_image(labels: np.ndarray) -> tuple[np.ndarray, list[Counts]]:
    """Label image (0 = background) -> (label ids, counts per label), one pass.

    Used by adapters that predict label images (Cellpose, watershed): no dense
    per-instance masks are built.
    """
    h, w = labels.shape
    flat = np.asarray(labels).ravel(order="F")
    fg = np.flatnonzero(flat)
    if fg.size == 0:
        return np.zeros(0, dtype=np.int64), []
    lab = flat[fg]
    order = np.argsort(lab, kind="stable")
    lab_sorted, pix = lab[order], fg[order]
    ids, first = np.unique(lab_sorted, return_index=True)
    bounds = np.append(first, len(lab_sorted))
    return ids.astype(np.int64), [counts_from_indices(pix[a:b], h * w) for a, b in zip(bounds[:-1], bounds[1:])]


# ---------------------------------------------------------------------------
# COCO compressed strings (pycocotools' LEB128-like format), vectorised
# ---------------------------------------------------------------------------

def counts_to_string(counts: Counts) -> str:
    """COCO counts -> compressed string, byte-identical to pycocotools."""
    x = np.asarray(counts, dtype=np.int64).copy()
    x[3:] = x[3:] - np.asarray(counts, dtype=np.int64)[1:-2]
    out = []
    for v in x.tolist():
        more = True
        while more:
            c = v & 0x1F
            v >>= 5
            more = not ((c & 0x10) == 0 and v == 0 or (c & 0x10) != 0 and v == -1)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def string_to_counts(s: str | bytes) -> Counts:
    """Compressed COCO string -> counts, without pycocotools' dense decode."""
    if isinstance(s, str):
        s = s.encode("ascii")
    v = np.frombuffer(s, dtype=np.uint8).astype(np.int64) - 48
    if v.size == 0:
        return np.zeros(0, dtype=np.uint32)
    if v.min() < 0 or v.max() > 63 or (v[-1] & 0x20):
        raise ValueError("not a COCO compressed RLE string")
    end = (v & 0x20) == 0
    chain = np.diff(np.concatenate(([-1], np.flatnonzero(end))))
    if chain.max() > 12:  # 12 chars carry 60 bits: anything longer is not a run length
        raise ValueError("not a COCO compressed RLE string (a value is too long)")
    num_id = np.concatenate(([0], np.cumsum(end)[:-1]))
    starts = np.flatnonzero(np.concatenate(([True], end[:-1])))
    k = np.arange(v.size) - starts[num_id]
    vals = np.add.reduceat((v & 0x1F) << (5 * k), starts)
    nchars = np.diff(np.append(starts, v.size))
    neg = (v[end] & 0x10) != 0
    vals = np.where(neg, vals - (np.int64(1) << (5 * nchars)), vals)
    # deltas: x[m] += x[m-2] for m > 2, i.e. cumulative sums along each parity from index 1/2
    out = vals.copy()
    if out.size > 3:
        odd = out[1::2]
        odd[:] = np.cumsum(odd)
        even = out[2::2]
        even[:] = np.cumsum(even)
    if (out < 0).any():
        raise ValueError("COCO RLE string decodes to negative run lengths")
    if (out >= 2 ** 32).any():
        raise ValueError("COCO RLE string decodes to a run longer than any image")
    return out.astype(np.uint32)


def to_coco_rle(counts: Counts, height: int, width: int) -> dict:
    """The pycocotools/COCO-json form: {'size': [h, w], 'counts': str}."""
    return {"size": [int(height), int(width)], "counts": counts_to_string(counts)}


_NUMBER_TYPES = {int, float}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_polygons(seg: list, height: int, width: int) -> list[list[float]]:
    """COCO polygons ``[[x0, y0, x1, y1, ...], ...]``, validated: a list of lists of finite numbers,
    each of even length with at least 3 points, inside the image with a 1-pixel tolerance
    (coordinates run over pixel edges, 0..width and 0..height). ValueError says which is wrong."""
    if not seg:
        raise ValueError("empty polygon list")
    for j, p in enumerate(seg):
        if not isinstance(p, list):
            raise ValueError(f"polygon {j} is a {type(p).__name__}, not a list of coordinates "
                             "(segmentation must be a list of polygons)")
        if not set(map(type, p)) <= _NUMBER_TYPES:  # set(map(type)): C speed, LIVECell has millions
            bad = next(v for v in p if type(v) not in _NUMBER_TYPES)
            raise ValueError(f"polygon {j} has a coordinate that is not a number ({bad!r})")
        if len(p) % 2:
            raise ValueError(f"polygon {j} has an odd number of coordinates ({len(p)})")
        if len(p) < 6:
            raise ValueError(f"polygon {j} has {len(p) // 2} point(s), at least 3 are needed")
        if not all(map(math.isfinite, p)):
            raise ValueError(f"polygon {j} has a NaN or infinite coordinate")
        x, y = p[0::2], p[1::2]
        x0, x1, y0, y1 = min(x), max(x), min(y), max(y)
        if x0 < -1 or y0 < -1 or x1 > width + 1 or y1 > height + 1:
            raise ValueError(f"polygon {j} lies outside the {width}x{height} image (x {x0:g}..{x1:g}, "
                             f"y {y0:g}..{y1:g}; 1 pixel of tolerance)")
    return seg


def from_coco_segmentation(seg, height: int, width: int) -> Counts:
    """COCO 'segmentation' (polygons, compressed or uncompressed RLE) -> counts.

    Anything malformed raises ValueError saying what: polygons (see :func:`check_polygons`),
    an RLE whose size is not the image's, counts that are not run lengths, runs that do not
    cover the image exactly.
    """
    if isinstance(seg, dict):
        size = seg.get("size")
        if size is not None:
            if not (isinstance(size, list) and len(size) == 2 and all(_is_number(v) for v in size)):
                raise ValueError(f"RLE size {size!r} is not [height, width]")
            if list(size) != [height, width]:
                raise ValueError(f"RLE size {list(size)} does not match image {height}x{width}")
        if "counts" not in seg:
            raise ValueError("RLE has no 'counts'")
        c = seg["counts"]
        if isinstance(c, (str, bytes)):
            counts = string_to_counts(c)
        elif isinstance(c, np.ndarray) and c.dtype.kind in "iu" and c.ndim == 1:  # callers in code
            if c.size and (c.min() < 0 or c.max() > height * width):
                raise ValueError("run lengths must lie in 0..H*W")
            counts = c.astype(np.int64).astype(np.uint32)
        elif isinstance(c, list):
            if not set(map(type, c)) <= {int}:  # C speed: the shared Sartorius json has 350k counts
                bad = next(v for v in c if type(v) is not int)
                raise ValueError(f"RLE counts must be integers (found {bad!r})")
            if c and min(c) < 0:
                raise ValueError("negative run length")
            if c and max(c) > height * width:
                raise ValueError(f"run length {max(c)} is longer than the image ({height * width} pixels)")
            counts = np.asarray(c, dtype=np.int64).astype(np.uint32)
        else:
            raise ValueError(f"RLE counts is a {type(c).__name__}, not a string or a list of integers")
    elif isinstance(seg, list):
        from pycocotools import mask as mask_util

        polys = check_polygons(seg, height, width)
        rle = mask_util.merge(mask_util.frPyObjects(polys, height, width))
        counts = string_to_counts(rle["counts"])
    else:
        raise ValueError(f"unsupported segmentation type {type(seg).__name__}")
    total = int(np.asarray(counts, dtype=np.int64).sum())
    if total != height * width:
        raise ValueError(f"RLE covers {total} pixels, image has {height * width}")
    return counts


# ---------------------------------------------------------------------------
# Kaggle train.csv RLE: "start length start length ...", 1-based, row-major
# ---------------------------------------------------------------------------

def kaggle_decode_many(
    annotations: Sequence[str], height: int, width: int, where: Sequence[str] | None = None
) -> list[Counts]:
    return kaggle_decode_runs(annotations, height, width, where)[0]


def kaggle_decode_runs(
    annotations: Sequence[str], height: int, width: int, where: Sequence[str] | None = None
) -> tuple[list[Counts], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Kaggle RLE strings of one image -> COCO counts, all masks in one pass.

    Validates every rule the competition's format implies and raises DataError
    naming the offending row (``where[i]``): odd number of values, non-integers,
    zero/negative lengths, runs outside the image, unsorted or overlapping runs,
    empty annotations.
    """
    n_pix = height * width
    if where is None:
        where = [f"mask {i}" for i in range(len(annotations))]
    parts = [a if isinstance(a, str) else "" for a in annotations]
    # one C-speed parse of all masks, a -1 token between them (never valid in a run list) marks
    # where each mask's values end; anything unusual takes the exact slow path below
    with warnings.catch_warnings(record=True) as stopped:  # numpy warns when it stops at a bad token
        warnings.simplefilter("always", DeprecationWarning)
        vals = np.fromstring(" -1 ".join(parts), dtype=np.int64, sep=" ")
    sep = np.flatnonzero(vals == -1)
    if not stopped and len(sep) == len(parts) - 1:
        n_vals = np.diff(np.concatenate(([-1], sep, [vals.size]))) - 1
        vals = np.delete(vals, sep) if sep.size else vals
    else:
        n_vals = None
    if n_vals is None or (n_vals == 0).any():
        vals, n_vals = _parse_slowly(parts, where)
    odd = np.flatnonzero(n_vals % 2)
    if odd.size:
        raise DataError(where[odd[0]], f"RLE has an odd number of values ({n_vals[odd[0]]})")
    starts, lengths = vals[0::2] - 1, vals[1::2]
    run_mask = np.repeat(np.arange(len(parts)), n_vals // 2)

    def fail(bad_runs: np.ndarray, problem: str):
        r = int(bad_runs[0])
        raise DataError(where[run_mask[r]], f"{problem} (run {r - int(np.searchsorted(run_mask, run_mask[r]))}: "
                                             f"start {starts[r] + 1}, length {lengths[r]})")

    if (b := np.flatnonzero(lengths <= 0)).size:
        fail(b, "run length must be positive")
    if (b := np.flatnonzero((starts < 0) | (starts >= n_pix) | (lengths > n_pix) | (starts + lengths > n_pix))).size:
        fail(b, f"run outside the {height}x{width} image")
    same = run_mask[1:] == run_mask[:-1]
    if (b := np.flatnonzero(same & (starts[1:] < starts[:-1] + lengths[:-1]))).size:
        prev_end = starts[b[0]] + lengths[b[0]]
        problem = "runs not sorted" if starts[b[0] + 1] < starts[b[0]] else "runs overlap"
        fail(b + 1, f"{problem} (previous run ends at {prev_end})")

    # row-major runs -> column-major runs. A run that wraps past the end of a row is cut at
    # the row ends first (rare), so that every pixel of a run shares its row y and the key
    # mask * n_pix + x * height + y grows by `height` along the run: the keys come from one
    # repeat and one arange, with no per-pixel division.
    y0, x0 = np.divmod(starts, width)
    if (x0 + lengths > width).any():
        starts, lengths, run_mask = _cut_at_row_ends(starts, lengths, run_mask, width)
        y0, x0 = np.divmod(starts, width)
    total = int(lengths.sum())
    first = np.cumsum(lengths) - lengths
    base = run_mask * n_pix + x0 * height + y0 - first * height
    key = np.repeat(base, lengths) + np.arange(total, dtype=np.int64) * height
    # masks stay in order (their keys lie in [m * n_pix, (m + 1) * n_pix)), so a per-mask sort is
    # a sort of the whole array, and the mask of the k-th sorted key is that of the k-th pixel.
    # The keys are many short increasing runs (one per row run): the stable sort merges them
    # (1.6x faster than the default introsort on the 56-image set here, same result)
    key.sort(kind="stable")
    mask_of_key = np.repeat(run_mask, lengths)
    # a run ends where keys stop being consecutive or where a mask ends (mask m's last pixel and
    # mask m+1's first can have consecutive keys)
    px_per_mask = np.bincount(run_mask, weights=lengths, minlength=len(parts)).astype(np.int64)
    mask_end = np.cumsum(px_per_mask)[:-1]
    cut = np.diff(key) != 1
    cut[mask_end[(mask_end > 0) & (mask_end < total)] - 1] = True
    brk = np.flatnonzero(cut) + 1
    head = np.concatenate(([0], brk))
    run_start = key[head]
    run_end = key[np.concatenate((brk - 1, [key.size - 1]))] + 1
    owner = mask_of_key[head]
    starts, lengths = run_start - owner * n_pix, run_end - run_start
    return split_counts(starts, lengths, owner, len(parts), n_pix), (starts, lengths, owner)


def _cut_at_row_ends(starts: np.ndarray, lengths: np.ndarray, run_mask: np.ndarray, width: int):
    """Runs (row-major, 0-based) cut so that none crosses the end of a row."""
    first_row, last_row = starts // width, (starts + lengths - 1) // width
    pieces = last_row - first_row + 1
    idx = np.repeat(np.arange(starts.size), pieces)
    k = np.arange(idx.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)   # piece number in its run
    row = first_row[idx] + k
    s = np.maximum(starts[idx], row * width)
    e = np.minimum(starts[idx] + lengths[idx], (row + 1) * width)
    return s, e - s, run_mask[idx]


_INT_TOKEN = re.compile(r"-?[0-9]{1,15}")  # 15 digits: far beyond any image, far inside int64


def _parse_slowly(parts: list[str], where) -> tuple[np.ndarray, np.ndarray]:
    """Token by token, to name the row of an empty annotation or a value that is not an integer."""
    n_vals = np.empty(len(parts), dtype=np.int64)
    out = []
    for i, a in enumerate(parts):
        toks = a.split()
        if not toks:
            raise DataError(where[i], "empty annotation")
        bad = next((t for t in toks if not _INT_TOKEN.fullmatch(t)), None)
        if bad is not None:
            raise DataError(where[i], f"annotation has a value that is not an integer ({bad[:20]!r})")
        n_vals[i] = len(toks)
        out.extend(toks)
    return np.array(out, dtype=np.int64), n_vals


def kaggle_decode(annotation: str, height: int, width: int, where: str = "annotation") -> Counts:
    return kaggle_decode_many([annotation], height, width, [where])[0]


def kaggle_encode(counts: Counts, height: int, width: int) -> str:
    """COCO counts -> Kaggle RLE string (1-based starts, row-major, sorted)."""
    cm = pixel_indices(counts)
    if cm.size == 0:
        return ""
    x, y = np.divmod(cm, height)
    rm = np.sort(y * width + x)
    brk = np.flatnonzero(np.diff(rm) != 1) + 1
    s = rm[np.concatenate(([0], brk))]
    e = rm[np.concatenate((brk - 1, [rm.size - 1]))] + 1
    out = np.empty(2 * s.size, dtype=np.int64)
    out[0::2], out[1::2] = s + 1, e - s
    return " ".join(map(str, out.tolist()))


def kaggle_encode_mask(mask: np.ndarray) -> str:
    """Dense H x W mask -> Kaggle RLE string."""
    flat = np.asarray(mask, dtype=bool).ravel()
    pad = np.concatenate(([False], flat, [False]))
    edges = np.flatnonzero(pad[1:] != pad[:-1])
    s, e = edges[0::2], edges[1::2]
    out = np.empty(2 * s.size, dtype=np.int64)
    out[0::2], out[1::2] = s + 1, e - s
    return " ".join(map(str, out.tolist()))


def iter_pixels(all_counts: Iterable[Counts]):
    for c in all_counts:
        yield pixel_indices(c)


def encode_mask_at(crop: np.ndarray, y0: int, x0: int, height: int, width: int) -> Counts:
    """Counts of a full-image mask that is zero outside ``crop`` placed at (y0, x0).

    Mask R-CNN masks live inside their boxes: encoding the box crop instead of the
    full image is ~100x less work for a 20 px cell on a 704x520 image.
    """
    ys, xs = np.nonzero(np.asarray(crop, dtype=bool).T)  # transposed: column-major order
    idx = (xs.astype(np.int64) + y0) + (ys.astype(np.int64) + x0) * height
    return counts_from_indices(idx, height * width)
