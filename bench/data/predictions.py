"""Prediction files: cellbench's own (JSON lines), Kaggle submission csv, COCO results json.

cellbench's file is one JSON object per line (header first) so a run can append image
by image and a crash loses at most one line; masks are compressed COCO RLE strings.
"""

from __future__ import annotations

import csv
import gzip
import json
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


def decode_record(rec: dict, where: str) -> tuple[str, Instances]:
    try:
        h, w = int(rec["height"]), int(rec["width"])
        counts = [rle.string_to_counts(c) for c in rec["counts"]]
        for k, c in enumerate(counts):
            if int(c.astype(np.int64).sum()) != h * w:
                raise ValueError(f"mask {k} covers {int(c.sum())} pixels, image has {h * w}")
        scores = np.asarray(rec.get("scores") or np.ones(len(counts)), dtype=float)
        return str(rec["image_id"]), Instances(h, w, counts, np.asarray(rec.get("classes") or [-1] * len(counts)), scores)
    except (KeyError, ValueError, TypeError) as e:
        raise DataError(where, f"bad prediction record ({type(e).__name__}: {e})") from None


def write_predictions(path: str | Path, preds: dict[str, Instances], classes: list[str], meta: dict | None = None) -> None:
    """Atomic: the file is complete or absent."""
    lines = [json.dumps({"format": FORMAT, "version": 1, "classes": classes, **(meta or {})})]
    lines += [json.dumps(encode_record(i, p)) for i, p in preds.items()]
    data = ("\n".join(lines) + "\n").encode()
    if str(path).endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    atomic_write_bytes(path, data)


def read_predictions(path: str | Path) -> tuple[dict[str, Instances], dict]:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise DataError(path, f"cannot read predictions ({e})") from None
    if not lines:
        raise DataError(path, "empty predictions file")
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError:
        raise DataError(f"{path}:1", "not a cellbench predictions file (header is not JSON)") from None
    if header.get("format") != FORMAT:
        raise DataError(f"{path}:1", f"not a cellbench predictions file (format {header.get('format')!r})")
    out: dict[str, Instances] = {}
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}", f"not JSON ({e})") from None
        iid, inst = decode_record(rec, f"{path}:{n}")
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
    from bench.data.io import RowNames

    path = Path(path)
    rows: dict[str, list] = {}
    with open(path, newline="") as f:
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
        try:
            scores = np.array([float(x) if x != "" else 1.0 for x in sc]) if sc else np.ones(len(anns))
        except ValueError:
            bad = next(k for k, x in enumerate(sc) if not _is_float(x))
            raise DataError(where[bad], f"score {sc[bad]!r} is not a number") from None
        cl = np.array([cls_index.get(x.strip(), -1) for x in ct], dtype=np.int64) if ct else np.full(len(anns), -1)
        out[iid] = Instances(h, w, counts, cl, scores, _runs=runs)
    return out


def _is_float(x: str) -> bool:
    try:
        float(x)
        return True
    except ValueError:
        return False


def read_coco_results(path: str | Path, id_map: dict, sizes: dict[str, tuple[int, int]]) -> dict[str, Instances]:
    """COCO results json (list of {image_id, category_id, segmentation, score}).

    ``id_map`` maps the json's image_id (COCO int or string) to cellbench ids."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(path, f"cannot read COCO results ({e})") from None
    if not isinstance(data, list):
        raise DataError(path, "COCO results must be a JSON list")
    acc: dict[str, list] = {}
    for k, d in enumerate(data):
        where = f"{path}: result #{k}"
        iid = id_map.get(d.get("image_id"), id_map.get(str(d.get("image_id"))))
        if iid is None:
            raise DataError(where, f"image_id {d.get('image_id')!r} is not in the ground truth")
        h, w = sizes[iid]
        try:
            c = rle.from_coco_segmentation(d["segmentation"], h, w)
        except (KeyError, ValueError) as e:
            raise DataError(where, str(e)) from None
        acc.setdefault(iid, []).append((c, float(d.get("score", 1.0)), int(d.get("category_id", 0)) - 1))
    return {i: Instances(*sizes[i], [x[0] for x in v], np.array([x[2] for x in v]), np.array([x[1] for x in v]))
            for i, v in acc.items()}


def load_any_predictions(path: str | Path, sizes: dict[str, tuple[int, int]], classes: list[str],
                         coco_id_map: dict | None = None) -> dict[str, Instances]:
    """By content: cellbench file, Kaggle csv, or COCO results json."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "prediction file not found")
    if path.suffix == ".csv":
        return read_submission(path, sizes, classes)
    head = (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)).read(200).lstrip()
    if head.startswith("["):
        return read_coco_results(path, coco_id_map or {i: i for i in sizes}, sizes)
    preds, _ = read_predictions(path)
    return preds
