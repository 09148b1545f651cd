"""The 2018 Data Science Bowl's native layout (BBBC038 ``stage1_train``), as users download it.

::

    stage1_train/<id>/images/<id>.png     the image (RGBA in the original: the alpha is dropped)
    stage1_train/<id>/masks/<k>.png       one binary PNG per nucleus (0 = background)

Masks are kept one per file, overlaps included (a few images of the real set have overlapping
nuclei), never flattened into a label image. Every problem names the id and the file: a missing
``images/`` file, an unreadable PNG, a mask of another size than its image, an empty
(all-background) mask, a mask that is not binary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.data import rle
from bench.data.errors import DataError
from bench.data.sample import Dataset, Instances, Sample

DSB_CLASSES = ["nucleus"]  # the category of the COCO form in ../shared/data/dsb2018


def _is_id_dir(d: Path) -> bool:
    return d.is_dir() and (d / "masks").is_dir() and (d / "images").is_dir()


def dsb_root(path: str | Path) -> Path | None:
    """The folder of id folders if ``path`` is a DSB native dataset (a folder holding
    ``stage1_train/`` or the ``stage1_train`` folder itself), else None. Decided from the first
    few entries only, so that detection costs nothing on large folders of other layouts."""
    path = Path(path)
    if not path.is_dir():
        return None
    for cand in (path / "stage1_train", path):
        if not cand.is_dir():
            continue
        for n, d in enumerate(sorted(cand.iterdir())):
            if _is_id_dir(d):
                return cand
            if n >= 20:
                break
    return None


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file's header, without decoding the pixels."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception as e:  # PIL raises many types for corrupt files
        raise DataError(path, f"cannot read image ({type(e).__name__}: {e})") from None
    return h, w


def read_mask(path: Path, image_id: str, expect_hw: tuple[int, int] | None) -> np.ndarray:
    """One instance mask PNG as a boolean H x W array; DataError naming the id and file."""
    from bench.data.io import _read_pixels

    try:
        m = _read_pixels(path)
    except DataError as e:
        raise DataError(path, f"mask of id {image_id}: {e.problem}") from None
    if m.ndim == 3:
        if not ((m == m[..., :1]).all()):
            raise DataError(path, f"mask of id {image_id} is a colour image (channels differ): want one binary "
                                  "mask per file")
        m = m[..., 0]
    if expect_hw is not None and tuple(m.shape) != tuple(expect_hw):
        raise DataError(path, f"mask of id {image_id} is {m.shape[1]}x{m.shape[0]} (WxH) but its image is "
                              f"{expect_hw[1]}x{expect_hw[0]}")
    fg = m != 0
    if not fg.any():
        raise DataError(path, f"mask of id {image_id} is empty (all background)")
    values = np.unique(m[fg])
    if values.size > 1:
        raise DataError(path, f"mask of id {image_id} is not binary ({values.size} foreground values, e.g. "
                              f"{values[:3].tolist()}): want one PNG per nucleus, 0 = background")
    return fg


def read_dsb_native(path: str | Path, require_images: bool = True,
                    bad: list[tuple[str, str]] | None = None) -> Dataset:
    """A DSB2018 ``stage1_train`` folder (or the folder holding it) as a Dataset.

    Sample ids are the DSB ids (the folder names); masks keep the sorted order of their file
    names. ``require_images=False`` reads annotation-only copies (the size then comes from the
    masks, which must agree). ``bad`` (``bench run --skip-bad``): an id with a bad mask or image
    is left out and ``(id, problem)`` appended, instead of an error."""
    path = Path(path)
    root = dsb_root(path)
    if root is None:
        raise DataError(path, "not a DSB2018 folder: expected stage1_train/<id>/images/<id>.png and "
                              "stage1_train/<id>/masks/*.png")
    samples = []
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        try:
            samples.append(_read_id(d, require_images))
        except DataError as e:
            if bad is None:
                raise
            bad.append((d.name, str(e)))
    if not samples:
        raise DataError(root, "no id folders" if not bad else f"no readable id folders ({len(bad)} bad)")
    return Dataset(root.parent.name if root.name == "stage1_train" else root.name, list(DSB_CLASSES), samples, root)


def _read_id(d: Path, require_images: bool) -> Sample:
    """One id folder as a Sample (DataError naming the id and file of any problem)."""
    iid = d.name
    if not (d / "masks").is_dir():
        raise DataError(d / "masks", f"id {iid} has no masks/ folder")
    img_path = d / "images" / f"{iid}.png"
    if not img_path.is_file():
        from bench.data.io import find_image

        img_path = find_image(d / "images", iid) if (d / "images").is_dir() else None
        if img_path is None:
            if require_images:
                raise DataError(d / "images" / f"{iid}.png", f"image of id {iid} is missing")
            img_path = d / "images" / f"{iid}.png"
    hw = _image_size(img_path) if img_path.is_file() else None
    mask_files = sorted(p for p in (d / "masks").iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if not mask_files:
        raise DataError(d / "masks", f"id {iid} has no mask PNGs")
    counts = []
    for mp in mask_files:
        m = read_mask(mp, iid, hw)
        hw = hw or m.shape
        counts.append(rle.encode_mask(m))
    meta = {"group": iid, "cell_type": DSB_CLASSES[0], "source": str(d / "masks"),
            "file_name": f"{iid}.png"}
    return Sample(iid, Instances(int(hw[0]), int(hw[1]), counts, np.zeros(len(counts), np.int64)), img_path, meta)
