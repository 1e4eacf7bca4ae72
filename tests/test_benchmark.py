"""The benchmark suite on CPU: every section of `all`, the GPU check's dry run, profiling,
and the XLA GPU flag defaults."""

import glob
import json
import os
import subprocess
import sys

import pytest

from llama_jax import xla_flags
from llama_jax.config import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_all_sections_print_a_table_with_their_limit(tiny_dataset, capsys):
    from launch import benchmark

    results = benchmark.main(
        [
            "all",
            "--config",
            f"{ROOT}/configs/tiny.py",
            "--summary",
            "--config.model.n_layers=2",
            "--config.train.seq_len=64",
            "--config.train.batch_size=8",
            "--seq",
            "128",
            "--attn-impls",
            "reference,blockwise",
            "--attn-ablations",
            "0",
            "--attn-repeats",
            "2",
            "--step-policies",
            "save_linear",
            "--step-repeats",
            "2",
            "--step-matmul",
            "512",
            "--compile-layers",
            "1,2",
            "--data-path",
            tiny_dataset[0],
            "--data-batches",
            "20",
            "--data-prepare-mb",
            "0.1",
            "--data-workers",
            "1",
            "--data-curate-mb",
            "0.2",
        ]
    )
    out = capsys.readouterr().out
    for name in ("attention", "step", "data", "compile", "summary"):
        assert f"## {name}  [" in out, name
    assert set(results) == {"attention", "step", "data", "compile"}
    att, step = results["attention"], results["step"]
    assert [r["impl"] for r in att][-1].startswith("limit: matmul")
    assert all(0 < r["of_matmul"] for r in att if "tflops" in r)
    (row,) = [r for r in step if r["policy"] == "save_linear"]
    assert row["step_s_min"] <= row["step_s"] <= row["step_s_max"]
    assert row["tokens/s"] == pytest.approx(8 * 64 / row["step_s"])
    assert row["of_matmul"] > 0 and row["mem_GiB"] > 0
    assert step[-1]["policy"].startswith("limit: matmul")
    assert results["data"][-1]["what"] == "limit: memcpy"
    curation = [r for r in results["data"] if r["what"] == "curation"]
    assert len(curation) == 1 + 6 and all(r["MB/s"] > 0 for r in curation)
    assert [r["layers"] for r in results["compile"]] == [1, 2]


def test_gpu_check_dry_run(tmp_path):
    """launch/gpu_check.sh --dry-run: tests (skipped off GPU), attention per implementation,
    the step per remat policy + an extra batch for the fastest, and the summary table last."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run(  # noqa: PLW1510 - rc checked below
        ["bash", "launch/gpu_check.sh", "--dry-run"],
        cwd=ROOT,
        timeout=400,
        env={**env, "OUT": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    tail = r.stdout[r.stdout.rindex("## summary") :]
    for policy in ("save_linear", "full", "none"):
        assert f"step       {policy}" in tail
    assert "skipped" in (tmp_path / "pytest.txt").read_text()  # not passed: there is no GPU
    saved = json.loads((tmp_path / "bench.json").read_text())
    steps = [s for s in saved["results"]["step"] if "tokens/s" in s]
    assert {s["policy"] for s in steps} == {"save_linear", "full", "none"}
    assert sorted({s["batch"] for s in steps}) == [4, 8]
    impls = {a["impl"] for a in saved["results"]["attention"] if "ms" in a}
    assert impls == {"reference", "blockwise"}


def test_is_oom_recognizes_xla_messages():
    from llama_jax.bench.step import is_oom

    assert is_oom(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"))
    assert not is_oom(ValueError("shapes do not match"))


def test_profile_steps_write_a_trace(tmp_path, tiny_dataset):
    from llama_jax import trainer
    from tests.test_train import SMALL  # the training tests' small float32 model

    cfg = load(
        f"{ROOT}/configs/tiny.py",
        [
            *SMALL,
            f"data.path={tiny_dataset[0]}",
            "train.steps=4",
            "train.eval_every=0",
            "checkpoint.every_steps=0",
            "train.profile_steps=2,3",
        ],
    )
    trainer.train(cfg, str(tmp_path))
    traces = glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)
    assert traces and os.path.getsize(traces[0]) > 0


def test_xla_flags_added_unless_user_set_them():
    env = {"XLA_FLAGS": "--xla_gpu_enable_pipelined_all_gather=false"}
    added = xla_flags.setup(env, force=True)
    names = xla_flags.user_flag_names(env["XLA_FLAGS"])
    assert set(xla_flags.GPU_FLAGS) <= names
    assert "--xla_gpu_enable_pipelined_all_gather=false" in env["XLA_FLAGS"].split()
    assert not any("pipelined_all_gather" in a for a in added)
    assert xla_flags.setup({"LLAMA_JAX_XLA_DEFAULTS": "0"}, force=True) == []
    assert xla_flags.setup({"JAX_PLATFORMS": "cpu"}) == []  # never off GPU


def test_xla_flags_unknown_to_this_jaxlib_are_dropped(monkeypatch):
    monkeypatch.setitem(xla_flags.GPU_FLAGS, "xla_gpu_no_such_flag_anywhere", ("true", "test"))
    env = {}
    added = xla_flags.setup(env, force=True)
    assert added and not any("no_such_flag" in a for a in added)


def test_xla_flags_are_accepted_by_this_jaxlib():
    """An unknown flag aborts XLA at start-up; every default must start a backend."""
    env = {}
    xla_flags.setup(env, force=True)
    r = subprocess.run(  # noqa: PLW1510 - rc checked below
        [sys.executable, "-c", "import jax; print(jax.numpy.ones(2).sum())"],
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and r.stdout.strip() == "2.0", r.stderr[-2000:]
