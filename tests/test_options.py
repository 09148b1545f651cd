"""Model options: the spec grammar (--models), --opt MODEL.KEY=VALUE and --set KEY=VALUE.

Config-level only: building a config does not import any framework, so these run everywhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bench.adapters import registry
from bench.adapters.registry import ConfigError, compose_specs, parse_spec, split_specs
from bench.cli import app


def _fields(name: str) -> set[str]:
    return set(registry.get(name).Config.model_fields)


def _configs(specs: list[str], preset: str = "smoke") -> dict[str, dict]:
    out = {}
    for s in specs:
        name, opts = parse_spec(s)
        out[name] = registry.make_config(name, preset, opts).model_dump()
    return out


def _output(res) -> str:
    try:
        return res.output + (res.stderr or "")
    except ValueError:  # older click: stderr mixed into output
        return res.output


# ---------------------------------------------------------------------------
# the grammar
# ---------------------------------------------------------------------------

def test_list_value_does_not_split_and_the_next_model_is_separate():
    specs = split_specs("maskrcnn-tv:lr_steps=[100,140],cellpose")
    assert specs == ["maskrcnn-tv:lr_steps=[100,140]", "cellpose"]
    assert parse_spec(specs[0]) == ("maskrcnn-tv", {"lr_steps": [100, 140]})
    assert _configs(specs)["maskrcnn-tv"]["lr_steps"] == [100, 140]
    # options still bind to the model before them, after a list too
    assert split_specs("a:k=v,k2=[1,2],b,c:k={x: 1}") == ["a:k=v,k2=[1,2]", "b", "c:k={x: 1}"]
    assert split_specs("cellpose:diam_mean=20,weights=/m:x,maskrcnn") == ["cellpose:diam_mean=20,weights=/m:x",
                                                                         "maskrcnn"]


def test_nested_dict_value():
    specs = split_specs("watershed,c:k={x: 1, y: [1, 2], z: {w: a}},b")
    assert specs == ["watershed", "c:k={x: 1, y: [1, 2], z: {w: a}}", "b"]
    assert parse_spec(specs[1]) == ("c", {"k": {"x": 1, "y": [1, 2], "z": {"w": "a"}}})


def test_quoted_strings_keep_their_commas():
    specs = split_specs("""watershed:weights="a,b.pt",cellpose:weights='c,d''s.pt',maskrcnn:weights=it's""")
    assert [parse_spec(s) for s in specs] == [("watershed", {"weights": "a,b.pt"}),
                                              ("cellpose", {"weights": "c,d's.pt"}),
                                              ("maskrcnn", {"weights": "it's"})]
    assert _configs(specs[:1])["watershed"]["weights"] == "a,b.pt"


def test_scalars_are_yaml():
    assert parse_spec("m:a=1,b=0.5,c=true,d=null,e=,f=text,g= 3 ") == (
        "m", {"a": 1, "b": 0.5, "c": True, "d": None, "e": None, "f": "text", "g": 3})


@pytest.mark.parametrize("models, needles", [
    ("maskrcnn-tv:lr_steps=[100,140", ["maskrcnn-tv", "lr_steps", "unclosed"]),
    ("cellpose,maskrcnn-tv:lr_steps=[100,140]],watershed", ["maskrcnn-tv", "lr_steps", "closes nothing"]),
    ("maskrcnn-tv:k={x: 1],cellpose", ["maskrcnn-tv", "'k'"]),
    ("maskrcnn-tv:eval_every=1,lr_steps", ["maskrcnn-tv", "lr_steps", "key=value"]),
    ("cellpose:=5", ["cellpose", "empty key"]),
    ("cellpose:diam_mean=@x", ["cellpose", "diam_mean", "YAML"]),
    ('cellpose:weights="a,b', ["cellpose", "weights", "quote"]),
    ("cellpose:eval_every=1,eval_every=2", ["cellpose", "eval_every", "twice"]),
    ("eval_every=1,cellpose", ["eval_every", "before any model"]),
])
def test_malformed_specs_are_config_errors_naming_model_and_key(models, needles):
    with pytest.raises(ConfigError) as e:
        compose_specs(models)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        compose_specs("cellpose,nope")
    # a forgotten '=' after an option reads as a model name: the message says both
    with pytest.raises(ConfigError, match=r"model 'cellpose': option 'oops' is not key=value.*unknown model"):
        compose_specs("cellpose:eval_every=1,oops")


def test_labels_of_list_options_stay_folder_safe():
    from bench.store import model_label

    label = model_label("maskrcnn-tv:lr_steps=[100,140]")
    assert label.startswith("maskrcnn-tv--lr_steps=") and "/" not in label


# ---------------------------------------------------------------------------
# --opt MODEL.KEY=VALUE
# ---------------------------------------------------------------------------

def test_opt_merges_over_the_spec_options():
    specs = compose_specs("maskrcnn-tv:lr_steps=[100,140],eval_every=2,cellpose",
                          opts=["maskrcnn-tv.lr_steps=[50, 60]", "maskrcnn-tv.weights=/w/a,b.pt"])
    assert specs[1] == "cellpose"  # untouched specs stay as given (same label)
    name, opts = parse_spec(specs[0])
    assert (name, opts) == ("maskrcnn-tv", {"lr_steps": [50, 60], "eval_every": 2, "weights": "/w/a,b.pt"})
    cfg = _configs(specs)["maskrcnn-tv"]
    assert cfg["lr_steps"] == [50, 60] and cfg["eval_every"] == 2 and cfg["weights"] == "/w/a,b.pt"
    # what the runner re-splits is the same list
    assert split_specs(",".join(specs)) == specs
    # a later --opt for the same key wins
    assert parse_spec(compose_specs("cellpose", opts=["cellpose.eval_every=1", "cellpose.eval_every=4"])[0])[1] == {
        "eval_every": 4}


def test_opt_for_a_model_not_in_models_or_a_missing_key_is_an_error():
    with pytest.raises(ConfigError, match="'cascade' is not among the models"):
        compose_specs("maskrcnn-tv,cellpose", opts=["cascade.eval_every=1"])
    with pytest.raises(ConfigError, match="cellpose has no option 'no_such_key'"):
        compose_specs("maskrcnn-tv,cellpose", opts=["cellpose.no_such_key=1"])
    with pytest.raises(ConfigError, match="MODEL.KEY=VALUE"):
        compose_specs("cellpose", opts=["eval_every=1"])
    with pytest.raises(ConfigError, match="MODEL.KEY=VALUE"):
        compose_specs("cellpose", opts=["cellpose.eval_every"])
    with pytest.raises(ConfigError, match="unclosed"):
        compose_specs("maskrcnn-tv", opts=["maskrcnn-tv.lr_steps=[1,2"])


# ---------------------------------------------------------------------------
# --set KEY=VALUE
# ---------------------------------------------------------------------------

def test_set_applies_to_every_model():
    models = ["maskrcnn-tv", "cellpose", "watershed", "cascade", "maskrcnn"]
    specs = compose_specs("maskrcnn-tv,cellpose:eval_every=3,watershed,cascade,maskrcnn",
                          opts=["cascade.eval_every=11"], sets=["eval_every=7", "weights=/w/x.pt"])
    cfgs = _configs(specs)
    assert list(cfgs) == models
    # precedence: --set < the spec's own < --opt
    assert {m: c["eval_every"] for m, c in cfgs.items()} == {"maskrcnn-tv": 7, "cellpose": 3, "watershed": 7,
                                                             "cascade": 11, "maskrcnn": 7}
    assert {c["weights"] for c in cfgs.values()} == {"/w/x.pt"}


def test_set_with_a_key_some_models_lack_names_them():
    models = ["maskrcnn-tv", "cellpose", "watershed", "cascade", "maskrcnn"]
    # a key that cellpose has and watershed (no training) lacks, whatever the names are today
    key = sorted(_fields("cellpose") - _fields("watershed"))[0]
    lacking = [m for m in models if key not in _fields(m)]
    having = [m for m in models if m not in lacking]
    with pytest.raises(ConfigError) as e:
        compose_specs(",".join(models), sets=[f"{key}=1"])
    msg = str(e.value)
    assert f"--set {key}=1" in msg
    for m in lacking:
        assert f"{m} has no option {key!r}" in msg
    for m in having:
        assert f"{m} has no option" not in msg
    assert "it has" in msg  # what the model does have
    # only models that have it: fine
    specs = compose_specs(",".join(having), sets=[f"{key}=1"])
    assert all(parse_spec(s)[1] == {key: 1} for s in specs)


def test_set_is_key_value():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        compose_specs("cellpose", sets=["eval_every"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        compose_specs("cellpose", sets=["=3"])


# ---------------------------------------------------------------------------
# sweeps: --set on every variant run, --opt per model
# ---------------------------------------------------------------------------

def _sweep(tmp_path: Path) -> Path:
    doc = {"name": "opts", "base": {"model": "maskrcnn-tv", "preset": "smoke", "options": {"eval_every": 5}},
           "variants": {"base": {}, "steps": {"options": {"lr_steps": [10, 20]}},
                        "cp": {"model": "cellpose"}, "ws": {"model": "watershed"}}}
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def test_sweep_set_errors_when_any_model_of_the_plan_lacks_the_key(tmp_path):
    from bench.sweep import load_sweep, validate_plan

    path = _sweep(tmp_path)
    cfg = load_sweep(path)
    key = sorted(_fields("cellpose") - _fields("watershed"))[0]
    with pytest.raises(ConfigError, match=f"watershed has no option '{key}'"):
        validate_plan(cfg, path, list(cfg.variants), None, {key: 1})
    # without the watershed variant the check is about the models that run
    plan = [v for v in cfg.variants if v != "ws" and key in _fields(cfg.variants[v].model or "maskrcnn-tv")]
    validate_plan(cfg, path, plan, None, {key: 1})


def test_sweep_set_and_opt_layering(tmp_path):
    from bench.sweep import load_sweep, parse_opts, parse_sets, validate_plan, variant_options

    path = _sweep(tmp_path)
    cfg = load_sweep(path)
    sets = parse_sets(["eval_every=9", "weights=/w.pt"])
    opts = parse_opts(["cellpose.eval_every=4", "maskrcnn-tv.lr_steps=[7,8]"])
    assert opts == {"cellpose": {"eval_every": 4}, "maskrcnn-tv": {"lr_steps": [7, 8]}}
    validate_plan(cfg, path, list(cfg.variants), None, sets, opts)
    got = {v: variant_options(cfg, v, sets, opts) for v in cfg.variants}
    assert {v: o["eval_every"] for v, o in got.items()} == {"base": 9, "steps": 9, "cp": 4, "ws": 9}
    assert got["steps"]["lr_steps"] == [7, 8] and got["base"]["lr_steps"] == [7, 8]
    assert all(o["weights"] == "/w.pt" for o in got.values())
    with pytest.raises(ConfigError, match="'cascade' is not among the models"):
        validate_plan(cfg, path, list(cfg.variants), None, {}, parse_opts(["cascade.eval_every=1"]))
    with pytest.raises(ConfigError, match="'cellpose' is not among the models"):
        validate_plan(cfg, path, ["base"], None, {}, opts)


# ---------------------------------------------------------------------------
# the command line: error: ... and exit code 2, never a traceback
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("args, needles", [
    (["--models", "maskrcnn-tv:lr_steps=[100,140"], ["maskrcnn-tv", "lr_steps"]),
    (["--models", "maskrcnn-tv:lr_steps=[100,140],cellpose:diam_mean=@"], ["cellpose", "diam_mean"]),
    (["--models", "cellpose,nope"], ["nope"]),
    (["--models", "cellpose", "--opt", "nope.eval_every=1"], ["nope"]),
    (["--models", "cellpose", "--opt", "cellpose.nokey=1"], ["cellpose", "nokey"]),
    (["--models", "cellpose,watershed", "--set", "nokey=1"], ["cellpose", "watershed", "nokey"]),
])
def test_cli_run_config_errors_exit_2(args, needles, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["run", *args, "--out", str(tmp_path / "run")])
    out = _output(res)
    assert res.exit_code == 2, out
    assert "error:" in out and "Traceback" not in out
    for n in needles:
        assert n in out, (n, out)
    assert not (tmp_path / "run").exists() and not (tmp_path / "results").exists()


def test_cli_run_passes_composed_specs(tmp_path, monkeypatch):
    import bench.runner.run as run_mod

    seen = {}

    def fake_run_benchmark(models, *a, **k):
        seen["models"] = models
        return tmp_path, []

    monkeypatch.setattr(run_mod, "run_benchmark", fake_run_benchmark)
    monkeypatch.setattr(run_mod, "summary_table", lambda outcomes: "")
    res = CliRunner().invoke(app, ["run", "--models", "maskrcnn-tv:lr_steps=[100,140],cellpose,watershed",
                                   "--opt", "maskrcnn-tv.lr_steps=[50,60]", "--set", "eval_every=3"])
    assert res.exit_code == 0, _output(res)
    assert [parse_spec(s) for s in seen["models"]] == [("maskrcnn-tv", {"lr_steps": [50, 60], "eval_every": 3}),
                                                       ("cellpose", {"eval_every": 3}),
                                                       ("watershed", {"eval_every": 3})]


def test_cli_sweep_set_lacking_exits_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    key = sorted(_fields("cellpose") - _fields("watershed"))[0]
    res = CliRunner().invoke(app, ["sweep", str(_sweep(tmp_path)), "--set", f"{key}=1", "--no-report",
                                   "--out", str(tmp_path / "sw")])
    out = _output(res)
    assert res.exit_code == 2, out
    assert "error:" in out and f"watershed has no option '{key}'" in out and "Traceback" not in out
    assert not (tmp_path / "sw").exists()


def test_a_spec_key_the_model_lacks_is_named():
    with pytest.raises(ConfigError, match="cellpose has no option 'nokey' \\(it has .*eval_every"):
        compose_specs("watershed,cellpose:nokey=1")


def test_options_after_a_bare_name_bind_to_it_and_labels_stay_names():
    assert split_specs("cellpose,eval_every=3,watershed") == ["cellpose:eval_every=3", "watershed"]
    # run labels (bench tune --models) are not options
    assert split_specs("fake--mode=drop_half,cellpose--eval_every=3") == ["fake--mode=drop_half",
                                                                          "cellpose--eval_every=3"]
