"""Training-step benchmark: per remat policy, compiled memory per device, step time, tokens/s, MFU.

python -m launch.benchmark step --config configs/tiny.py [--step-policies full,save_linear]
    [--step-compile-only] [--json]

The first row is the device's own matmul rate (a square matmul in the step's dtype); every
policy row reports the step's model FLOP/s as a fraction of it, so CPUs and unknown GPUs get a
meaningful utilization even where MFU (against the vendor's peak) is n/a. Model FLOPs per token
come from stats.flops_per_token (6N + causal attention). --step-compile-only compiles against
abstract shapes only, so a 65B config's memory can be read on simulated CPU devices.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from llama_jax import sharding as shd
from llama_jax import stats
from llama_jax import train_step as ts
from llama_jax.bench.common import compiled_memory, time_fn
from llama_jax.config import ModelConfig, load_config_file
from llama_jax.model import REMAT_POLICIES

MiB = 2**20


def add_args(parser):
    parser.add_argument(
        "--step-policies",
        default=",".join(REMAT_POLICIES),
        help=f"comma-separated remat policies to compare; valid: {','.join(REMAT_POLICIES)}",
    )
    parser.add_argument("--step-repeats", type=int, default=5, help="timed steps per policy")
    parser.add_argument(
        "--step-compile-only", action="store_true", help="only compile and report memory"
    )
    parser.add_argument("--step-batch", type=int, default=0, help="global batch; 0 = config's")
    parser.add_argument("--step-seq-len", type=int, default=0, help="sequence length; 0 = config's")
    parser.add_argument(
        "--step-matmul", type=int, default=0, help="matmul size N (N^3); 0 = 2048 CPU, 8192 GPU"
    )


def matmul_flops(n: int, dtype, repeats: int = 5) -> float:
    """FLOP/s of one device on an [n, n] x [n, n] matmul in `dtype` (median of repeats)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    return 2 * n**3 / time_fn(lambda: f(a, b), warmup=1, repeats=repeats)["median"]


def _random_batch(cfg, mesh):
    B, T = int(cfg.train.batch_size), int(cfg.train.seq_len)
    toks = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (B, T + 1), dtype=np.int32)
    host = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
    return jax.device_put(host, shd.batch_sharding(mesh))


def run(args) -> list[dict]:
    cfg = load_config_file(getattr(args, "config", "configs/tiny.py"))
    if getattr(args, "step_batch", 0):
        cfg.train.batch_size = args.step_batch
    if getattr(args, "step_seq_len", 0):
        cfg.train.seq_len = args.step_seq_len
    policies = [p for p in str(getattr(args, "step_policies", "save_linear")).split(",") if p]
    compile_only = bool(getattr(args, "step_compile_only", False))
    repeats = int(getattr(args, "step_repeats", 5))

    mesh = shd.make_mesh(cfg.mesh)
    mc = ModelConfig.from_config(cfg.model)
    n_dev = mesh.devices.size
    B, T = int(cfg.train.batch_size), int(cfg.train.seq_len)
    flops_per_token = stats.flops_per_token(mc, T)["total"]
    peak = stats.device_peak_flops()
    on_cpu = jax.default_backend() == "cpu"
    mesh_desc = "x".join(str(mesh.shape[a]) for a in shd.MESH_AXES)

    rows, matmul_row, matmul_rate = [], None, None
    if not compile_only:
        n = int(getattr(args, "step_matmul", 0)) or (2048 if on_cpu else 8192)
        matmul_rate = matmul_flops(n, mc.compute_dtype)
        matmul_row = {
            "policy": f"matmul {n}^3 {mc.dtype}",
            "model_TFLOP/s/dev": matmul_rate / 1e12,
            "MFU": None if peak is None else matmul_rate / peak,
            "of_matmul": 1.0,
        }

    for policy in policies:
        cfg.model.remat_policy = policy
        t0 = time.perf_counter()
        compiled = ts.compile_train_step(cfg, mesh)
        row = {"policy": policy, "mesh(d,f,t)": mesh_desc, "compile_s": time.perf_counter() - t0}
        mem = compiled_memory(compiled)
        for k in ("temp_bytes", "argument_bytes", "output_bytes"):
            row[k.replace("_bytes", "_MiB/dev")] = None if mem[k] is None else mem[k] / MiB
        if not compile_only:
            state, _ = ts.create_train_state(cfg, mesh)
            batch = _random_batch(cfg, mesh)
            holder = [state]

            def one_step(holder=holder, batch=batch, compiled=compiled):
                holder[0], metrics = compiled(holder[0], batch)
                return metrics

            seconds = time_fn(one_step, warmup=1, repeats=repeats)["median"]
            achieved = flops_per_token * B * T / seconds / n_dev  # model FLOP/s per device
            row.update(
                {
                    "step_s": seconds,
                    "tokens/s": B * T / seconds,
                    "model_TFLOP/s/dev": achieved / 1e12,
                    "MFU": None if peak is None else achieved / peak,
                    "of_matmul": achieved / matmul_rate,
                }
            )
            del holder[0], state
        rows.append(row)
    return rows + ([matmul_row] if matmul_row else [])
