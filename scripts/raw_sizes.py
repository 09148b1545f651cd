"""Size of the raw cache per image (README, "Raw outputs"): each trained model of a finished run
(read only) predicts N validation images down to its raw floor; raw_outputs + maps go under OUT;
one JSON line per model with bytes per image.

    OMP_NUM_THREADS=1 python scripts/raw_sizes.py RUN OUT N model1,model2
    (StarDist: with .venv-stardist/bin/python)
"""
import json
import sys
import time
from pathlib import Path
from bench.infer import load_model
from bench.data.io import load_dataset
from bench.data.split import read_split
from bench.data.predictions import write_predictions
from bench.raw import begin_capture, end_capture, take_maps, write_raw_maps
from bench.store import RunDir, ModelDir
from bench.tta import TTAPredictor, write_raw_outputs
run_dir, out, n, labels = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
run = RunDir(run_dir); man = run.read_manifest()
ds = load_dataset(man.data); split = read_split(run.split, ds)
val = list(ds.subset(split["val"]))[:n]
for label in labels:
    lm = load_model(run_dir, label, "cpu")
    a = lm.adapter
    floor = a.cfg.raw_floor
    p = TTAPredictor(a.predict, "none", threshold=a.score_threshold(), take_maps=lambda: take_maps(a))
    begin_capture(a, floor)
    t0 = time.perf_counter()
    preds = {s.image_id: p(s) for s in val}
    dt = time.perf_counter() - t0
    end_capture(a)
    md = ModelDir(out / label); md.mkdir()
    write_predictions(md.predictions, preds, ds.classes, {})
    write_raw_outputs(md.raw_outputs, p.raw, ds.classes, p.raw_header(floor, md.predictions))
    mb = write_raw_maps(md, p.maps, {})
    npub = sum(len(v) for v in preds.values()); nraw = sum(len(v["identity"]) for v in p.raw.values())
    shape = val[0].image.shape
    print(json.dumps({"model": label, "images": len(val), "image_shape": list(shape), "threshold": a.score_threshold(),
        "floor": floor, "published_instances_per_image": npub / len(val), "raw_instances_per_image": nraw / len(val),
        "predictions_bytes_per_image": md.predictions.stat().st_size / len(val),
        "raw_outputs_bytes_per_image": md.raw_outputs.stat().st_size / len(val),
        "maps_bytes_per_image": mb, "s_per_image": dt / len(val)}), flush=True)
