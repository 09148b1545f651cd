"""Dataset readers: Sartorius/Kaggle csv, COCO/LIVECell json, Cellpose-style label folders,
DSB2018's native layout (:mod:`bench.data.dsb`).

Every reader returns a :class:`~bench.data.sample.Dataset` and raises
:class:`~bench.data.errors.DataError` naming the file (and row) of anything wrong:
nothing is silently dropped. Images are read lazily; ``check_dataset`` reads them all.
"""

from __future__ import annotations

import csv
import json
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Iterable

import numpy as np

from bench.data import rle
from bench.data.errors import DataError
from bench.data.sample import Dataset, Instances, Sample

SARTORIUS_CLASSES = ["shsy5y", "astro", "cort"]
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
SARTORIUS_REQUIRED = ("id", "annotation", "width", "height", "cell_type")
SARTORIUS_OPTIONAL = ("plate_time", "sample_date", "sample_id", "elapsed_timedelta")


def _read_pixels(path: Path, keep_palette: bool = False) -> np.ndarray:
    """The file's pixels as stored (any dtype), DataError naming the file if it cannot be decoded."""
    if not path.is_file():
        raise DataError(path, "image file is missing" if not path.exists() else "not a file")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            img = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                if im.mode in ("LA", "PA", "CMYK", "YCbCr", "HSV") or (im.mode == "P" and not keep_palette):
                    im = im.convert("RGBA" if "A" in im.mode else "RGB")
                img = np.asarray(im)
    except DataError:
        raise
    except Exception as e:  # PIL/tifffile raise many types for corrupt files
        raise DataError(path, f"cannot read image ({type(e).__name__}: {e})") from None
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[-1] == 4:
        img = _drop_alpha(path, img)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] != 3) or 0 in img.shape:
        raise DataError(path, f"unsupported image shape {img.shape} (want H x W or H x W x 3)")
    return img


def _drop_alpha(path: Path, img: np.ndarray) -> np.ndarray:
    """The colour channels of an RGBA image. An opaque alpha (DSB2018's PNGs) goes silently; any
    other alpha is dropped with a warning naming the file (the colours are used as stored, not
    composited); colour channels that are blank while the alpha varies are an error, since the
    picture is then in the alpha channel and the models would see a flat image."""
    rgb, alpha = img[..., :3], img[..., 3]
    full = np.iinfo(img.dtype).max if np.issubdtype(img.dtype, np.integer) else 1.0
    lo, hi = alpha.min(), alpha.max()
    if lo == hi == full:
        return rgb
    if lo != hi and rgb.min() == rgb.max():
        raise DataError(path, f"RGBA image with blank colour channels (all {rgb.flat[0]}) and a varying alpha "
                              f"channel ({lo}..{hi}): the picture is in the alpha channel, which cellbench does "
                              "not read; save it as a grayscale image")
    opaque = float((alpha == full).mean())
    warnings.warn(f"{path}: RGBA image with an unusual alpha channel ({lo}..{hi}, {100 * (1 - opaque):.1f}% of "
                  "pixels not fully opaque): the alpha is dropped and the colour channels are used as stored",
                  stacklevel=3)
    return rgb


def _check_size(path: Path, img: np.ndarray, expect_hw: tuple[int, int] | None) -> None:
    if expect_hw is not None and tuple(img.shape[:2]) != tuple(expect_hw):
        raise DataError(path, f"image is {img.shape[1]}x{img.shape[0]} (WxH) but its annotations say "
                              f"{expect_hw[1]}x{expect_hw[0]}")


def read_image(path: str | Path, expect_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Read a PNG/TIF/JPG as an H x W (grayscale) or H x W x 3 array, uint8 or uint16.

    A float image (a microscope TIFF) is rescaled to 0-255: right for intensities, never for
    labels (see :func:`read_label_image`).
    """
    path = Path(path)
    img = _read_pixels(path)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.dtype not in (np.uint8, np.uint16):
        if np.issubdtype(img.dtype, np.floating):
            if not np.isfinite(img).all():
                raise DataError(path, "image has NaN or infinite pixel values")
            lo, hi = float(img.min()), float(img.max())
            img = ((img - lo) / (hi - lo + 1e-12) * 255).astype(np.uint8)
        elif np.issubdtype(img.dtype, np.integer):
            img = np.clip(img, 0, 65535).astype(np.uint16)
        else:
            raise DataError(path, f"unsupported pixel type {img.dtype}")
    _check_size(path, img, expect_hw)
    return img


def read_label_image(path: str | Path, expect_hw: tuple[int, int] | None = None) -> np.ndarray:
    """A label image (0 = background, 1..N one per cell) as int64, never rescaled.

    Labels must be integers: a float image whose values are all whole numbers (a float32 TIFF
    written by some tools) is converted with a warning; anything else (fractions, NaN,
    negative labels, colour) is refused naming the file. Rescaling would merge hundreds of
    labels into 255 and score the merged cells without complaint.
    """
    path = Path(path)
    img = _read_pixels(path, keep_palette=True)
    if img.ndim != 2:
        raise DataError(path, f"label image must be single-channel (it has shape {img.shape})")
    if img.dtype == bool:
        img = img.astype(np.int64)
    elif np.issubdtype(img.dtype, np.floating):
        if not np.isfinite(img).all():
            raise DataError(path, f"label image ({img.dtype}) has NaN or infinite values")
        frac = img != np.round(img)
        if frac.any():
            y, x = np.argwhere(frac)[0]
            raise DataError(path, f"label image is {img.dtype} with non-integer values (e.g. {img[y, x]!r} at "
                                  f"x={x}, y={y}): labels must be integers")
        if img.max() > 2 ** 53:
            raise DataError(path, f"label image ({img.dtype}) has labels too large to be exact ({img.max():g})")
        warnings.warn(f"{path}: {img.dtype} label image with whole-number values converted to integer labels",
                      stacklevel=2)
        img = img.astype(np.int64)
    elif np.issubdtype(img.dtype, np.integer):
        if img.dtype == np.uint64 and img.max() > np.iinfo(np.int64).max:
            raise DataError(path, "label image has labels too large for int64")
        img = img.astype(np.int64)
    else:
        raise DataError(path, f"unsupported label pixel type {img.dtype}")
    if img.min() < 0:
        raise DataError(path, f"label image has negative labels (min {img.min()})")
    _check_size(path, img, expect_hw)
    return img


def find_image(folder: Path, stem: str) -> Path | None:
    for suf in IMAGE_SUFFIXES:
        p = folder / f"{stem}{suf}"
        if p.is_file():
            return p
    return None


# ---------------------------------------------------------------------------
# Sartorius / Kaggle
# ---------------------------------------------------------------------------

class RowNames:
    """``file:line`` names for error messages, made only when an error needs one."""

    def __init__(self, path, lines: list[int]):
        self.path, self.lines = path, lines

    def __getitem__(self, i: int) -> str:
        return f"{self.path}:{self.lines[i]}"

    def __len__(self) -> int:
        return len(self.lines)


def _read_sartorius_rows(csv_path: Path, groups: dict, cls_index: dict, classes: list[str]) -> None:
    """Group the csv's rows by image id (the header may carry a UTF-8 BOM; CRLF or LF lines)."""
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)  # plain reader: DictReader's per-row dicts were a third of read time
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in ("id", "annotation", "width", "height") if c not in header]
        if missing:
            raise DataError(csv_path, f"missing column(s) {missing}; header is {header}")
        col = {c: i for i, c in enumerate(header)}
        i_id, i_ann, i_w, i_h = col["id"], col["annotation"], col["width"], col["height"]
        i_ct = col.get("cell_type")
        optional = [(k, col[k]) for k in SARTORIUS_OPTIONAL if k in col]
        for line_no, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise DataError(f"{csv_path}:{line_no}", f"{len(row)} fields, header has {len(header)}")
            iid = row[i_id].strip()
            if not iid:
                raise DataError(f"{csv_path}:{line_no}", "empty id")
            ct = row[i_ct].strip() if i_ct is not None else ""
            g = groups.get(iid)
            if g is not None and g["wh_text"] == (row[i_w], row[i_h]) and ct == g["ct"]:
                g["ann"].append(row[i_ann])  # the common case: another mask of a known image
                g["lines"].append(line_no)
                continue
            try:
                w, h = int(row[i_w]), int(row[i_h])
            except ValueError:
                raise DataError(f"{csv_path}:{line_no}",
                                f"width/height not integers ({row[i_w]!r}, {row[i_h]!r})") from None
            if g is None:
                where = f"{csv_path}:{line_no}"
                if w <= 0 or h <= 0:
                    raise DataError(where, f"width/height must be positive ({w}x{h})")
                if i_ct is not None and ct not in cls_index:
                    raise DataError(where, f"unknown cell_type {ct!r} (known: {classes})")
                g = groups[iid] = {"w": w, "h": h, "wh_text": (row[i_w], row[i_h]), "ct": ct, "ann": [],
                                   "lines": [], "meta": {k: row[i] for k, i in optional if row[i] != ""}}
            elif (g["w"], g["h"]) != (w, h):
                raise DataError(f"{csv_path}:{line_no}",
                                f"width/height {w}x{h} differ from earlier rows of id {iid} ({g['w']}x{g['h']})")
            elif ct != g["ct"]:
                raise DataError(f"{csv_path}:{line_no}",
                                f"cell_type {ct!r} differs from earlier rows of id {iid} ({g['ct']!r})")
            g["ann"].append(row[i_ann])
            g["lines"].append(line_no)


def read_sartorius(path: str | Path, image_dir: str | Path | None = None,
                   classes: list[str] | None = None, require_images: bool = True) -> Dataset:
    """A Kaggle Sartorius folder (``train.csv`` + ``train/<id>.png``) or the csv itself.

    Rows of one id become one sample; masks keep their csv order and may overlap
    (the real annotations do): they are never flattened into a label image.
    ``require_images=False`` reads annotation-only sets (the metric's ground truth).
    """
    path = Path(path)
    csv_path = path / "train.csv" if path.is_dir() else path
    if not csv_path.is_file():
        raise DataError(csv_path, "annotation csv not found")
    root = csv_path.parent
    image_dir = Path(image_dir) if image_dir else root / "train"
    classes = list(classes or SARTORIUS_CLASSES)
    cls_index = {c: i for i, c in enumerate(classes)}

    groups: "OrderedDict[str, dict]" = OrderedDict()
    try:
        _read_sartorius_rows(csv_path, groups, cls_index, classes)
    except UnicodeDecodeError as e:
        raise DataError(csv_path, f"not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise DataError(csv_path, f"not a readable csv ({e})") from None

    samples = []
    for iid, g in groups.items():
        counts, runs = rle.kaggle_decode_runs(g["ann"], g["h"], g["w"], RowNames(csv_path, g["lines"]))
        cl = np.full(len(counts), cls_index.get(g["ct"], -1), dtype=np.int64)
        img_path = find_image(image_dir, iid)
        if img_path is None and require_images:
            raise DataError(image_dir / f"{iid}.png", f"image of id {iid} (first row {csv_path}:{g['lines'][0]}) is missing")
        meta = dict(g["meta"], cell_type=g["ct"] or None, source=str(csv_path))
        meta["group"] = meta.get("sample_id") or iid
        if img_path is None:
            meta["expected_image"] = str(image_dir / f"{iid}.png")  # named by preflight / --skip-bad
        samples.append(Sample(iid, Instances(g["h"], g["w"], counts, cl, _runs=runs), img_path, meta))
    if not samples:
        raise DataError(csv_path, "no annotations")
    return Dataset(root.name, classes, samples, root)


def write_sartorius_csv(path: str | Path, dataset: Dataset, extra_columns: Iterable[str] = ()) -> None:
    """Write samples as a Kaggle train.csv (one row per mask)."""
    extra = list(extra_columns)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "annotation", "width", "height", "cell_type", *extra])
        for s in dataset:
            ct = s.cell_type(dataset.classes)
            for c in s.instances.counts:
                w.writerow([s.image_id, rle.kaggle_encode(c, s.height, s.width), s.width, s.height, ct,
                            *[s.meta.get(k, "") for k in extra]])


# ---------------------------------------------------------------------------
# COCO / LIVECell
# ---------------------------------------------------------------------------

_LIVECELL_WELL = re.compile(r"^(?P<cell>[A-Za-z0-9\-]+)_Phase_(?P<well>[A-Z]\d+)_(?P<site>\d+)_")


def livecell_group(file_name: str) -> str | None:
    """'A172_Phase_A7_1_00d00h00m_1.tif' -> 'A172_A7' (images of a well share this)."""
    m = _LIVECELL_WELL.match(Path(file_name).name)
    return f"{m['cell']}_{m['well']}" if m else None


def read_json(path: Path, what: str):
    """A JSON file (a UTF-8 BOM is tolerated), DataError naming it if missing or not JSON."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError(path, f"{what} not found") from None
    except IsADirectoryError:
        raise DataError(path, f"{what} is a folder, not a file") from None
    except UnicodeDecodeError as e:
        raise DataError(path, f"not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON ({e})") from None
    except RecursionError:
        raise DataError(path, "not valid JSON (nested too deeply)") from None


def is_int(v) -> bool:
    """A JSON integer (``True`` is not one, ``520.0`` is)."""
    if isinstance(v, bool):
        return False
    return isinstance(v, (int, np.integer)) or (isinstance(v, float) and v.is_integer())


def _coco_id(v) -> bool:
    return (isinstance(v, (int, str)) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


def _check_coco(json_path: Path, data) -> None:
    """Every field read_coco uses: present and of the right type, else DataError naming the entry."""
    if not isinstance(data, dict):
        raise DataError(json_path, f"not a COCO instance file: the top level is a {type(data).__name__}, "
                                   "not an object")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataError(json_path, f"not a COCO instance file: no '{key}'")
        if not isinstance(data[key], list):
            raise DataError(json_path, f"'{key}' is a {type(data[key]).__name__}, not a list")
    for k, c in enumerate(data["categories"]):
        where = f"{json_path}: category #{k}"
        _check_entry(where, c, is_int, "an integer")
        if not isinstance(c.get("name"), str) or not c["name"].strip():
            raise DataError(f"{where} (id {c['id']})", f"name {c.get('name')!r} is not a non-empty string")
    for k, im in enumerate(data["images"]):
        where = f"{json_path}: image #{k}"
        _check_entry(where, im, _coco_id, "an integer or string")
        where = f"{where} (id {im['id']!r})"
        for f in ("height", "width"):
            if f not in im:
                raise DataError(where, f"has no '{f}'")
            if not is_int(im[f]) or im[f] <= 0:
                raise DataError(where, f"{f} {im[f]!r} is not a positive integer")
        if "file_name" in im and (not isinstance(im["file_name"], str) or not im["file_name"].strip()):
            raise DataError(where, f"file_name {im['file_name']!r} is not a non-empty string")
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise DataError(f"{json_path}: annotation #{k}", f"is a {type(ann).__name__}, not an object")
        where = f"{json_path}: annotation #{k} (id {ann.get('id')!r})"
        for f in ("image_id", "category_id", "segmentation"):
            if f not in ann:
                raise DataError(where, f"has no '{f}'")
        if not _coco_id(ann["image_id"]):
            raise DataError(where, f"image_id {ann['image_id']!r} is not an integer or string")
        if not is_int(ann["category_id"]):
            raise DataError(where, f"category_id {ann['category_id']!r} is not an integer")


def _check_entry(where: str, entry, id_ok, id_kind: str) -> None:
    """A COCO list entry is an object with an ``id`` that ``id_ok`` accepts (else DataError naming it)."""
    if not isinstance(entry, dict):
        raise DataError(where, f"is a {type(entry).__name__}, not an object")
    if "id" not in entry:
        raise DataError(where, "has no 'id'")
    if not id_ok(entry["id"]):
        raise DataError(where, f"id {entry['id']!r} is not {id_kind}")


def _key(v):
    """Ids as dict keys: 7 and 7.0 are one id."""
    return int(v) if isinstance(v, float) else v


# image-entry fields that are COCO's own or ids/addresses, never per-image attributes
_COCO_IMAGE_FIELDS = {"id", "file_name", "height", "width", "license", "coco_url", "flickr_url", "url",
                      "date_captured", "original_filename", "original_file_name", "sample_id"}


def _image_attrs(im: dict) -> dict[str, str]:
    """Extra short string fields of a COCO image entry (DSB2018's ``modality``)."""
    return {k: v for k, v in im.items()
            if k not in _COCO_IMAGE_FIELDS and isinstance(v, str) and 0 < len(v.strip()) <= 100}


def read_coco(json_path: str | Path, image_dir: str | Path | None = None, require_images: bool = True) -> Dataset:
    """COCO instance json (LIVECell, the shared Sartorius json): polygons and RLE, overlap kept.

    Every field used is checked (present, right type); polygons must have an even number of
    coordinates, at least 3 points and lie inside the image (1 pixel tolerance).
    """
    json_path = Path(json_path)
    data = read_json(json_path, "annotation json")
    _check_coco(json_path, data)
    image_dir = Path(image_dir) if image_dir else json_path.parent / "images"
    cats = sorted(data["categories"], key=lambda c: int(c["id"]))
    cat_index: dict[int, int] = {}
    for c in cats:
        if int(c["id"]) in cat_index:
            raise DataError(json_path, f"duplicate category id {c['id']!r}")
        cat_index[int(c["id"])] = len(cat_index)
    classes = [c["name"] for c in cats]
    images: "OrderedDict[object, dict]" = OrderedDict()
    for im in data["images"]:
        if _key(im["id"]) in images:
            raise DataError(json_path, f"duplicate image id {im['id']!r}")
        images[_key(im["id"])] = {"im": im, "counts": [], "cls": []}
    for k, ann in enumerate(data["annotations"]):
        where = f"{json_path}: annotation #{k} (id {ann.get('id')!r})"
        g = images.get(_key(ann["image_id"]))
        if g is None:
            raise DataError(where, f"refers to unknown image_id {ann['image_id']!r}")
        if int(ann["category_id"]) not in cat_index:
            raise DataError(where, f"unknown category_id {ann['category_id']!r}")
        h, w = int(g["im"]["height"]), int(g["im"]["width"])
        try:
            counts = rle.from_coco_segmentation(ann["segmentation"], h, w)
        except (ValueError, TypeError) as e:
            raise DataError(where, str(e)) from None
        if rle.area(counts) == 0:
            raise DataError(where, "empty mask")
        g["counts"].append(counts)
        g["cls"].append(cat_index[int(ann["category_id"])])
    samples = []
    for iid, g in images.items():
        im = g["im"]
        fname = im.get("file_name", f"{iid}.png")
        p = image_dir / fname
        if not p.is_file():
            p = find_image(image_dir, Path(fname).stem) or p
            if not p.is_file() and require_images:
                raise DataError(p, f"image {iid!r} listed in {json_path} is missing")
        cl = np.array(g["cls"], dtype=np.int64)
        meta = {"file_name": fname, "source": str(json_path)}
        sid = im.get("sample_id")  # optional: used only when it is a plain id
        sid = str(sid) if isinstance(sid, (str, int)) and not isinstance(sid, bool) and str(sid).strip() else None
        meta["group"] = livecell_group(fname) or sid or str(iid)
        if cl.size and (cl == cl[0]).all():
            meta["cell_type"] = classes[cl[0]]
        attrs = _image_attrs(im)
        if attrs:
            meta["attrs"] = attrs  # e.g. DSB2018's modality (bench/data/attributes.py)
        samples.append(Sample(str(iid), Instances(int(im["height"]), int(im["width"]), g["counts"], cl), p, meta))
    return Dataset(json_path.stem, classes, samples, json_path.parent)


# ---------------------------------------------------------------------------
# Cellpose-style label folders
# ---------------------------------------------------------------------------

def read_label_folder(folder: str | Path, class_name: str = "cell") -> Dataset:
    """``<name>.png|tif`` with ``<name>_masks.png|tif`` (0 = background, one label per cell)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "not a folder")
    samples = []
    for mpath in sorted(folder.iterdir()):
        if not (mpath.suffix.lower() in IMAGE_SUFFIXES and mpath.stem.endswith("_masks")):
            continue
        stem = mpath.stem[: -len("_masks")]
        ipath = find_image(folder, stem)
        if ipath is None:
            raise DataError(mpath, f"label image has no matching image {stem}.png|tif")
        labels = read_label_image(mpath)
        inst = Instances.from_label_image(labels, cls_id=0)
        meta = {"group": stem, "cell_type": class_name, "source": str(mpath)}
        top = int(labels.max())
        if top > len(inst):  # ids 1..top with some unused: accepted (one cell per label), reported by check
            meta["label_gaps"] = {"max_label": top, "cells": len(inst)}
        samples.append(Sample(stem, inst, ipath, meta))
    if not samples:
        raise DataError(folder, "no '<name>_masks.png|tif' label images found")
    return Dataset(folder.name, [class_name], samples, folder)


# ---------------------------------------------------------------------------
# auto-detection
# ---------------------------------------------------------------------------

def load_dataset(path: str | Path, require_images: bool = True, bad: list[tuple[str, str]] | None = None) -> Dataset:
    """Any dataset cellbench reads, by what the path looks like. ``bad``: where a reader can leave a
    broken image out (DSB2018's per-id folders), it does and appends ``(id, problem)``."""
    path = Path(path)
    if path.suffix == ".json":
        return read_coco(path, require_images=require_images)
    if path.suffix == ".csv" or (path / "train.csv").is_file():
        return read_sartorius(path, require_images=require_images)
    if path.is_dir():
        from bench.data.dsb import dsb_root, read_dsb_native

        if dsb_root(path) is not None:  # DSB2018 native: stage1_train/<id>/{images,masks}/
            return read_dsb_native(path, require_images=require_images, bad=bad)
        jsons = sorted(path.glob("*.json"))
        if len(jsons) == 1:
            return read_coco(jsons[0], require_images=require_images)
        return read_label_folder(path)
    raise DataError(path, "not a dataset: expected a Sartorius folder/csv, a COCO json, a label-image folder "
                          "or a DSB2018 stage1_train folder")
