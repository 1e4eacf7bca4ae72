"""Attention benchmark: compiled memory, fwd+bwd time and TFLOP/s per implementation and T.

python -m launch.benchmark attention [--seq 1024,2048,4096] [--attn-impls ...] [--json]

Rows per sequence length: each implementation (causal), plus "blockwise:noskip" (the same
function computing and masking the tiles above the diagonal) and "blockwise:noncausal", with
blockwise's time ratio against both. TFLOP/s always counts causal FLOPs (half the square),
so work that the causal mask throws away shows up as lower achieved throughput. The timed
runs of all variants at one T are interleaved, so load from other processes hits them alike.
CPU defaults (B=1, N=8, H=64, f32, tiles 256, T 1024..4096) run in a couple of minutes on two
cores; reference is timed only up to --attn-ref-max-seq (its memory is always reported).
The last row is the physical limit, a square matmul in the same dtype; "of_matmul" is each
row's causal TFLOP/s as a fraction of it. --attn-table writes the times into the table that
attention_impl=auto reads (attention_table.py); the package's table was made with
--seq 64,128,256,512,1024,2048 --attn-batch 8 --attn-head-dim 32|64|128 --attn-block 128.
"""

from __future__ import annotations

import functools
import statistics

import jax
import jax.numpy as jnp

from llama_jax.bench.common import compiled_memory, time_fn
from llama_jax.bench.step import matmul_flops
from llama_jax.model import attention_table
from llama_jax.model.attention import IMPLEMENTATIONS, blockwise_attention

MiB = 2**20


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def add_args(parser) -> None:
    g = parser.add_argument_group("attention")
    if "--seq" not in parser._option_string_actions:  # another section may share it
        g.add_argument("--seq", default=None, help="comma-separated sequence lengths")
    g.add_argument(
        "--attn-impls",
        default=None,
        help="comma-separated; default reference,blockwise[,cudnn on gpu]",
    )
    g.add_argument("--attn-batch", type=int, default=1)
    g.add_argument("--attn-heads", type=int, default=None, help="query heads N (cpu 8, gpu 16)")
    g.add_argument("--attn-kv-heads", type=int, default=None, help="kv heads K; default N")
    g.add_argument("--attn-head-dim", type=int, default=None, help="H (cpu 64, gpu 128)")
    g.add_argument(
        "--attn-dtype",
        default=None,
        help="float32 | bfloat16 (cpu float32, gpu bfloat16)",
    )
    g.add_argument(
        "--attn-block",
        type=int,
        default=None,
        help="block_q = block_k (cpu 256, gpu 512)",
    )
    g.add_argument("--attn-repeats", type=int, default=5, help="timed runs; the median is reported")
    g.add_argument(
        "--attn-ref-max-seq",
        type=int,
        default=None,
        help="time reference only up to this T",
    )
    g.add_argument(
        "--attn-table",
        nargs="?",
        const=attention_table.TABLE_PATH,
        default="",
        metavar="PATH",
        help="write each T's times into the table attention_impl=auto reads (default: the "
        "package's attention_table.json)",
    )
    g.add_argument(
        "--attn-ablations",
        type=int,
        default=1,
        help="1: also time blockwise:noskip and :noncausal; 0: implementations only",
    )


def _settings(args) -> dict:
    gpu = _on_gpu()
    seq = getattr(args, "seq", None) or ("2048,4096,8192,16384" if gpu else "1024,2048,4096")
    impls = getattr(args, "attn_impls", None) or (
        "reference,blockwise,cudnn" if gpu else "reference,blockwise"
    )
    heads = getattr(args, "attn_heads", None) or (16 if gpu else 8)
    return {
        "seqs": [int(s) for s in str(seq).split(",") if s],
        "impls": [s for s in impls.split(",") if s],
        "B": getattr(args, "attn_batch", None) or 1,
        "N": heads,
        "K": getattr(args, "attn_kv_heads", None) or heads,
        "H": getattr(args, "attn_head_dim", None) or (128 if gpu else 64),
        "dtype": jnp.dtype(getattr(args, "attn_dtype", None) or ("bfloat16" if gpu else "float32")),
        "block": getattr(args, "attn_block", None) or (512 if gpu else 256),
        "repeats": getattr(args, "attn_repeats", None) or 5,
        "ref_max_seq": getattr(args, "attn_ref_max_seq", None) or (8192 if gpu else 2048),
        "ablations": bool(getattr(args, "attn_ablations", 1)),
    }


def _fwd_bwd(attn):
    """jit of q, k, v, cotangent -> (dq, dk, dv): one forward and one backward pass."""

    def f(q, k, v, ct):
        _, vjp = jax.vjp(attn, q, k, v)
        return vjp(ct)

    return jax.jit(f)


def _variants(impls, block, ablations=True):
    for name in impls:
        if name not in IMPLEMENTATIONS:
            raise ValueError(f"unknown attention impl {name!r}; valid: {sorted(IMPLEMENTATIONS)}")
        if name == "blockwise":
            bw = functools.partial(blockwise_attention, block_q=block, block_k=block)
            yield "blockwise", bw
            if not ablations:
                continue
            yield "blockwise:noskip", functools.partial(bw, skip_masked_blocks=False)
            yield "blockwise:noncausal", functools.partial(bw, causal=False)
        else:
            yield name, functools.partial(IMPLEMENTATIONS[name], causal=True)


def _inputs(T: int, s: dict) -> tuple:
    """q, k, v and the output cotangent at sequence length T, seeded by T."""
    B, N, K, H, dt = s["B"], s["N"], s["K"], s["H"], s["dtype"]
    keys = jax.random.split(jax.random.PRNGKey(T), 4)
    q = jax.random.normal(keys[0], (B, T, N, H), dt)
    k = jax.random.normal(keys[1], (B, T, K, H), dt)
    v = jax.random.normal(keys[2], (B, T, K, H), dt)
    ct = jax.random.normal(keys[3], (B, T, N, H), dt)
    return q, k, v, ct


def _compile_variants(s: dict, T: int, args: tuple) -> tuple[list[dict], dict]:
    """One row per variant with its compiled memory (or the compile error), and the warmed-up
    fwd+bwd call of each variant that is to be timed."""
    base = {"T": T, "B": s["B"], "N": s["N"], "K": s["K"], "H": s["H"]}
    base.update(dtype=s["dtype"].name, block=s["block"])
    rows, timed = [], {}
    for name, attn in _variants(s["impls"], s["block"], s["ablations"]):
        row = {"impl": name, **base}
        rows.append(row)
        try:
            compiled = _fwd_bwd(attn).lower(*args).compile()
        except (ValueError, TypeError, RuntimeError, NotImplementedError) as e:
            # e.g. cudnn on an unsupported shape or card: report it, keep going
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            continue
        temp = compiled_memory(compiled)["temp_bytes"]
        row["temp_MiB"] = None if temp is None else temp / MiB
        if name != "reference" or T <= s["ref_max_seq"]:  # else memory only
            timed[name] = functools.partial(compiled, *args)
            jax.block_until_ready(timed[name]())  # warmup
    return rows, timed


def _time_interleaved(timed: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, `repeats` samples each, taken round-robin so that
    load from other processes hits every variant alike."""
    samples = {name: [] for name in timed}
    for _ in range(repeats):
        for name, fn in timed.items():
            samples[name].append(time_fn(fn, warmup=0, repeats=1)["median"])
    return samples


def _fill_rows(rows: list[dict], samples: dict[str, list[float]], flops: float) -> None:
    """Adds times, TFLOP/s, memory against reference and blockwise's time ratios to rows."""
    med = {name: statistics.median(ts) for name, ts in samples.items()}
    ref_temp = next((r.get("temp_MiB") for r in rows if r["impl"] == "reference"), None)
    for row in rows:
        name = row["impl"]
        if name in med:
            ts = samples[name]
            row.update(ms=med[name] * 1e3, ms_min=min(ts) * 1e3, ms_max=max(ts) * 1e3)
            row["tflops"] = flops / med[name] / 1e12
        if ref_temp and row.get("temp_MiB") is not None:
            row["mem_vs_ref"] = row["temp_MiB"] / ref_temp
        if name == "blockwise" and name in med:
            for other in ("noskip", "noncausal"):
                if f"blockwise:{other}" in med:
                    row[f"time_vs_{other}"] = med[name] / med[f"blockwise:{other}"]


def _matmul_limit(rows: list[dict], dtype) -> dict:
    """The physical limit, the device's own matmul rate in the same dtype, as a row; sets each
    timed row's of_matmul."""

    n = 8192 if _on_gpu() else 2048
    rate = matmul_flops(n, dtype)
    for row in rows:
        if row.get("tflops") is not None:
            row["of_matmul"] = row["tflops"] * 1e12 / rate["median"]
    return {
        "impl": f"limit: matmul {n}^3",
        "dtype": dtype.name,
        "tflops": rate["median"] / 1e12,
        "of_matmul": 1.0,
    }


def _table_entries(rows: list[dict]) -> list[dict]:
    """attention_table entries: per (T, H), the median ms of each implementation timed."""
    d = jax.devices()[0]
    by_point: dict = {}
    for r in rows:
        if "ms" in r and ":" not in r["impl"]:  # implementations, not the ablations
            point = by_point.setdefault(
                (r["T"], r["H"]),
                {"platform": d.platform, "device": d.device_kind, "dtype": r["dtype"]}
                | {"T": r["T"], "H": r["H"], "B": r["B"], "N": r["N"], "K": r["K"]}
                | {"block": r["block"], "ms": {}},
            )
            point["ms"][r["impl"]] = round(r["ms"], 4)
    return list(by_point.values())


def measure(args) -> list[dict]:
    s = _settings(args)
    B, N, H = s["B"], s["N"], s["H"]
    rows = []
    for T in s["seqs"]:
        flops = 3.5 * 2 * B * N * H * T * T  # causal: fwd 2 matmuls x 2*B*N*H*T*T/2, bwd 2.5x fwd
        t_rows, timed = _compile_variants(s, T, _inputs(T, s))
        _fill_rows(t_rows, _time_interleaved(timed, s["repeats"]), flops)
        rows += t_rows
    table = getattr(args, "attn_table", "")
    if table:
        attention_table.merge(_table_entries(rows), table)
    rows.append(_matmul_limit(rows, s["dtype"]))
    return rows
