"""The shared YOLO segmentation exporter: polygons that rasterise back to the masks, the layout Ultralytics reads."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from PIL import Image

from bench.data.sample import Instances, Sample
from bench.data.yolo_layout import export_yolo_seg, mask_polygon


def _raster(poly: np.ndarray, h: int, w: int) -> np.ndarray:
    """Fill a polygon by COCO's convention (pixel k spans [k, k+1)), with pycocotools."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.frPyObjects([np.asarray(poly, float).ravel().tolist()], h, w)
    return mask_utils.decode(rle)[:, :, 0].astype(bool)


def _iou(a, b) -> float:
    return (a & b).sum() / (a | b).sum()


def test_polygon_of_a_disc_and_a_square_rasterise_back():
    yy, xx = np.mgrid[:60, :80]
    disc = (yy - 30) ** 2 + (xx - 40) ** 2 <= 12 ** 2
    square = np.zeros((60, 80), bool)
    square[10:20, 50:70] = True
    for m in (disc, square):
        poly = mask_polygon(m)
        assert poly is not None and poly.shape[1] == 2
        assert _iou(_raster(poly, 60, 80), m) > 0.9
    sq = mask_polygon(square)  # the square's corners at its pixels' outer half-pixel edge
    assert sq[:, 0].min() == pytest.approx(50.0, abs=0.51) and sq[:, 0].max() == pytest.approx(70.0, abs=0.51)


def test_polygon_of_two_pieces_keeps_the_larger_and_tiny_masks_have_none():
    m = np.zeros((40, 40), bool)
    m[2:6, 2:6] = True
    m[20:35, 20:35] = True
    poly = mask_polygon(m)
    assert poly[:, 0].min() > 18  # the 15x15 piece
    one = np.zeros((10, 10), bool)
    one[5, 5] = True
    assert mask_polygon(one) is None or len(mask_polygon(one)) >= 3


def _sample(i: int, classes: list[int]) -> Sample:
    h, w = 48, 64
    masks = np.zeros((len(classes), h, w), bool)
    for k in range(len(classes)):
        masks[k, 4 + 10 * k: 12 + 10 * k, 8: 20 + 5 * k] = True
    inst = Instances.from_masks(masks, classes=np.array(classes))
    img = (np.arange(h * w).reshape(h, w) % 251).astype(np.uint8)
    return Sample(f"dir/img{i}", inst, _image=img)


def test_export_writes_the_layout_ultralytics_reads(tmp_path):
    train = [_sample(0, [0, 1, -1]), _sample(1, [2])]
    done = export_yolo_seg({"train": train, "val": "train"}, tmp_path / "ds", ["a", "b", "c"], lambda s: s.image)
    doc = yaml.safe_load(done.yaml_path.read_text())
    assert doc == {"path": str((tmp_path / "ds").resolve()), "train": "images/train", "val": "images/train",
                   "names": {0: "a", 1: "b", 2: "c"}}
    assert done.images == {"train": 2} and done.instances == {"train": 4}
    assert not (tmp_path / "ds" / "images" / "val").exists()  # not written twice
    img = np.asarray(Image.open(tmp_path / "ds" / "images" / "train" / "dir_img0.png"))
    np.testing.assert_array_equal(img, train[0].image)
    lines = (tmp_path / "ds" / "labels" / "train" / "dir_img0.txt").read_text().splitlines()
    assert [int(line.split()[0]) for line in lines] == [0, 1, 0]  # class -1 (agnostic) -> 0
    for line, k in zip(lines, range(3)):
        xy = np.array(line.split()[1:], float).reshape(-1, 2)
        assert np.all((xy >= 0) & (xy <= 1)) and len(xy) >= 3
        back = _raster(xy * [64, 48], 48, 64)
        assert _iou(back, train[0].instances.dense(k)) > 0.9


def test_export_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="dir/img0: instance 1 has class 5"):
        export_yolo_seg({"train": [_sample(0, [0, 5])]}, tmp_path / "a", ["a"], lambda s: s.image)
    with pytest.raises(ValueError, match="must be 8-bit, got float64"):
        export_yolo_seg({"train": [_sample(0, [0])]}, tmp_path / "b", ["a"], lambda s: s.image / 255.0)
    a, b = _sample(0, [0]), _sample(1, [0])
    b.image_id = "dir_img0"
    with pytest.raises(ValueError, match="'dir/img0' and 'dir_img0' both become file dir_img0.png"):
        export_yolo_seg({"train": [a, b]}, tmp_path / "c", ["a"], lambda s: s.image)
