"""How big DSB2018's nuclei are as a detector sees them: today's whole-image resize vs native-scale crops.

    nice -n 15 python scripts/crop_scale_stats.py ../shared/data/dsb2018/annotations.json [--short 384 --long 704 --crop 384]

For every training image: the scale of a shortest-edge resize to ``--short`` (capped at ``--long``;
what the ``cpu`` presets do with whole images) and the same after a ``--crop`` px training crop
(``train_crop``, resized with the same ``min_size``); every nucleus' size ``sqrt(box_w * box_h)``
times that scale; percentiles, the share under 8 px (the presets' smallest anchor, twice the P2
stride) and the anchors ``anchor_sizes=auto`` derives, per image size. Data statistics only, no
training.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np

from bench.anchors import auto_anchor_sizes, resize_factor
from bench.data.io import load_dataset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--short", type=int, default=384)
    ap.add_argument("--long", type=int, default=704)
    ap.add_argument("--crop", type=int, default=384)
    a = ap.parse_args()
    ds = load_dataset(a.data, require_images=False)
    rows: dict[str, dict[str, list]] = defaultdict(lambda: {"native": [], "resize": [], "crop": []})
    for s in ds.samples:
        b = s.instances.boxes_xywh()
        if not len(b):
            continue
        size = np.sqrt(b[:, 2] * b[:, 3])
        h, w = s.height, s.width
        key = f"{w}x{h}"
        rows[key]["native"].append(size)
        rows[key]["resize"].append(size * resize_factor(h, w, a.short, a.long))
        rows[key]["crop"].append(size * resize_factor(min(a.crop, h), min(a.crop, w), a.short, a.long))
    out = {}
    for key in sorted(rows, key=lambda k: -sum(len(x) for x in rows[k]["native"])) + ["all"]:
        parts = rows[key] if key != "all" else {m: [x for r in rows.values() for x in r[m]] for m in
                                                ("native", "resize", "crop")}
        stats = {}
        for mode, chunks in parts.items():
            v = np.concatenate(chunks)
            p5, p50, p95 = np.percentile(v, [5, 50, 95])
            stats[mode] = {"n": int(v.size), "p5": round(float(p5), 1), "median": round(float(p50), 1),
                           "p95": round(float(p95), 1), "under_8px": round(float((v < 8).mean()), 3),
                           "auto_anchors": auto_anchor_sizes(v)}
        out[key] = {"images": len(parts["native"]) if key != "all" else len(ds.samples), **stats}
    print(json.dumps({"data": a.data, "short": a.short, "long": a.long, "crop": a.crop, "by_image_size": out},
                     indent=1))


if __name__ == "__main__":
    main()
