"""One model, one subprocess: fit -> predict -> evaluate, each stage resumable.

Run as ``python -m bench.runner.worker MODEL_DIR``; everything it needs is in the
:class:`bench.store.Job` of ``MODEL_DIR`` and the run folder (paths: :mod:`bench.store`).
Each stage writes its outputs atomically and finishes by writing its stage marker
(``FitDone``, ``PredictDone``, then the metrics), so ``--resume`` skips exactly the
finished stages and nothing finished is ever rewritten. A crash anywhere leaves the
status saying which stage failed and why (the parent also records signals, e.g. the
OOM killer, that no Python code sees, and timeouts). The device, whether to fit and
whether the evaluator resolves overlaps come from the parent's plan, in the job.
"""

from __future__ import annotations

import os
import resource
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from bench.store import FitDone, ModelDir, PredictDone, Status
from bench.util import append_jsonl

EXIT_OK, EXIT_FAILED, EXIT_NOT_INSTALLED = 0, 1, 3


def _rss_mb() -> float:
    """This process's own peak RSS (VmHWM). ru_maxrss is not: a forked child starts from its
    parent's RSS, so it would report the runner's size as the model's."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # non-Linux fallback (KB on Linux)


def _cuda_peak_mb(device: str) -> float | None:
    if not device.startswith("cuda") or "torch" not in sys.modules:
        return None
    import torch

    return torch.cuda.max_memory_allocated(torch.device(device)) / 2 ** 20


def _sync(device: str) -> None:
    if device.startswith("cuda") and "torch" in sys.modules:
        import torch

        torch.cuda.synchronize(torch.device(device))


class Progress:
    """tqdm on the terminal the runner was started from (its fd is handed over), not in log.txt."""

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None
        fd = os.environ.get("CELLBENCH_PROGRESS_FD")
        self.stream = os.fdopen(int(fd), "w", buffering=1, closefd=False) if fd else None

    def __call__(self, done: int, total: int, info: dict | None = None) -> None:
        if self.stream is None:
            return
        if self.bar is None:
            from tqdm import tqdm

            tty = self.stream.isatty()
            self.bar = tqdm(total=total, desc=self.desc, file=self.stream, mininterval=0.5 if tty else 10,
                            dynamic_ncols=tty, leave=True)
        self.bar.total = total
        self.bar.n = done
        if info:
            self.bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in info.items()},
                                 refresh=False)
        self.bar.refresh() if done >= total else self.bar.update(0)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(model_dir: Path) -> int:
    from bench.adapters import registry
    from bench.adapters.base import FitContext
    from bench.adapters.trainable import seed_everything
    from bench.data.io import load_dataset
    from bench.data.predictions import read_predictions, write_predictions
    from bench.data.split import read_split
    from bench.metrics.evaluator import evaluate_predictions
    from bench.tiling import predictor as tiled_predictor
    from bench.raw import begin_capture, end_capture, take_maps, write_raw_maps
    from bench.tta import TTAPredictor, write_raw_outputs

    md = ModelDir(model_dir)
    job = md.read_job()
    run = md.run
    name, opts = registry.parse_spec(job.spec)
    cls = registry.get(name)
    avail = cls.available()
    if not avail.ok:
        md.write_status(Status(state="not installed", hint=avail.hint, device=job.device))
        print(f"{name}: not installed: {avail.hint}", flush=True)
        return EXIT_NOT_INSTALLED
    cfg = cls.Config(**job.config)
    device = job.device
    if device.split(":")[0] not in cls.capabilities.devices:  # the parent's plan never asks this
        raise RuntimeError(f"{name} does not run on {device} (devices: {cls.capabilities.devices})")
    if device.startswith("cuda") and ":" in device:
        import torch

        torch.cuda.set_device(torch.device(device))  # cuda:N everywhere, also where an adapter says "cuda"

    # the parent's preflight read every image of the split; ids a reader leaves out (bad, []) are
    # in no split: without --skip-bad the parent refused them
    dataset = load_dataset(job.data, require_images=False, bad=[])
    split = read_split(run.split, dataset)
    train, val = dataset.subset(split["train"]), dataset.subset(split["val"])
    if job.train_on == "train+val":  # a sweep stage that retrains on everything (scores are in-sample)
        train = dataset.subset(split["train"] + split["val"])
    adapter = cls(cfg, dataset.classes, device)
    ckpt = md.checkpoint

    # ---- fit ----------------------------------------------------------------------
    if md.fit_done.is_file():
        adapter.load(ckpt)
        print("fit: done earlier, checkpoint loaded", flush=True)
    elif job.fit == "skip":  # not trainable (declared): nothing to fit, the config is the model
        md.write_status(Status(state="running", stage="fit", device=device))
        print(f"fit: skipped ({name} is not trainable)", flush=True)
        _save_checkpoint(adapter, md)
        md.write_fit_done(FitDone(skipped=True, peak_rss_mb=_rss_mb(), device=device))
    else:
        md.write_status(Status(state="running", stage="fit", device=device))
        log_path, curve_path = md.train_log, md.val_curve
        if not md.resume.is_dir():  # an unfinished fit starts over: its log does too
            log_path.unlink(missing_ok=True)
            curve_path.unlink(missing_ok=True)
        bar = Progress(f"{job.label} train")
        steps = {"n": 0}

        def progress(done, total, info):
            steps["n"] = max(steps["n"], done)
            steps["total"] = total
            bar(done, total, info)

        ctx = FitContext(md.work, device, job.seed, progress,
                         lambda rec: append_jsonl(log_path, {**rec, "t": time.time()}),
                         val=list(val), eval_every=int(getattr(cfg, "eval_every", 0) or 0),
                         log_val=lambda rec: append_jsonl(curve_path, {**rec, "t": time.time()}),
                         resume_dir=md.resume,
                         on_begin=lambda k: _trim_logs(md, k, getattr(adapter, "resume_unit", "step")))
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        seed_everything(job.seed)  # every model, trained or not (the trainable base seeds again: harmless)
        t0 = time.perf_counter()
        adapter.fit(list(train), list(val), cfg, ctx)
        train_s = time.perf_counter() - t0 - ctx.validation_seconds
        bar.close()
        _save_checkpoint(adapter, md)
        train_s += ctx.seconds_before  # a resumed fit: its interrupted attempts' training too
        md.write_fit_done(FitDone(
            train_seconds=train_s, validation_curve_seconds=ctx.validation_seconds,
            iterations=steps.get("total", steps["n"]),
            seconds_per_iteration=train_s / max(steps.get("total", steps["n"]) or 1, 1),
            peak_rss_mb=_rss_mb(), cuda_peak_mb=_cuda_peak_mb(device), device=device,
            extra={"resumed_from_iteration": ctx.resumed_from} if ctx.resumed_from else {}))
        _rmtree(md.resume)  # the finished fit's checkpoint supersedes its mid-training ones

    # ---- predict --------------------------------------------------------------------
    pred_path = md.predictions
    if md.predict_done.is_file():
        preds, _ = read_predictions(pred_path)
    else:
        md.write_status(Status(state="running", stage="predict", device=device))
        t_io = time.perf_counter()
        samples = list(val)
        for s in samples:  # I/O first, so it is timed apart from inference
            s._image = s.image
        io_s = time.perf_counter() - t_io
        warmup = min(job.warmup, len(samples))
        floor = getattr(cfg, "raw_floor", None)  # bench/raw.py: the cache keeps down to it, published as before
        predictor = TTAPredictor(tiled_predictor(adapter), getattr(cfg, "tta", "none"),  # plain predict unless tta/tiles
                                 resolve_overlaps=not job.resolve_overlaps, threshold=adapter.score_threshold(),
                                 take_maps=lambda: take_maps(adapter))
        begin_capture(adapter, floor)
        for s in samples[:warmup]:
            predictor(s, record=False)
        _sync(device)
        if device.startswith("cuda") and "torch" in sys.modules:
            import torch

            torch.cuda.reset_peak_memory_stats(torch.device(device))
        bar = Progress(f"{job.label} predict")
        # 1 (the default) times each image alone; a larger predict_batch_size times each call and
        # gives each of its images an equal share
        # (TTA predicts image by image: its passes are the batch)
        batch = 1 if predictor.active else int(getattr(adapter.cfg, "predict_batch_size", 1) or 1)
        preds, times = {}, []
        for start in range(0, len(samples), batch):
            chunk = samples[start:start + batch]
            t0 = time.perf_counter()
            outs = predictor.batch(chunk)
            _sync(device)
            times += [(time.perf_counter() - t0) / len(chunk)] * len(chunk)
            preds.update({s.image_id: out for s, out in zip(chunk, outs)})
            bar(start + len(chunk), len(samples))
        bar.close()
        end_capture(adapter)
        write_predictions(pred_path, preds, dataset.classes, {"model": job.spec, "split": split["hash"]})
        # every pass (inverted, before merging) down to the raw floor: post-processing needs no inference
        write_raw_outputs(md.raw_outputs, predictor.raw, dataset.classes,
                          {"model": job.spec, "split": split["hash"], **predictor.raw_header(floor, pred_path)})
        raw_map_bytes = write_raw_maps(md, predictor.maps, {"model": job.spec})
        md.write_predict_done(PredictDone(
            images=len(samples), warmup_images=warmup,
            infer_ms_per_image=1000 * float(np.mean(times)) if times else None,
            infer_ms_per_image_median=1000 * float(np.median(times)) if times else None,
            io_ms_per_image=1000 * io_s / max(len(samples), 1),
            peak_rss_mb=_rss_mb(), cuda_peak_mb=_cuda_peak_mb(device), device=device,
            extra={"predict_batch_size": batch, **predictor.timing(),
                   **({"raw_map_bytes_per_image": raw_map_bytes} if raw_map_bytes else {})}))

    # ---- evaluate ----------------------------------------------------------------------
    if not md.has_metrics():
        md.write_status(Status(state="running", stage="evaluate", device=device))
        gt = {s.image_id: (s.instances, s.cell_type(dataset.classes)) for s in val}
        # a model that declares overlapping masks has them resolved by score; one that declares
        # none is held to it (an overlap is an error)
        # images of one sample/well are resampled together (the clustered bootstrap); the match
        # table is written before metrics.json, which marks the model finished
        res, table = evaluate_predictions(gt, preds, dataset.classes, resolve_overlaps=job.resolve_overlaps,
                                          max_dets=job.max_dets, seed=job.seed, return_matches=job.label,
                                          groups={s.image_id: s.group for s in val}, cluster="sample_id/well")
        table.write(md.matches, md.match_pairs)
        fit_t = md.read_fit_done().to_dict()
        pred_t = md.read_predict_done().to_dict()
        fit_t.pop("device", None)
        pred_t.pop("device", None)
        res["timings"] = {**{f"fit_{k}" if k.startswith(("peak", "cuda")) else k: v for k, v in fit_t.items()},
                          **{f"predict_{k}" if k.startswith(("peak", "cuda")) else k: v for k, v in pred_t.items()}}
        res["model"] = job.spec
        res["label"] = job.label
        res["device"] = device
        res["requested_device"] = job.requested_device or device
        res["fit"] = "skipped (not trainable)" if fit_t.get("skipped") else "trained"
        res["overlaps"] = "resolved by score" if job.resolve_overlaps else "none (checked)"
        res["capabilities"] = vars(cls.capabilities) | {"devices": list(cls.capabilities.devices)}
        res["framework"] = {"name": cls.framework, "version": avail.version}
        res["split_hash"] = split["hash"]
        res["seed"] = job.seed
        md.write_metrics(res)
    md.write_status(Status(state="done", device=device))  # a fresh status: no earlier error stays behind
    return EXIT_OK


def _save_checkpoint(adapter, md: ModelDir) -> None:
    """``checkpoint.tmp`` first, then renamed: a crash never leaves a half checkpoint."""
    tmp = md.checkpoint_tmp
    _rmtree(tmp)
    try:
        adapter.save(tmp)
    except OSError as e:  # a full disk, a quota: no half checkpoint stays behind, and the path is named
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, f"writing the checkpoint {tmp} failed: {e.strerror or e}") from None
    _rmtree(md.checkpoint)
    os.replace(tmp, md.checkpoint)


def _trim_logs(md: ModelDir, iteration: int, unit: str = "step") -> None:
    """A fit (re)starts at ``iteration``: its logs keep the records up to it (0: none), so a resumed
    fit's log reads as one fit's. ``unit``: the log field the checkpoint counts in (``step``, or
    ``epoch`` for an adapter that checkpoints per epoch and logs batches as steps: YOLO)."""
    from bench.util import atomic_write_text

    for path in (md.train_log, md.val_curve):
        if not path.is_file():
            continue
        kept = [line for line in path.read_text().splitlines() if iteration and _step(line, unit) <= iteration]
        if kept:
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        else:
            path.unlink()


def _step(line: str, unit: str = "step") -> float:
    """The step (or ``unit``) of one log line; a line cut short by a kill counts as past every checkpoint."""
    import json

    try:
        return float(json.loads(line).get(unit, 0))
    except (ValueError, AttributeError):
        return float("inf")


def _rmtree(p: Path) -> None:
    import shutil

    if p.exists():
        shutil.rmtree(p)


def _exit_with_parent() -> None:
    """The worker has its own session, so a runner killed outright (SIGKILL: no chance to forward
    anything) would leave it running and writing into a run folder nobody holds: it stops instead."""
    import signal
    import threading

    parent = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                print("the runner is gone: stopping", file=sys.stderr, flush=True)
                os.killpg(os.getpgrp(), signal.SIGKILL)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


if __name__ == "__main__":
    _exit_with_parent()
    import signal

    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # SLURM's time-limit warning is the job's (bench.executor.slurm)
    model_dir = ModelDir(Path(sys.argv[1]))
    try:
        code = main(model_dir.path)
    except BaseException as e:  # noqa: BLE001 - record every failure, then exit non-zero
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        model_dir.update_status(state="failed", error=f"{type(e).__name__}: {e}", traceback=tb[-4000:])
        code = EXIT_FAILED
    sys.exit(code)
