"""Where each model runs, decided before anything is spawned, from the adapters' declared capabilities.

``bench run`` and ``bench predict`` use the same rules:

* ``auto`` is ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda``/``cuda:N`` must exist
  (``cuda:N`` keeps its index everywhere: the worker, the manifest, the GPU's name);
* a model whose ``devices`` include the asked kind runs there; one that lists ``cpu``
  (e.g. watershed) runs on the CPU and says so; one that can run on neither is refused;
* ``needs_weights`` without a ``weights`` file configured is refused;
* ``trainable=False``: nothing to fit, the fit stage is recorded as skipped;
* ``overlapping_masks``: the evaluator resolves overlaps (each pixel to the best score);
  a model that declares none is held to it (an overlap is an error, not silently fixed).
"""

from __future__ import annotations

from bench.adapters.registry import ConfigError
from bench.store import DevicePlan


class DeviceError(ConfigError):
    """A model cannot run where it was asked to (refused before anything trains)."""


def _cuda_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` if torch sees a GPU else ``cpu``; ``cuda[:N]`` checked to exist."""
    device = (device or "auto").strip().lower()
    if device == "auto":
        return "cuda" if _cuda_count() > 0 else "cpu"
    kind, _, index = device.partition(":")
    if kind == "cuda":
        n = _cuda_count()
        if n == 0:
            raise RuntimeError(f"--device {device} asked for, but torch sees no CUDA device")
        if index:
            if not index.isdigit():
                raise ValueError(f"--device {device}: the index must be a number (cuda:0, cuda:1, ...)")
            if int(index) >= n:
                raise RuntimeError(f"--device {device} asked for, but torch sees {n} CUDA device(s) "
                                   f"(cuda:0 to cuda:{n - 1})")
        return device
    if kind == "cpu" and not index:
        return "cpu"
    if kind == "mps" and not index:
        return "mps"
    raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")


def plan_model(name: str, capabilities, requested: str, config: dict | None = None) -> DevicePlan:
    """Where the adapter ``name`` with ``capabilities`` runs when ``requested`` (resolved) is asked.

    Pure (no torch): raises :class:`DeviceError` when the model cannot run as asked."""
    config = config or {}
    kind = requested.split(":")[0]
    devices = tuple(capabilities.devices)
    if kind in devices:
        device, note = requested, ""
    elif "cpu" in devices:
        device, note = "cpu", f"runs on cpu: {name} declares devices {', '.join(devices)} (asked {requested})"
    else:
        raise DeviceError(f"{name} cannot run on {requested} and has no CPU fallback (declares devices "
                          f"{', '.join(devices) or 'none'}): choose --device {devices[0] if devices else '?'} "
                          "or drop the model")
    if capabilities.needs_weights and not config.get("weights"):
        raise DeviceError(f"{name} needs a weights file and none is configured: give it as "
                          f"{name}:weights=/path/to/file (cellbench never downloads weights)")
    fit = "train" if capabilities.trainable else "skip"
    if fit == "skip":
        note = "; ".join(filter(None, [note, f"{name} is not trainable: fit skipped"]))
    return DevicePlan(device=device, requested=requested, fit=fit,
                      resolve_overlaps=bool(capabilities.overlapping_masks), note=note)
