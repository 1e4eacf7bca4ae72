"""Training-step benchmark: per remat policy and batch, memory per device, step time, tokens/s, MFU.

python -m launch.benchmark step --config configs/tiny.py [--step-policies full,save_linear]
    [--step-batch 8] [--step-extra-batches 4,16] [--step-compile-only] [--json]

The last row is the device's own matmul rate (a square matmul in the step's dtype), the
physical limit: every step row reports its model FLOP/s (6N + causal attention) as a fraction
of it ("of_matmul"), so CPUs and unknown GPUs get a meaningful utilization where MFU against
the vendor's peak is n/a. MFU is given on three bases: "MFU_6n" (the paper's 6 FLOPs per
parameter per token), "MFU_palm" (PaLM's, as MaxText reports: 6 x non-embedding parameters +
12 x L x D x T) and "MFU_causal" (6N plus causal attention: half the score matrix, never
the full square). step_s is the median of --step-repeats timed steps after a warm-up step,
with min and max. mem_GiB is XLA's compiled peak (arguments + temporaries + non-donated
outputs); on GPU, hwm_GiB is the allocator's high-water mark of the whole process so far.
An out-of-memory compile or step becomes an "OOM" row instead of ending the run.
--step-extra-batches re-runs the fastest policy at more batch sizes.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from typing import Any

import jax
import numpy as np

from llama_jax.bench import profile
from llama_jax.bench.common import compiled_memory, load_config, time_fn
from llama_jax.config import RunConfig
from llama_jax.model import stats
from llama_jax.model.remat import REMAT_POLICIES
from llama_jax.parallel import sharding as shd
from llama_jax.train import step as ts

GiB = 2**30


def add_args(parser):
    parser.add_argument(
        "--step-policies",
        default=",".join(REMAT_POLICIES),
        help=f"comma-separated remat policies to compare; valid: {','.join(REMAT_POLICIES)}",
    )
    parser.add_argument("--step-repeats", type=int, default=5, help="timed steps per row")
    parser.add_argument(
        "--step-compile-only",
        action="store_true",
        help="only compile and report memory",
    )
    parser.add_argument("--step-batch", type=int, default=0, help="global batch; 0 = config's")
    parser.add_argument(
        "--step-extra-batches",
        default="",
        help="more batch sizes for the fastest policy",
    )
    parser.add_argument("--step-seq-len", type=int, default=0, help="sequence length; 0 = config's")
    parser.add_argument(
        "--step-matmul",
        type=int,
        default=0,
        help="matmul size N (N^3); 0 = 2048 CPU, 8192 GPU",
    )
    parser.add_argument(
        "--step-dtype", default="", help="compute dtype override (float32 | bfloat16)"
    )
    parser.add_argument(
        "--profile",
        nargs="?",
        const="-",
        default="",
        metavar="DIR",
        help="also trace each policy's step and print where its time goes per op category "
        "(bench/profile.py); with DIR, keep the traces and optimized HLO there",
    )


def matmul_flops(n: int, dtype, repeats: int = 5) -> dict:
    """FLOP/s of one device on an [n, n] x [n, n] matmul in `dtype`: median, min, max."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    t = time_fn(lambda: f(a, b), warmup=1, repeats=repeats)
    return {k: 2 * n**3 / t[k] for k in ("median", "min", "max")}


def _random_batch(cfg: RunConfig, mesh):
    B, T = cfg.train.batch_size, cfg.train.seq_len
    toks = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (B, T + 1), dtype=np.int32)
    host = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
    return jax.device_put(host, shd.batch_sharding(mesh))


def is_oom(e: BaseException) -> bool:
    msg = str(e)
    return any(s in msg for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM"))


def _hwm_bytes():
    try:
        s = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - CPU, or a plugin without memory stats
        return None
    return None if not s else s.get("peak_bytes_in_use")


@dataclasses.dataclass
class _Bench:
    """What every row of one run shares."""

    mesh: Any
    repeats: int
    compile_only: bool
    flops: dict
    peak: float | None
    matmul_rate: float | None
    profile: str  # "" off, "-" on (temporary trace), else the directory to keep traces in
    profile_rows: list = dataclasses.field(default_factory=list)


def _compile_row(cfg: RunConfig, b: _Bench, row: dict):
    t0 = time.perf_counter()
    compiled = ts.compile_train_step(cfg, b.mesh)
    row["compile_s"] = time.perf_counter() - t0
    mem = compiled_memory(compiled)
    if mem["temp_bytes"] is not None:
        alias = int(compiled.memory_analysis().alias_size_in_bytes)
        row["mem_GiB"] = (
            mem["argument_bytes"] + mem["temp_bytes"] + mem["output_bytes"] - alias
        ) / GiB
        row["temp_GiB"] = mem["temp_bytes"] / GiB
    return compiled


def _timed_row(cfg: RunConfig, b: _Bench, compiled, row: dict) -> None:
    B, T, n_dev = cfg.train.batch_size, cfg.train.seq_len, b.mesh.devices.size
    state, _ = ts.create_train_state(cfg, b.mesh)
    batch = _random_batch(cfg, b.mesh)
    frozen = ts.random_frozen(cfg, b.mesh)  # the step's frozen input: {}, or a LoRA base
    holder = [state]
    del state

    def one_step():
        holder[0], metrics = compiled(holder[0], batch, frozen)
        return metrics

    t = time_fn(one_step, warmup=1, repeats=b.repeats)
    achieved = b.flops["total"] * B * T / t["median"] / n_dev  # model FLOP/s per device
    by_basis = stats.mfu(B * T / t["median"], b.flops, n_dev, b.peak)
    row.update(
        {
            "step_s": t["median"],
            "step_s_min": t["min"],
            "step_s_max": t["max"],
            "tokens/s": B * T / t["median"],
            "tokens/s/dev": B * T / t["median"] / n_dev,
            "model_TFLOP/s/dev": achieved / 1e12,
            "MFU_6n": by_basis.get("mfu_6n"),
            "MFU_palm": by_basis.get("mfu_palm"),
            "MFU_causal": None if b.peak is None else achieved / b.peak,
            "of_matmul": achieved / b.matmul_rate,
        }
    )
    hwm = _hwm_bytes()
    if hwm is not None:
        row["hwm_GiB"] = hwm / GiB
    if b.profile:
        keep = "" if b.profile == "-" else os.path.join(b.profile, f"{row['policy']}_b{B}")
        try:
            result = profile.profile(one_step, compiled.as_text(), keep_dir=keep)
            b.profile_rows += profile.breakdown_rows(row["policy"], result)
        except Exception as e:  # noqa: BLE001 - a trace we cannot read must not cost the row
            row["profile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    holder.clear()


def _one_row(cfg: RunConfig, b: _Bench, policy: str) -> dict:
    cfg = cfg.replace({"model.remat_policy": policy})
    mesh_desc = "x".join(str(b.mesh.shape[a]) for a in shd.MESH_AXES)
    B, T = cfg.train.batch_size, cfg.train.seq_len
    row = {"policy": policy, "batch": B, "seq": T, "mesh(d,f,t)": mesh_desc}
    try:
        compiled = _compile_row(cfg, b, row)
        if not b.compile_only:
            _timed_row(cfg, b, compiled, row)
    except Exception as e:  # an OOM is a result (a row), anything else a bug
        if not is_oom(e):
            raise
        row["error"] = "OOM: " + str(e).splitlines()[0][:60]
    finally:
        gc.collect()
    return row


def _matmul_row(n: int, dtype, peak) -> tuple[dict, float]:
    mm = matmul_flops(n, dtype)
    row = {
        "policy": f"limit: matmul {n}^3 {jax.numpy.dtype(dtype).name}",
        "model_TFLOP/s/dev": mm["median"] / 1e12,
        "MFU_causal": None if peak is None else mm["median"] / peak,
        "of_matmul": 1.0,
        "matmul_TFLOP/s_min": mm["min"] / 1e12,
        "matmul_TFLOP/s_max": mm["max"] / 1e12,
    }
    return row, mm["median"]


def measure(args) -> list[dict]:
    changes = {"train.grad_accum_steps": 1}
    if getattr(args, "step_batch", 0):
        changes["train.batch_size"] = args.step_batch
    if getattr(args, "step_seq_len", 0):
        changes["train.seq_len"] = args.step_seq_len
    if getattr(args, "step_dtype", ""):
        changes["model.dtype"] = args.step_dtype
    cfg = load_config(args).replace(changes)
    policies = [p for p in str(getattr(args, "step_policies", "save_linear")).split(",") if p]
    extra = [int(b) for b in str(getattr(args, "step_extra_batches", "") or "").split(",") if b]
    compile_only = bool(getattr(args, "step_compile_only", False))
    on_cpu = jax.default_backend() == "cpu"
    peak = stats.device_peak_flops()
    matmul_row, matmul_rate = None, None
    if not compile_only:
        n = int(getattr(args, "step_matmul", 0)) or (2048 if on_cpu else 8192)
        matmul_row, matmul_rate = _matmul_row(n, cfg.model.compute_dtype, peak)
    b = _Bench(
        mesh=shd.make_mesh(*cfg.mesh.sizes),
        repeats=int(getattr(args, "step_repeats", 5)),
        compile_only=compile_only,
        flops=stats.flops_per_token(cfg.model, cfg.train.seq_len),
        peak=peak,
        matmul_rate=matmul_rate,
        profile="" if compile_only else str(getattr(args, "profile", "") or ""),
    )
    rows = [_one_row(cfg, b, policy) for policy in policies]
    timed = [r for r in rows if "step_s" in r]
    if extra and timed:
        best = max(timed, key=lambda r: r["tokens/s"])
        for size in extra:
            if size != best["batch"]:
                rows.append(_one_row(cfg.replace({"train.batch_size": size}), b, best["policy"]))
    if b.profile_rows and hasattr(args, "tables"):
        args.tables["step profile"] = b.profile_rows
    return rows + ([matmul_row] if matmul_row else [])
