"""The typed config: the schema's defaults, strict types, choice fields checked against the
tables that implement them, and one command-line style with one error path in every tool."""

import dataclasses
import glob
import os
import re
import subprocess
import sys

import pytest

from llama_jax import config
from llama_jax.config import ConfigError, ModelConfig, RunConfig, load
from llama_jax.model.attention import IMPLEMENTATIONS
from llama_jax.model.remat import REMAT_POLICIES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = f"{ROOT}/configs/tiny.py"


def test_schema_defaults_are_the_typed_defaults():
    """configs/base.py (what users read) and the dataclass defaults cannot drift apart."""
    assert load(f"{ROOT}/configs/base.py") == RunConfig()


@pytest.mark.parametrize(
    "path", sorted(p for p in glob.glob(f"{ROOT}/configs/*.py") if not p.endswith("__init__.py"))
)
def test_every_config_file_builds(path):
    cfg = load(path)
    assert isinstance(cfg.model, ModelConfig) and RunConfig.from_dict(cfg.to_dict()) == cfg


def test_types_are_checked_and_ints_widen_to_floats():
    d = RunConfig().to_dict()
    d["train"]["lr"] = 1  # an int where a float is expected is fine
    assert RunConfig.from_dict(d).train.lr == 1.0 and isinstance(
        RunConfig.from_dict(d).train.lr, float
    )
    for group, field, bad in [
        ("model", "dim", "64"),
        ("train", "steps", 2.5),
        ("train", "batch_size", True),
        ("checkpoint", "async_save", 1),
    ]:
        d = RunConfig().to_dict()
        d[group][field] = bad
        with pytest.raises(ConfigError, match=f"{group}.{field}="):
            RunConfig.from_dict(d)


@pytest.mark.parametrize(
    "field, table",
    [
        ("remat_policy", REMAT_POLICIES),
        ("attention_impl", IMPLEMENTATIONS),
        ("dtype", config.DTYPES),
        ("param_dtype", config.DTYPES),
    ],
)
def test_choice_fields_are_checked_against_their_table(field, table):
    """ModelConfig(remat_policy="x") no longer constructs: the error lists the table's names."""
    with pytest.raises(ConfigError) as e:
        ModelConfig(**{field: "x"})
    assert all(name in str(e.value) for name in table), str(e.value)


def test_replace_parses_strings_and_refuses_unknown_fields():
    cfg = load(TINY)
    new = cfg.replace(["train.lr=1e-2", "train.skip_nonfinite=true", "model.n_layers=2"])
    assert (new.train.lr, new.train.skip_nonfinite, new.model.n_layers) == (1e-2, True, 2)
    assert cfg.diff(new) == {
        "train.lr": (3e-3, 1e-2),
        "train.skip_nonfinite": (False, True),
        "model.n_layers": (4, 2),
    }
    assert cfg.model.n_layers == 4  # frozen: the original is untouched
    with pytest.raises(KeyError, match="'model.dimm'; valid in model: .*'dim'"):
        cfg.replace(["model.dimm=3"])
    with pytest.raises(ConfigError, match="config field train.steps: invalid literal"):
        cfg.replace(["train.steps=many"])
    with pytest.raises(ConfigError, match="train.seq_len=256 exceeds model.max_seq_len=128"):
        cfg.replace({"train.seq_len": 256})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0


# ---- one command-line style and one error path across the tools ---------------------------

# Each tool with the arguments it needs besides the config (module, argv before the config).
TOOLS = {
    "train": ("launch.train", ["--workdir", "/nonexistent/never-written"]),
    "inspect": ("launch.inspect", []),
    "benchmark": ("launch.benchmark", ["step"]),
    "ablate": (
        "launch.ablate",
        [
            "--vary",
            "model.norm=rmsnorm",
            "--tokens",
            "1k",
            "--workdir",
            "/nonexistent/never-written",
        ],
    ),
    "convert": (
        "launch.convert",
        ["--from", "hf", "--to", "ours", "--input", "/nonexistent", "--output", "/nonexistent/out"],
    ),
}
CASES = {
    "misspelt field": (
        ["--config.model.dimm=3"],
        "unknown config field 'model.dimm'; valid in model:",
    ),
    "bad value": (["--config.model.n_layers=two"], "config field model.n_layers: invalid literal"),
}


def _run_in_process(module: str, argv: list[str], capsys) -> tuple[int, str]:
    import importlib

    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_tool_gives_the_same_one_line_error(case, capsys):
    overrides, want = CASES[case]
    seen = {}
    for tool, (module, args) in TOOLS.items():
        config_args = [] if tool == "convert" else ["--config", TINY]  # convert: model fields only
        code, err = _run_in_process(module, [*args, *config_args, *overrides], capsys)
        assert code == 2, (tool, code, err)
        assert err.count("\n") == 1 and err.startswith("error: ") and want in err, (tool, err)
        seen[tool] = err
    assert len(set(seen.values())) == 1, seen  # word for word the same line


def test_missing_config_file_is_the_same_error_everywhere(capsys):
    errs = set()
    for tool, (module, args) in TOOLS.items():
        if tool == "convert":  # the model config comes from the weights: no config file
            continue
        code, err = _run_in_process(module, [*args, "--config", f"{ROOT}/configs/nope.py"], capsys)
        assert code == 2 and err.count("\n") == 1 and "config file not found" in err, (tool, err)
        errs.add(err)
    assert len(errs) == 1, errs


@pytest.mark.slow
def test_the_real_command_line():
    """The same from a shell: a subprocess, space-separated override values, exit status 2."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.inspect",
            "--config",
            TINY,
            "--config.model.n_layers",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert '"parameters"' in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "launch.train", "--config", TINY, "--config.train.stepz=3"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2 and r.stderr.strip().startswith(
        "error: UnknownFieldError: unknown config field 'train.stepz'"
    )


def test_overriding_n_heads_keeps_a_config_multi_head():
    """n_kv_heads -1 (= n_heads) stays -1 in the config, so an override of n_heads alone gives
    multi-head attention, not grouped-query attention against the file's head count."""
    cfg = load(f"{ROOT}/configs/llama_7b.py", ["model.n_heads=16"])
    assert (cfg.model.n_kv_heads, cfg.model.kv_heads) == (-1, 16)
    assert load(f"{ROOT}/configs/llama_7b.py", ["model.n_heads=64"]).model.kv_heads == 64


def test_an_error_inside_a_config_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "configs" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("def get_config():\n    raise RuntimeError('no such size')\n")
    with pytest.raises(ConfigError, match="config file .*bad.py: RuntimeError: no such size"):
        load(str(bad))
    code, err = _run_in_process("launch.inspect", ["--config", str(bad)], capsys)
    assert code == 2 and err.count("\n") == 1 and "no such size" in err


@pytest.mark.slow
@pytest.mark.parametrize("field", ["norm", "norm_placement", "mlp", "position"])
def test_every_switch_value_changes_the_model(field):
    """The ablation switches are checked against config.MODEL_CHOICES; every listed value must
    reach a branch of its own in model/llama.py (no value silently taking another's path)."""
    import jax
    import jax.numpy as jnp

    from llama_jax.model.llama import Llama

    base = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16,
                       max_seq_len=16, dtype="float32", attention_impl="reference")  # fmt: skip
    tokens = jnp.arange(12)[None] % 64
    outs = {}
    for value in config.MODEL_CHOICES[field][1]:
        model = Llama(dataclasses.replace(base, **{field: value}))
        params = model.init(jax.random.key(0), tokens)
        outs[value] = jax.numpy.asarray(model.apply(params, tokens))
    values = list(outs)
    for i, a in enumerate(values):
        for b in values[i + 1 :]:
            assert not jnp.allclose(outs[a], outs[b]), (
                f"model.{field}: {a} and {b} give the same logits"
            )


BAD_VALUE = {  # a value each rule refuses (and the boundary it sits at)
    ">= 1": 0, ">= 0": -1, "> 0": 0, ">= -1": -2, "-1 or >= 1": 0, "-1 or > 0": 0,
    "in [0, 1]": 1.5, "in [0, 1)": 1.0,
}  # fmt: skip
RANGED = [(g, f, rule) for g, cls in config.GROUPS.items() for f, rule in cls.RANGES.items()
          if rule != "any"]  # fmt: skip


def test_every_numeric_field_has_a_range():
    for group, cls in config.GROUPS.items():
        for f in dataclasses.fields(cls):
            if f.type in ("int", "float"):
                assert f.name in cls.RANGES, f"{group}.{f.name} has no range rule"


@pytest.mark.parametrize("group, field, rule", RANGED, ids=[f"{g}.{f}" for g, f, _ in RANGED])
def test_out_of_range_values_are_refused(group, field, rule):
    """Each numeric field, one value just outside its rule: a one-line error naming the field
    and the rule (train.batch_size=0 used to train with loss 0.0, train.lr=-1 to climb)."""
    d = RunConfig().to_dict()
    d[group][field] = BAD_VALUE[rule]
    if isinstance(getattr(RunConfig(), group).__dataclass_fields__[field].default, float):
        d[group][field] = float(d[group][field])
    with pytest.raises(ConfigError, match=f"{group}.{field}=.*must be {re.escape(rule)}"):
        RunConfig.from_dict(d)
