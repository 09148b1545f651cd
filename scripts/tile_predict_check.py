"""One trained model, two ways of predicting large images: whole (resized as the preset says) vs tiles.

    nice -n 15 python scripts/tile_predict_check.py DATA CHECKPOINT [CHECKPOINT ...] --ids 169,273 [--tile 384 --overlap 64]

CHECKPOINT: a model's ``checkpoint`` folder of a run (``RUN/models/<label>/checkpoint``). Prints, per
model and mode, the Kaggle mAP over the given images, per image, the instance counts and seconds
per image (JSON lines). Prediction only: the model is not retrained.
"""

from __future__ import annotations

import argparse
import json
import time

from bench.adapters import registry
from bench.adapters.trainable import read_meta
from bench.data.io import load_dataset
from bench.metrics.kaggle import quick_map
from bench.tiling import predict_tiled


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--ids", required=True, help="image ids, comma-separated")
    ap.add_argument("--tile", type=int, default=384)
    ap.add_argument("--overlap", type=int, default=64)
    a = ap.parse_args()
    ds = load_dataset(a.data, require_images=False)
    ids = a.ids.split(",")
    samples = [s for s in ds.samples if s.image_id in ids]
    for s in samples:
        s._image = s.image
    gt = [s.instances for s in samples]
    for ckpt in a.checkpoints:
        with open(f"{ckpt}/meta.json") as f:
            name = json.load(f)["adapter"]
        cls = registry.get(name)
        meta = read_meta(ckpt, name)
        model = cls(cls.Config(**{**meta["config"], "weights": None}), meta["classes"], "cpu")
        model.load(ckpt)
        for mode, fn in (("whole", lambda ss: model.predict(ss)),
                         (f"tiles {a.tile}/{a.overlap}", lambda ss: predict_tiled(model, ss, a.tile, a.overlap))):
            t0 = time.perf_counter()
            preds = [fn([s])[0] for s in samples]
            dt = time.perf_counter() - t0
            print(json.dumps({"model": name, "mode": mode, "kaggle_map": round(quick_map(gt, preds), 4),
                              "per_image": [round(quick_map([g], [p]), 4) for g, p in zip(gt, preds)],
                              "n_pred": [len(p) for p in preds], "n_gt": [len(g) for g in gt],
                              "s_per_image": round(dt / len(samples), 2)}), flush=True)


if __name__ == "__main__":
    main()
