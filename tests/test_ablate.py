"""launch.ablate / llama_jax.experiments.ablate: variants, run configs, and a small sweep end to end that
is interrupted and resumed without re-running finished runs."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llama_jax.config import load
from llama_jax.experiments import ablate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [  # as tests/test_train.py: a small float32 model, milliseconds per step
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.vocab_size=512",
    "model.multiple_of=16",
    "model.max_seq_len=64",
    "model.attn_block_q=16",
    "model.attn_block_k=16",
    "train.seq_len=32",
    "train.batch_size=8",
    "train.log_every=1",
    "train.eval_batches=2",
    "checkpoint.every_steps=8",
    "mesh.fsdp=-1",
]


def tiny_cfg(*extra):
    return load(f"{ROOT}/configs/tiny.py", [*SMALL, *extra])


def test_parse_vary_and_tokens():
    assert ablate.parse_vary("model.norm=rmsnorm, layernorm") == (
        "model.norm",
        ["rmsnorm", "layernorm"],
    )
    for bad in ("model.norm", "=a", "model.norm="):
        with pytest.raises(ValueError, match="--vary needs"):
            ablate.parse_vary(bad)
    assert [ablate.parse_tokens(t) for t in ("2M", "500k", "1.5e6", 4096)] == [
        2_000_000,
        500_000,
        1_500_000,
        4096,
    ]


def test_one_factor_at_a_time_and_grid():
    cfg = tiny_cfg()
    axes = [
        ("model.norm", ["rmsnorm", "layernorm"]),
        ("model.position", ["rope", "learned", "none"]),
        ("train.lr", ["3e-3", "1e-3", "0.001"]),
    ]  # 3e-3 is tiny's value; 0.001 a repeat
    ofat = ablate.make_variants(cfg, axes)
    assert [v.name for v in ofat] == [
        "baseline",
        "norm=layernorm",
        "position=learned",
        "position=none",
        "train.lr=1e-3",
    ]
    assert ofat[2].changes == (("model.position", "learned"),)
    grid = ablate.make_variants(cfg, axes, grid=True)
    assert len(grid) == 2 * 3 * 2 and grid[0].name == "baseline"
    assert "norm=layernorm+position=none+train.lr=1e-3" in [v.name for v in grid]
    with pytest.raises(KeyError, match="model.nrm"):
        ablate.make_variants(cfg, [("model.nrm", ["x"])])


def test_run_config_fixes_data_order_and_budget():
    cfg = tiny_cfg("train.seed=5", "train.warmup_steps=30")
    v = ablate.make_variants(cfg, [("model.mlp", ["gelu"])])[1]
    run = ablate.run_config(cfg, v, seed=6, tokens=100 * 8 * 32 + 7, evals=4)
    t = run.train
    assert run.model.mlp == "gelu" and cfg.model.mlp == "swiglu"  # the base is not modified
    assert (t.steps, t.eval_every, t.seed, t.data_seed) == (100, 25, 6, 5)
    assert t.warmup_steps == 20  # at most a fifth of a short run
    assert ablate.run_config(cfg, v, seed=5, tokens=10, evals=4).train.steps == 1


def _rows(workdir):
    with open(os.path.join(workdir, "results.csv")) as f:
        return list(csv.DictReader(f))


def _steps(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


@pytest.mark.slow
def test_sweep_writes_results_and_resumes_without_rerunning(tmp_path, tiny_dataset):
    data = f"data.path={tiny_dataset[0]}"
    cfg = tiny_cfg(data)
    tokens, wd = 8 * 8 * 32, str(tmp_path / "sweep")  # 8 steps per run
    # 1. a sweep of the baseline alone (both seeds) finishes
    ablate.sweep(cfg, [("model.norm", ["rmsnorm"])], tokens=tokens, seeds=2, workdir=wd, evals=4)
    base0 = os.path.join(wd, "baseline", "seed0")
    stamp = {
        s: os.stat(os.path.join(wd, "baseline", f"seed{s}", "done.json")).st_mtime_ns
        for s in (0, 1)
    }
    # 2. the CLI adds a variant; SIGTERM stops its first run at step 3 (saved, sweep exits)
    args = [
        sys.executable,
        "-m",
        "launch.ablate",
        "--config",
        f"{ROOT}/configs/tiny.py",
        "--vary",
        "model.norm=rmsnorm,layernorm",
        "--tokens",
        str(tokens),
        "--seeds",
        "2",
        "--workdir",
        wd,
        "--evals",
        "4",
        *(f"--config.{o}" for o in [*SMALL, data]),
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "LLAMA_JAX_SIGNAL_AT_STEP": "15:3"}
    r = subprocess.run(
        args, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 75, r.stderr[-3000:]  # interrupted, saved: run it again
    assert "interrupted: SIGTERM stopped" in r.stdout, r.stdout[-2000:]
    ln0 = os.path.join(wd, "norm=layernorm", "seed0")
    assert _steps(ln0) == [0, 1, 2, 3] and not os.path.exists(os.path.join(ln0, "done.json"))
    assert not os.path.exists(os.path.join(wd, "norm=layernorm", "seed1"))
    # 3. the same sweep again: baseline skipped, layernorm seed 0 resumes at step 3, seed 1 runs
    rows = ablate.sweep(
        cfg, [("model.norm", ["rmsnorm", "layernorm"])], tokens=tokens, seeds=2, workdir=wd, evals=4
    )
    for s in (0, 1):
        assert (
            os.stat(os.path.join(wd, "baseline", f"seed{s}", "done.json")).st_mtime_ns == stamp[s]
        )
    assert _steps(ln0) == list(range(9)) == _steps(base0)  # step 0: the initial val loss

    assert [r["variant"] for r in rows] == ["baseline", "norm=layernorm"]
    csv_rows = _rows(wd)
    assert [r["variant"] for r in csv_rows] == ["baseline", "norm=layernorm"]
    base, ln = csv_rows
    assert int(base["seeds"]) == int(ln["seeds"]) == 2 and int(base["tokens"]) == tokens
    # LayerNorm adds a bias per norm: two per layer and the final one
    assert int(ln["params"]) - int(base["params"]) == (2 * 2 + 1) * 64
    for r in csv_rows:
        final, best = float(r["final_val_loss"]), float(r["best_val_loss"])
        assert best <= final < np.log(512) and float(r["final_val_loss_std"]) > 0
    assert float(base["delta_vs_baseline"]) == 0.0
    with open(os.path.join(wd, "results.md")) as f:
        md = f.read()
    assert "| norm=layernorm |" in md and "2,048 tokens per run" in md
    assert os.path.getsize(os.path.join(wd, "ablation.png")) > 5000
    # every run saw the same data order; the seeds differ in init only
    runs = []
    for v in ("baseline", "norm=layernorm"):
        for s in (0, 1):
            with open(os.path.join(wd, v, f"seed{s}", "config.json")) as f:
                runs.append(json.load(f)["train"])
    assert {r["data_seed"] for r in runs} == {0} and [r["seed"] for r in runs] == [0, 1, 0, 1]
    # a changed budget is refused rather than mixed into the finished runs
    with pytest.raises(ValueError, match="different run config"):
        ablate.sweep(cfg, [("model.norm", ["rmsnorm"])], tokens=2 * tokens, seeds=1, workdir=wd)
