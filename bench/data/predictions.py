"""Prediction files: cellbench's own (JSON lines), Kaggle submission csv, COCO results json.

cellbench's file is one JSON object per line (header first) so a run can append image
by image and a crash loses at most one line; masks are compressed COCO RLE strings.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import zlib
from pathlib import Path

import numpy as np

from bench.data import rle
from bench.data.errors import DataError
from bench.data.sample import Instances
from bench.util import atomic_write_bytes

FORMAT = "cellbench-predictions"


def _strings(counts: list[np.ndarray], h: int, w: int) -> list[str]:
    if not counts:
        return []
    from pycocotools import mask as mask_util  # C encoder; our pure-numpy one is the reference

    objs = mask_util.frPyObjects([{"size": [h, w], "counts": c.astype(np.int64).tolist()} for c in counts], h, w)
    return [o["counts"].decode("ascii") for o in objs]


def encode_record(image_id: str, inst: Instances) -> dict:
    return {"image_id": image_id, "height": inst.height, "width": inst.width,
            "counts": _strings(inst.counts, inst.height, inst.width),
            "scores": [] if inst.scores is None else [round(float(s), 6) for s in inst.scores],
            "classes": inst.classes.astype(int).tolist()}


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def decode_record(rec: dict, where: str) -> tuple[str, Instances]:
    """One line of a cellbench predictions file; every field checked, DataError naming ``where``."""
    def bad(problem: str):
        raise DataError(where, f"bad prediction record: {problem}")

    if not isinstance(rec, dict):
        bad(f"a {type(rec).__name__}, not an object")
    for f in ("image_id", "height", "width", "counts"):
        if f not in rec:
            bad(f"no '{f}'")
    iid, h, w, strings = rec["image_id"], rec["height"], rec["width"], rec["counts"]
    if not (isinstance(iid, str) or _int(iid)) or str(iid).strip() == "":
        bad(f"image_id {iid!r} is not a non-empty string or an integer")
    if not (_int(h) and _int(w) and h > 0 and w > 0):
        bad(f"height/width {h!r}x{w!r} are not positive integers")
    if not isinstance(strings, list) or not set(map(type, strings)) <= {str}:
        bad("'counts' is not a list of COCO RLE strings")
    n = len(strings)
    scores, classes = rec.get("scores"), rec.get("classes")
    if scores is None or (scores == [] and n):
        scores = [1.0] * n
    if classes is None or (classes == [] and n):
        classes = [-1] * n
    if not isinstance(scores, list) or not set(map(type, scores)) <= {int, float}:
        bad("'scores' is not a list of numbers")
    if not isinstance(classes, list) or not set(map(type, classes)) <= {int} or (classes and min(classes) < -1):
        bad("'classes' is not a list of class indices (integers >= -1)")
    if len(scores) != n or len(classes) != n:
        bad(f"{n} masks but {len(scores)} scores and {len(classes)} classes")
    if not all(map(math.isfinite, scores)):
        bad("a score is NaN or infinite")
    counts = []
    for k, c in enumerate(strings):
        try:
            cc = rle.string_to_counts(c)
        except ValueError as e:
            bad(f"mask {k}: {e}")
        if int(cc.astype(np.int64).sum()) != h * w:
            bad(f"mask {k} covers {int(cc.astype(np.int64).sum())} pixels, image has {h * w}")
        counts.append(cc)
    return str(iid), Instances(h, w, counts, np.asarray(classes, dtype=np.int64), np.asarray(scores, dtype=float))


def write_predictions(path: str | Path, preds: dict[str, Instances], classes: list[str], meta: dict | None = None) -> None:
    """Atomic: the file is complete or absent."""
    lines = [json.dumps({"format": FORMAT, "version": 1, "classes": classes, **(meta or {})})]
    lines += [json.dumps(encode_record(i, p)) for i, p in preds.items()]
    data = ("\n".join(lines) + "\n").encode()
    if str(path).endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    atomic_write_bytes(path, data)


def _read_text(path: Path, what: str) -> str:
    """A text file, gzip-compressed if it ends in .gz; a UTF-8 BOM is dropped. DataError naming
    the file for a missing, truncated or corrupt file (gzip's EOFError used to end in 'Aborted.')."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        return raw.decode("utf-8-sig")
    except IsADirectoryError:
        raise DataError(path, f"{what} is a folder, not a file") from None
    except FileNotFoundError:
        raise DataError(path, f"{what} not found") from None
    except EOFError:
        raise DataError(path, f"{what} is truncated (the gzip stream ends early)") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise DataError(path, f"{what} is not a valid gzip file ({e})") from None
    except UnicodeDecodeError as e:
        raise DataError(path, f"{what} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(path, f"cannot read {what} ({e.strerror or e})") from None


def read_predictions(path: str | Path) -> tuple[dict[str, Instances], dict]:
    path = Path(path)
    return _parse_predictions(path, _read_text(path, "predictions file"))


def _parse_predictions(path: Path, text: str) -> tuple[dict[str, Instances], dict]:
    lines = text.splitlines()
    if not lines:
        raise DataError(path, "empty predictions file")
    try:
        header = json.loads(lines[0])
    except (json.JSONDecodeError, RecursionError):
        raise DataError(f"{path}:1", "not a cellbench predictions file (header is not JSON)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        fmt = header.get("format") if isinstance(header, dict) else header
        raise DataError(f"{path}:1", f"not a cellbench predictions file (format {fmt!r})")
    classes = header.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise DataError(f"{path}:1", f"'classes' {classes!r} is not a list of names")
    out: dict[str, Instances] = {}
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise DataError(f"{path}:{n}", f"not JSON ({e})") from None
        iid, inst = decode_record(rec, f"{path}:{n}")
        if classes is not None and len(inst) and inst.classes.max() >= len(classes):
            raise DataError(f"{path}:{n}", f"class index {int(inst.classes.max())} but the header lists "
                                           f"{len(classes)} classes")
        if iid in out:
            raise DataError(f"{path}:{n}", f"duplicate image id {iid}")
        out[iid] = inst
    return out, header


def write_submission(path: str | Path, preds: dict[str, Instances], classes: list[str] | None = None,
                     with_scores: bool = False) -> str:
    """Kaggle file: ``id,predicted`` one row per instance (1-based row-major runs), an empty
    ``predicted`` row for an image without instances. Returns the text written."""
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "predicted"] + (["score", "cell_type"] if with_scores else []))
    for iid in sorted(preds):
        p = preds[iid]
        if len(p) == 0:
            w.writerow([iid, ""] + (["", ""] if with_scores else []))
            continue
        for k, c in enumerate(p.counts):
            row = [iid, rle.kaggle_encode(c, p.height, p.width)]
            if with_scores:
                ct = classes[p.classes[k]] if classes and p.classes[k] >= 0 else ""
                row += [f"{(p.scores[k] if p.scores is not None else 1.0):.6f}", ct]
            w.writerow(row)
    text = buf.getvalue()
    atomic_write_bytes(path, text.encode())
    return text


def read_submission(path: str | Path, sizes: dict[str, tuple[int, int]], classes: list[str] | None = None
                    ) -> dict[str, Instances]:
    """Kaggle submission csv (``id,predicted`` [,``score``, ``cell_type``]). Sizes come from the
    ground truth (the competition's images are all 520x704); unknown ids are an error."""
    path = Path(path)
    try:
        return _read_submission(path, sizes, classes)
    except UnicodeDecodeError as e:
        raise DataError(path, f"not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise DataError(path, f"not a readable csv ({e})") from None
    except IsADirectoryError:
        raise DataError(path, "is a folder, not a csv file") from None
    except FileNotFoundError:
        raise DataError(path, "submission csv not found") from None


def _read_submission(path: Path, sizes: dict[str, tuple[int, int]], classes: list[str] | None) -> dict[str, Instances]:
    from bench.data.io import RowNames

    rows: dict[str, list] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if "id" not in header or "predicted" not in header:
            raise DataError(path, f"not a Kaggle submission: header {header} lacks id,predicted")
        i_id, i_pred = header.index("id"), header.index("predicted")
        i_sc = header.index("score") if "score" in header else None
        i_ct = header.index("cell_type") if "cell_type" in header else None
        n_fields = len(header)
        for n, row in enumerate(reader, start=2):
            if len(row) != n_fields:
                raise DataError(f"{path}:{n}", f"{len(row)} fields, header has {n_fields}")
            iid = row[i_id]
            r = rows.get(iid)
            if r is None:
                iid = iid.strip()
                if iid not in sizes:
                    raise DataError(f"{path}:{n}", f"image id {iid!r} is not in the ground truth")
                r = rows.setdefault(iid, ([], [], [], []))
            if row[i_pred].strip():
                r[0].append(row[i_pred])
                r[1].append(n)
                if i_sc is not None:
                    r[2].append(row[i_sc])
                if i_ct is not None:
                    r[3].append(row[i_ct])
    out = {}
    cls_index = {c: i for i, c in enumerate(classes or [])}
    for iid, (anns, lines, sc, ct) in rows.items():
        h, w = sizes[iid]
        where = RowNames(path, lines)
        counts, runs = rle.kaggle_decode_runs(anns, h, w, where) if anns else ([], None)
        bad = next((k for k, x in enumerate(sc) if x.strip() != "" and not _is_float(x)), None)
        if bad is not None:
            raise DataError(where[bad], f"score {sc[bad]!r} is not a finite number")
        scores = np.array([float(x) if x.strip() != "" else 1.0 for x in sc]) if sc else np.ones(len(anns))
        unknown = next((k for k, x in enumerate(ct) if x.strip() and x.strip() not in cls_index), None)
        if unknown is not None:
            raise DataError(where[unknown], f"unknown cell_type {ct[unknown]!r} (known: {list(classes or [])})")
        cl = np.array([cls_index.get(x.strip(), -1) for x in ct], dtype=np.int64) if ct else np.full(len(anns), -1)
        out[iid] = Instances(h, w, counts, cl, scores, _runs=runs)
    return out


def _is_float(x: str) -> bool:
    try:
        return bool(np.isfinite(float(x)))
    except ValueError:
        return False


def read_coco_results(path: str | Path, id_map: dict, sizes: dict[str, tuple[int, int]]) -> dict[str, Instances]:
    """COCO results json (list of {image_id, category_id, segmentation, score}).

    ``id_map`` maps the json's image_id (COCO int or string) to cellbench ids. Every entry is
    checked: an object with a known image_id, a valid segmentation, a finite score and an
    integer category_id, else DataError naming the file and the entry."""
    path = Path(path)
    return _parse_coco_results(path, _read_text(path, "COCO results file"), id_map, sizes)


def _parse_coco_results(path: Path, text: str, id_map: dict, sizes: dict[str, tuple[int, int]]
                        ) -> dict[str, Instances]:
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise DataError(path, f"cannot read COCO results (not valid JSON: {e})") from None
    if not isinstance(data, list):
        raise DataError(path, "COCO results must be a JSON list")
    acc: dict[str, list] = {}
    for k, d in enumerate(data):
        where = f"{path}: result #{k}"
        if not isinstance(d, dict):
            raise DataError(where, f"is a {type(d).__name__}, not an object")
        raw_id = d.get("image_id")
        if not ((isinstance(raw_id, (int, str)) and not isinstance(raw_id, bool))):
            raise DataError(where, f"image_id {raw_id!r} is not an integer or string")
        iid = id_map.get(raw_id, id_map.get(str(raw_id)))
        if iid is None:
            raise DataError(where, f"image_id {raw_id!r} is not in the ground truth")
        score, cat = d.get("score", 1.0), d.get("category_id", 0)
        if not _num(score) or not np.isfinite(score):
            raise DataError(where, f"score {score!r} is not a finite number")
        if not _int(cat):
            raise DataError(where, f"category_id {cat!r} is not an integer")
        if "segmentation" not in d:
            raise DataError(where, "has no 'segmentation'")
        h, w = sizes[iid]
        try:
            c = rle.from_coco_segmentation(d["segmentation"], h, w)
        except (ValueError, TypeError) as e:
            raise DataError(where, str(e)) from None
        acc.setdefault(iid, []).append((c, float(score), int(cat) - 1))
    return {i: Instances(*sizes[i], [x[0] for x in v], np.array([x[2] for x in v]), np.array([x[1] for x in v]))
            for i, v in acc.items()}


# ---------------------------------------------------------------------------
# matching prediction ids to ground-truth images: by id, else by file name, else by file stem
# ---------------------------------------------------------------------------

MATCH_KEYS = ("image id", "file name", "file stem")


def gt_aliases(samples) -> dict[str, dict[str, str]]:
    """For each key of :data:`MATCH_KEYS`: {key value: ground-truth image id}. A file name or
    stem shared by two images is ambiguous and left out (it cannot name one image)."""
    out: dict[str, dict[str, str]] = {k: {} for k in MATCH_KEYS}
    ambiguous: dict[str, set] = {k: set() for k in MATCH_KEYS}
    for s in samples:
        fname = s.meta.get("file_name") or (s.path.name if s.path is not None else None)
        names = {"image id": s.image_id}
        if fname:
            names["file name"] = Path(str(fname)).name
            names["file stem"] = Path(str(fname)).stem
        for k, v in names.items():
            if v in out[k] and out[k][v] != s.image_id:
                ambiguous[k].add(v)
            out[k][v] = s.image_id
    for k in MATCH_KEYS:
        for v in ambiguous[k]:
            del out[k][v]
    return out


def match_ids(pred_ids, aliases: dict[str, dict[str, str]]) -> tuple[str, dict[str, str]]:
    """The first key of :data:`MATCH_KEYS` under which every prediction id names a ground-truth
    image, and the mapping {prediction id: ground-truth id}. One key for the whole file (never a
    mix), so that an id is never matched by accident; DataError if no key matches them all."""
    pred_ids = list(pred_ids)
    for key in MATCH_KEYS:
        table = aliases[key]
        if all(str(i) in table for i in pred_ids):
            return key, {i: table[str(i)] for i in pred_ids}
    unknown = sorted(str(i) for i in pred_ids if str(i) not in aliases["image id"])
    raise DataError("predictions", f"{len(unknown)} image id(s) not in the ground truth, e.g. {unknown[:3]} "
                                   "(matched neither by image id nor by file name or file stem)")


def _is_unknown_id(e: DataError) -> bool:
    return "not in the ground truth" in e.problem


def load_predictions_for(path: str | Path, samples, classes: list[str]) -> tuple[dict[str, Instances], str]:
    """A prediction file (any format of :func:`load_any_predictions`) keyed by the ground truth's
    image ids, and the key its ids were matched by: ``image id``, else ``file name``, else
    ``file stem`` (``bench predict --images DATASET/images`` keys by stem; a COCO ground truth by
    its integer ids)."""
    path = Path(path)
    samples = list(samples)
    aliases = gt_aliases(samples)
    sizes = {s.image_id: (s.height, s.width) for s in samples}
    coco_ids = {s.meta.get("coco_id", s.image_id): s.image_id for s in samples}
    try:
        preds = load_any_predictions(path, sizes, classes, coco_ids)
    except DataError as e:
        if not _is_unknown_id(e):
            raise
        # a Kaggle csv / COCO results file checks ids while reading: read again by file name/stem
        for key in MATCH_KEYS[1:]:
            table = aliases[key]
            try:
                raw = load_any_predictions(path, {a: sizes[g] for a, g in table.items()}, classes,
                                           {a: a for a in table})
            except DataError as e2:
                if _is_unknown_id(e2):
                    continue
                raise
            return {table[a]: p for a, p in raw.items()}, key
        raise
    key, mapping = match_ids(preds, aliases)
    return {mapping[i]: p for i, p in preds.items()}, key


def load_any_predictions(path: str | Path, sizes: dict[str, tuple[int, int]], classes: list[str],
                         coco_id_map: dict | None = None) -> dict[str, Instances]:
    """By content: cellbench file, Kaggle csv, or COCO results json."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "prediction file not found")
    if path.suffix == ".csv":
        return read_submission(path, sizes, classes)
    text = _read_text(path, "prediction file")
    if text.lstrip().startswith("["):
        return _parse_coco_results(path, text, coco_id_map or {i: i for i in sizes}, sizes)
    preds, _ = _parse_predictions(path, text)
    return preds
