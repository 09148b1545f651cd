"""Named models: ``@register("maskrcnn")`` and ``build("cellpose:diam_mean=20")``.

Config = preset from ``configs/<name>.yaml`` + ``key=value`` options, validated by the
adapter's pydantic ``Config`` before anything trains.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from bench.adapters.base import Adapter, AdapterConfig

_REGISTRY: dict[str, type[Adapter]] = {}
# adapter modules import their framework lazily, so importing them all is cheap
_MODULES = ("watershed", "torchvision_maskrcnn", "cellpose", "mmdet_cascade", "detectron2_maskrcnn")
PRESETS = ("smoke", "default", "paper")


class ConfigError(ValueError):
    """A bad model spec or config: names the file or option and the problem."""


def register(name: str):
    def deco(cls: type[Adapter]) -> type[Adapter]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def _load_all() -> None:
    for m in _MODULES:
        try:
            importlib.import_module(f"bench.adapters.{m}")
        except ModuleNotFoundError as e:
            if e.name != f"bench.adapters.{m}":
                raise
    load_plugins()


def load_plugins() -> None:
    """Extra adapter modules (paths or module names) from CELLBENCH_PLUGINS, ':'-separated.

    The runner's subprocesses inherit the variable, so out-of-tree adapters (and the
    test suite's fake adapter) register there too.
    """
    import importlib.util
    import os
    import sys

    for item in filter(None, os.environ.get("CELLBENCH_PLUGINS", "").split(os.pathsep)):
        if item.endswith(".py"):
            name = f"cellbench_plugin_{Path(item).stem}"
            if name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(name, item)
            if spec is None or spec.loader is None:
                raise ConfigError(f"CELLBENCH_PLUGINS: cannot load {item}")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        else:
            importlib.import_module(item)


def registered() -> dict[str, type[Adapter]]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> type[Adapter]:
    reg = registered()
    if name not in reg:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(reg)}")
    return reg[name]


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'cellpose:diam_mean=20,epochs=5' -> ('cellpose', {'diam_mean': 20, 'epochs': 5})."""
    name, _, opts = spec.partition(":")
    out: dict[str, Any] = {}
    for item in filter(None, (o.strip() for o in opts.split(","))):
        if "=" not in item:
            raise ConfigError(f"model option {item!r} in {spec!r} is not key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v) if v.strip() else None
    return name.strip(), out


def split_specs(models: str) -> list[str]:
    """'cellpose:a=1,b=2,maskrcnn' -> ['cellpose:a=1,b=2', 'maskrcnn'] (options bind to the model before)."""
    specs: list[str] = []
    for part in (p.strip() for p in models.split(",")):
        if not part:
            continue
        if "=" in part.split(":")[0] and specs:
            specs[-1] += "," + part
        else:
            specs.append(part)
    return specs


def config_dir() -> Path:
    here = Path(__file__).resolve().parent.parent / "configs"
    return here


def preset_config(name: str, preset: str, config_root: Path | None = None) -> dict[str, Any]:
    path = (config_root or config_dir()) / f"{name}.yaml"
    if not path.is_file():
        return {}
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    presets = doc.get("presets", {})
    if preset not in presets:
        if preset == "paper" and "default" in presets:
            return dict(presets["default"] or {})
        raise ConfigError(f"{path}: no preset {preset!r} (has {', '.join(presets) or 'none'})")
    return dict(presets[preset] or {})


def make_config(name: str, preset: str = "default", overrides: dict[str, Any] | None = None,
                config_root: Path | None = None) -> AdapterConfig:
    cls = get(name)
    values = preset_config(name, preset, config_root)
    values.update(overrides or {})
    try:
        return cls.Config(**values)
    except ValidationError as e:
        where = (config_root or config_dir()) / f"{name}.yaml"
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '?'}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"model {name!r} (preset {preset!r}, {where} + options {overrides or {}}): {problems}") from None


def build(spec: str, classes, preset: str = "default", device: str = "cpu",
          config_root: Path | None = None) -> Adapter:
    """A ready adapter from 'name[:k=v,...]'."""
    name, opts = parse_spec(spec)
    cfg = make_config(name, preset, opts, config_root)
    return get(name)(cfg, classes, device)
