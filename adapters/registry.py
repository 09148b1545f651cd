"""Named models: ``@register("maskrcnn")`` and ``build("cellpose:diam_mean=20")``.

Config = preset from ``configs/<name>.yaml`` + ``key=value`` options, validated by the
adapter's pydantic ``Config`` before anything trains.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from bench.adapters.base import Adapter, AdapterConfig

_REGISTRY: dict[str, type[Adapter]] = {}
# adapter modules import their framework lazily, so importing them all is cheap
_MODULES = ("watershed", "torchvision_maskrcnn", "cellpose", "mmdet_cascade", "detectron2_maskrcnn",
            "stardist", "ultralytics_yolo")
PRESETS = ("smoke", "cpu", "default", "paper")


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


# ---------------------------------------------------------------------------
# model specs: 'name[:key=value,...]' (values are YAML), ','-separated lists of them
# ---------------------------------------------------------------------------

_CLOSE = {"[": "]", "{": "}"}
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _split_top(text: str) -> list[tuple[str, str | None]]:
    """Split at the commas outside brackets and quotes: [(part, problem or None)].

    A quote opens a quoted string only where YAML would (at the start of a value or of a
    flow item), so ``it's`` stays a plain word. A problem (a bracket that never closes or
    closes the wrong one, an unterminated quote) is reported on the part it is in; the
    caller names the model and key.
    """
    parts: list[tuple[str, str | None]] = []
    buf: list[str] = []
    stack: list[str] = []
    quote: str | None = None
    problem: str | None = None
    prev = ""  # last non-space character outside quotes (or "" at a part's start)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if quote:
            buf.append(c)
            if quote == '"' and c == "\\" and i + 1 < n:
                buf.append(text[i + 1])
                i += 1
            elif c == quote:
                if quote == "'" and i + 1 < n and text[i + 1] == "'":  # '' inside '...'
                    buf.append("'")
                    i += 1
                else:
                    quote, prev = None, c
            i += 1
            continue
        if c == "," and not stack:
            parts.append(("".join(buf), problem))
            buf, problem, prev = [], None, ""
            i += 1
            continue
        buf.append(c)
        if c in "\"'" and prev in ("", "=", "[", "{", ",", ":"):
            quote = c
        elif c in _CLOSE:
            stack.append(c)
        elif c in "]}":
            if not stack or _CLOSE[stack[-1]] != c:
                problem = problem or (f"{c!r} closes nothing" if not stack
                                      else f"{c!r} where {_CLOSE[stack[-1]]!r} was expected")
                if stack:
                    stack.pop()
            else:
                stack.pop()
        if not c.isspace():
            prev = c
        i += 1
    if quote:
        problem = problem or f"unterminated quote {quote}"
    elif stack:
        problem = problem or f"unclosed {stack[-1]!r} (missing {_CLOSE[stack[-1]]!r})"
    parts.append(("".join(buf), problem))
    return parts


def _is_option(part: str) -> bool:
    """'key=...' (an option of the model before) rather than 'name' or 'name:key=...'."""
    eq, colon = part.find("="), part.find(":")
    if eq < 0 or 0 <= colon < eq:
        return False
    key = part[:eq].strip()
    return not key or bool(_KEY.match(key))  # not a model label such as 'cellpose--diam_mean=20'


def _join(spec: str, option: str) -> str:
    return spec + ("," if ":" in spec else ":") + option


def _parse_value(raw: str, where: str) -> Any:
    if not raw.strip():
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        why = str(getattr(e, "problem", None) or e).strip()
        raise ConfigError(f"{where}: value {raw.strip()!r} is not valid YAML ({why})") from None


def _spec_items(spec: str) -> tuple[str, dict[str, tuple[str, Any]]]:
    """'name:k=v,...' -> (name, {key: (value text, value)}); every problem a ConfigError naming model and key."""
    name, colon, opts = spec.partition(":")
    name = name.strip()
    if not name:
        raise ConfigError(f"model spec {spec!r} has no model name before ':'")
    items: dict[str, tuple[str, Any]] = {}
    if not colon:
        return name, items
    for part, problem in _split_top(opts):
        if not part.strip():
            if problem:
                raise ConfigError(f"model {name!r}: {problem} in {spec!r}")
            continue
        key, eq, raw = part.partition("=")
        key = key.strip()
        if not eq:
            raise ConfigError(f"model {name!r}: option {part.strip()!r} is not key=value (in {spec!r})")
        if not key:
            raise ConfigError(f"model {name!r}: option {part.strip()!r} has an empty key (in {spec!r})")
        where = f"model {name!r}, option {key!r}"
        if not _KEY.match(key):
            raise ConfigError(f"{where}: not a valid option name (in {spec!r})")
        if problem:
            raise ConfigError(f"{where}: {problem} in {raw.strip()!r}")
        if key in items:
            raise ConfigError(f"{where}: given twice (in {spec!r})")
        items[key] = (raw.strip(), _parse_value(raw, where))
    return name, items


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'cellpose:diam_mean=20,lr_steps=[100,140]' -> ('cellpose', {'diam_mean': 20, 'lr_steps': [100, 140]}).

    Values are YAML (scalars and flow collections: ``[1,2]``, ``{x: 1}``, ``"a,b"``); commas
    inside brackets and quotes do not separate options. A malformed option is a
    :class:`ConfigError` naming the model and the key. The name is not looked up here.
    """
    name, items = _spec_items(spec)
    return name, {k: v for k, (_, v) in items.items()}


def split_specs(models: str) -> list[str]:
    """'cellpose:a=1,b=[1,2],maskrcnn' -> ['cellpose:a=1,b=[1,2]', 'maskrcnn'].

    Options bind to the model before them; commas inside brackets and quotes do not
    split. Every spec is checked with :func:`parse_spec` (a ConfigError names model and key).
    """
    specs: list[str] = []
    for part, problem in _split_top(models):
        if not part.strip():
            continue
        if _is_option(part):
            if not specs:
                raise ConfigError(f"option {part.strip()!r} comes before any model name (in {models!r})")
            specs[-1] = _join(specs[-1], part)
        else:
            specs.append(part.strip())
        if problem:  # the rest of the text is in this part; parse_spec names the model and key
            name, _ = _spec_items(specs[-1])
            raise ConfigError(f"model {name!r}: {problem} in {part.strip()!r}")
    for s in specs:
        _spec_items(s)
    return specs


def format_value(value: Any, raw: str | None = None) -> str:
    """Text for ``value`` in a spec that :func:`parse_spec` reads back as ``value`` (``raw`` if it does)."""
    flow = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    for text in ([raw.strip()] if raw is not None else []) + [json.dumps(value), flow.removesuffix("...").strip()]:
        parts = _split_top(text)
        if len(parts) != 1 or parts[0][1]:
            continue
        try:
            back = _parse_value(text, "")
        except ConfigError:
            continue
        if type(back) is type(value) and back == value:
            return text
    raise ConfigError(f"value {value!r} cannot be written as a model option")


def parse_assignment(item: str, flag: str) -> tuple[str, str, Any]:
    """'KEY=VALUE' (``--set``) or 'MODEL.KEY=VALUE' (``--opt``) -> (left side, value text, value)."""
    left, eq, raw = item.partition("=")
    left = left.strip()
    form = "MODEL.KEY=VALUE" if flag == "--opt" else "KEY=VALUE"
    if not eq or not left:
        raise ConfigError(f"{flag} {item!r} is not {form}")
    problems = [p for _, p in _split_top(raw) if p]
    if problems:
        raise ConfigError(f"{flag} {item!r}: {problems[0]}")
    return left, raw.strip(), _parse_value(raw, f"{flag} {left}")


def option_names(name: str) -> list[str]:
    """The options model ``name`` takes: the fields of its pydantic Config."""
    return sorted(get(name).Config.model_fields)


def _no_option(name: str, key: str) -> str:
    return f"{name} has no option {key!r} (it has {', '.join(option_names(name))})"


def parse_opts(items: list[str], models: list[str] | None = None) -> dict[str, dict[str, tuple[str, Any]]]:
    """Repeated ``--opt MODEL.KEY=VALUE`` -> {model: {key: (value text, value)}} (a later one wins).

    With ``models``, MODEL must be one of them and KEY one of its options (:func:`check_opts`).
    """
    out: dict[str, dict[str, tuple[str, Any]]] = {}
    for item in items:
        left, raw, value = parse_assignment(item, "--opt")
        model, dot, key = left.rpartition(".")
        model, key = model.strip(), key.strip()
        if not dot or not model or not key:
            raise ConfigError(f"--opt {item!r} is not MODEL.KEY=VALUE")
        if not _KEY.match(key):
            raise ConfigError(f"--opt {item!r}: {key!r} is not a valid option name")
        out.setdefault(model, {})[key] = (raw, value)
    if models is not None:
        check_opts(out, models)
    return out


def check_opts(opts: dict[str, dict[str, Any]], models: list[str]) -> None:
    """``--opt`` names one of ``models`` and an option it has, else a ConfigError naming it."""
    for model, kv in opts.items():
        if model not in models:
            raise ConfigError(f"--opt {model}.{next(iter(kv), '')}: model {model!r} is not among the models "
                              f"({', '.join(dict.fromkeys(models)) or 'none'})")
        for key in kv:
            if key not in get(model).Config.model_fields:
                raise ConfigError(f"--opt {model}.{key}: {_no_option(model, key)}")


def parse_sets(items: list[str]) -> dict[str, tuple[str, Any]]:
    """Repeated ``--set KEY=VALUE`` -> {key: (value text, value)} (a later one wins)."""
    out: dict[str, tuple[str, Any]] = {}
    for item in items:
        key, raw, value = parse_assignment(item, "--set")
        if not _KEY.match(key):
            raise ConfigError(f"--set {item!r}: {key!r} is not a valid option name")
        out[key] = (raw, value)
    return out


def check_sets(sets: dict[str, Any], models: list[str]) -> None:
    """``--set`` applies to every model: a key that any of ``models`` lacks is an error naming them."""
    problems = []
    for key, v in sets.items():
        lacking = [m for m in dict.fromkeys(models) if key not in get(m).Config.model_fields]
        if lacking:
            raw = v[0] if isinstance(v, tuple) else format_value(v)
            problems.append(f"--set {key}={raw}: " + "; ".join(_no_option(m, key) for m in lacking))
    if problems:
        raise ConfigError("\n".join(problems) + "\n(--set is for options every model has; "
                          "--opt MODEL.KEY=VALUE sets one model's)")


def compose_specs(models: str | list[str], opts: list[str] = (), sets: list[str] = ()) -> list[str]:
    """The specs of ``--models`` with ``--set`` and ``--opt`` folded in, every name and key checked.

    Precedence, most specific last: the preset, ``--set KEY=VALUE`` (every model), the spec's
    own ``key=value``, ``--opt MODEL.KEY=VALUE``. A spec that nothing changes is kept as given
    (its label stays the same); one that changes is rewritten ``name:k=v,...`` so that its
    label names its options.
    """
    text = models if isinstance(models, str) else ",".join(models)
    specs = split_specs(text)
    if not specs:
        raise ConfigError("no models given")
    parsed = [_spec_items(s) for s in specs]
    known = registered()
    for i, (name, _) in enumerate(parsed):
        if name not in known:
            if i and ":" in specs[i - 1] and ":" not in specs[i]:  # likely an option without '='
                raise ConfigError(f"model {parsed[i - 1][0]!r}: option {name!r} is not key=value, and "
                                  f"{name!r} is not a model either (unknown model; known models: "
                                  f"{', '.join(known)})")
            raise ConfigError(f"unknown model {name!r}; known models: {', '.join(known)}")
    for spec, (name, items) in zip(specs, parsed):
        bad = [k for k in items if k not in known[name].Config.model_fields]
        if bad:
            raise ConfigError(f"--models {spec!r}: {_no_option(name, bad[0])}")
    names = [n for n, _ in parsed]
    per_model = parse_opts(list(opts), names)
    set_items = parse_sets(list(sets))
    check_sets(set_items, names)
    out = []
    for spec, (name, items) in zip(specs, parsed):
        merged = {k: v for k, v in set_items.items() if k not in items}
        merged = {**items, **merged}
        merged.update(per_model.get(name, {}))
        if merged == items:
            out.append(spec)
            continue
        out.append(name + ":" + ",".join(f"{k}={format_value(v, raw)}" for k, (raw, v) in merged.items()))
    return out


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
        cfg = cls.Config(**values)
    except ValidationError as e:
        where = (config_root or config_dir()) / f"{name}.yaml"
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '?'}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"model {name!r} (preset {preset!r}, {where} + options {overrides or {}}): {problems}") from None
    _check_tta(name, cls, cfg)
    return cfg


def _check_tta(name: str, cls: type[Adapter], cfg: AdapterConfig) -> None:
    """A ``tta`` the adapter cannot invert (its declared ``capabilities.tta``) is refused here,
    before anything trains."""
    from bench.tta import check_supported

    try:
        check_supported(name, cls.tta_capabilities(cfg), getattr(cfg, "tta", "none"))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build(spec: str, classes, preset: str = "default", device: str = "cpu",
          config_root: Path | None = None) -> Adapter:
    """A ready adapter from 'name[:k=v,...]'."""
    name, opts = parse_spec(spec)
    cfg = make_config(name, preset, opts, config_root)
    return get(name)(cfg, classes, device)
