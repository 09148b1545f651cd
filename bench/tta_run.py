"""``bench tta RUN --model M --tta flip``: a trained model of a run, predicted again with TTA.

The same as ``bench run --models M:tta=flip`` without training again: the model's
checkpoint is loaded (:func:`bench.infer.load_model`), the run's validation images are
predicted with :class:`bench.tta.TTAPredictor`, and the result goes to the folder a run with
``M:tta=...`` would have made (``RUN/models/<label>--tta=flip``): predictions, the inverted
passes before merging (``raw_outputs.jsonl.gz``), ``predict.done.json`` with the TTA timing
(all passes, the identity pass alone, their ratio) and ``metrics.json``, so the leaderboard
pairs it image by image with the model without TTA. The training record is the source
model's (the same weights).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from bench.store import FitDone, Job, PredictDone, RunDir, Status


def tta_spec(spec: str, tta: str) -> str:
    """'cellpose' -> 'cellpose:tta=flip'; 'cellpose:diam_mean=20' -> 'cellpose:diam_mean=20,tta=flip'."""
    from bench.adapters import registry

    name, opts = registry.parse_spec(spec)
    if "tta" in opts and str(opts["tta"]) != "none":
        raise ValueError(f"model {spec!r} already predicts with tta={opts['tta']}")
    opts = {k: v for k, v in opts.items() if k != "tta"}
    tail = ",".join([f"{k}={registry.format_value(v)}" for k, v in opts.items()] + [f"tta={tta}"])
    return f"{name}:{tail}"


def tta_model(run_dir: Path, model: str, tta: str, device: str = "cpu", echo=print) -> dict:
    """Predict ``model`` of ``run_dir`` again with ``tta``; returns the new folder's metrics."""
    from bench.adapters import registry
    from bench.data.io import load_dataset
    from bench.data.predictions import write_predictions
    from bench.data.split import read_split
    from bench.infer import load_model
    from bench.metrics.bootstrap import paired_bootstrap
    from bench.metrics.evaluator import evaluate_predictions
    from bench.tiling import predictor as tiled_predictor
    from bench.raw import begin_capture, end_capture, take_maps, write_raw_maps
    from bench.tta import TTAPredictor, check_supported, validate_tta, write_raw_outputs

    run = RunDir(run_dir)
    manifest = run.read_manifest()
    src = run.resolve(model)
    tta = validate_tta(tta)
    if tta == "none":
        raise ValueError("--tta none: nothing to do (flip, scale, flip+scale, ...)")
    job = src.read_job()
    name, _ = registry.parse_spec(job.spec)
    cls = registry.get(name)
    check_supported(name, cls.tta_capabilities(cls.Config(**job.config)), tta)  # before loading anything
    spec = tta_spec(job.spec, tta)
    out = run.model_for(spec)
    if out.is_dir():
        raise FileExistsError(f"{out.path} already exists (delete it to predict again)")
    lm = load_model(run.path, src.label, device)
    ds = load_dataset(manifest.data)
    split = read_split(run.split, ds)
    val = ds.subset(split["val"])
    samples = list(val)
    for s in samples:
        s._image = s.image
    floor = getattr(lm.adapter.cfg, "raw_floor", None)
    predictor = TTAPredictor(tiled_predictor(lm.adapter), tta, resolve_overlaps=not job.resolve_overlaps,
                             threshold=lm.adapter.score_threshold(), take_maps=lambda: take_maps(lm.adapter))
    begin_capture(lm.adapter, floor)
    if samples:
        predictor(samples[0], record=False)  # warm-up, as the worker does
    preds, times = {}, []
    for s in samples:
        t0 = time.perf_counter()
        preds[s.image_id] = predictor(s)
        times.append(time.perf_counter() - t0)
    end_capture(lm.adapter)
    with run.lock():
        if out.is_dir():  # another process made it meanwhile
            raise FileExistsError(f"{out.path} already exists (delete it to predict again)")
        out.mkdir()
        Job(spec=spec, label=out.label, config={**job.config, "tta": tta}, data=job.data, device=lm.device,
            seed=job.seed, requested_device=device, fit="skip", resolve_overlaps=job.resolve_overlaps,
            max_dets=job.max_dets, extra={"tta_of": src.label}).write(out.job)
        if src.fit_done.is_file():
            shutil.copyfile(src.fit_done, out.fit_done)
        else:
            FitDone(skipped=True).write(out.fit_done)
        meta = {"model": spec, "split": split["hash"]}
        write_predictions(out.predictions, preds, ds.classes, meta)
        write_raw_outputs(out.raw_outputs, predictor.raw, ds.classes, {**meta, **predictor.raw_header(floor, out.predictions)})
        write_raw_maps(out, predictor.maps, {"model": spec})
        out.write_predict_done(PredictDone(
            images=len(samples), warmup_images=min(1, len(samples)),
            infer_ms_per_image=1000 * float(np.mean(times)) if times else None,
            infer_ms_per_image_median=1000 * float(np.median(times)) if times else None,
            device=lm.device, extra=predictor.timing()))
        gt = {s.image_id: (s.instances, s.cell_type(ds.classes)) for s in val}
        res = evaluate_predictions(gt, preds, ds.classes, resolve_overlaps=job.resolve_overlaps,
                                   max_dets=job.max_dets, seed=job.seed)
        fit_t, pred_t = out.read_fit_done().to_dict(), out.read_predict_done().to_dict()
        fit_t.pop("device", None)
        pred_t.pop("device", None)
        res["timings"] = {**{f"fit_{k}" if k.startswith(("peak", "cuda")) else k: v for k, v in fit_t.items()},
                          **{f"predict_{k}" if k.startswith(("peak", "cuda")) else k: v for k, v in pred_t.items()}}
        src_metrics = src.read_metrics() or {}
        if src_metrics.get("per_image"):
            res["paired_vs_source"] = {src.label: paired_bootstrap(res["per_image"], src_metrics["per_image"],
                                                                    seed=job.seed).as_dict()}
        res.update(model=spec, label=out.label, device=lm.device, fit="weights of " + src.label,
                   overlaps="resolved by score" if job.resolve_overlaps else "none (checked)",
                   capabilities=vars(cls.capabilities) | {"devices": list(cls.capabilities.devices)},
                   framework={"name": cls.framework, "version": cls.available().version},
                   split_hash=split["hash"], seed=job.seed)
        out.write_metrics(res)
        out.write_status(Status(state="done", device=lm.device))
    echo(f"[{out.label}] wrote {out.path}")
    return res


def summary(res: dict) -> str:
    t = res["timings"]
    lo, hi = res["kaggle_map_ci95"]
    rows = [f"{res['label']}: Kaggle mAP {res['kaggle_map']:.4f} [{lo:.4f}, {hi:.4f}]; "
            f"{t.get('infer_ms_per_image') or 0:.1f} ms/img = {t.get('tta_factor') or 0:.2f} x the identity pass "
            f"({t.get('tta_identity_ms_per_image') or 0:.1f} ms/img), passes: {', '.join(t.get('tta_passes', []))}"]
    for label, p in res.get("paired_vs_source", {}).items():
        rows.append(f"  vs {label}: diff {p['diff']:+.4f} [{p['diff_ci95'][0]:+.4f}, {p['diff_ci95'][1]:+.4f}] "
                    f"P(tta better)={p['p_a_better']:.2f} -> {p['verdict']}")
    return "\n".join(rows)
