"""Will it fit? Per-device bytes of the real training step, compiled ahead of time.

`analyze(cfg, mesh)` compiles the jitted step (train_step.compile_train_step) against abstract
inputs for each remat policy and splits XLA's memory_analysis() into the parts a user can act
on, next to the analytic estimate (16 bytes/param + activations):

  params      float32 master weights, this device's shard (exact, from the shardings)
  optimizer   AdamW moments mu, nu + counters: compiled argument bytes - params - batch
  gradients   float32, sharded like the params; they live inside XLA's temporaries, so this
              is the analytic shard size (the reduce-scattered gradient every device holds)
  activations XLA's temp bytes - gradients: saved activations, the recompute working set,
              logits and all-gathered weights
  peak        arguments + temps + outputs not aliased to (donated) arguments

Nothing is allocated, so a 65B config's numbers come from a laptop: launch.inspect --memory
simulates the mesh's devices on the CPU. Caveat: XLA:CPU computes bfloat16 ops in float32
(its float-normalization pass), so for a bf16 model the compiled activations on simulated CPU
devices are up to ~2x what a GPU compile needs; the analytic column counts bf16.
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np

from llama_jax.config import ModelConfig, RunConfig
from llama_jax.model import remat, stats
from llama_jax.model.remat import REMAT_POLICIES
from llama_jax.parallel import sharding as shd
from llama_jax.train import step as ts


def _shard_sizes(tree) -> tuple[int, int]:
    """(elements, bytes) one device holds of a tree of ShapeDtypeStructs with NamedShardings."""
    elements = nbytes = 0
    for x in jax.tree.leaves(tree):
        n = math.prod(x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape)
        elements, nbytes = elements + n, nbytes + n * np.dtype(x.dtype).itemsize
    return elements, nbytes


def _shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs that carry NamedShardings."""
    return _shard_sizes(tree)[1]


def rows_per_device(cfg: RunConfig, mesh) -> int:
    """Sequences of one microbatch each device processes (batch over data x fsdp)."""
    return max(1, cfg.train.microbatch_size // shd.batch_shards(mesh))


def analytic_activations(
    mc: ModelConfig, policy: str, rows: int, seq_len: int, tensor: int = 1, context: int = 1,
    sequence_parallel: bool = False,
):  # fmt: skip
    """Estimated activation bytes per device for one microbatch under `policy`.

    Saved per layer (remat.REMAT_POLICIES[policy].saved) for all layers, plus one layer's
    full working set while it is recomputed in the backward pass, plus the float32 logits,
    their softmax and gradient. The block input (D per token, the scan carry) is saved in the
    residual dtype. As Korthikanti et al. (2022) count it: context parallelism splits every
    token's share (rows x seq_len / context tokens a device); tensor parallelism splits the
    parts inside attention and the MLP (heads, mlp, vocab), while the residual-layout parts
    (remat.Remat.residual D-wide tensors) stay whole unless sequence parallelism splits them
    too.
    """
    D, F, KH = mc.dim, mc.mlp_dim, mc.kv_heads * mc.head_dim
    item, res_item = np.dtype(mc.compute_dtype).itemsize, np.dtype(mc.residual).itemsize
    tokens = rows * seq_len // context
    res_split = tensor if sequence_parallel else 1

    def per_token(name: str) -> float:  # bytes per token of one layer's saved tensors
        r = REMAT_POLICIES[name]
        inner = (r.saved(D, F, KH) - r.residual * D) * item / tensor
        return inner + (r.residual * D * item + D * (res_item - item)) / res_split

    saved = per_token(policy) * tokens * mc.n_layers
    working = per_token("none") * tokens if policy != "none" else 0
    logits = 3 * tokens * mc.vocab_size * 4 // tensor
    return int(saved + working) + logits


def analyze(cfg: RunConfig, mesh, policies=None, log=None) -> dict:
    """Compiles the step per remat policy; returns per-device bytes, compiled and analytic.

    Returns {"config": {...}, "policies": [{"policy", "params", "optimizer", "gradients",
    "activations", "peak", "analytic_state", "analytic_activations", ...}, ...]}: all bytes
    per device. Policies default to every entry of remat.REMAT_POLICIES.
    """
    policies = [remat.check(p) for p in policies or REMAT_POLICIES]
    mc = cfg.model
    n = stats.count_params(mc)
    state, _ = ts.abstract_train_state(cfg, mesh)  # the trainable params and their moments
    frozen = ts.abstract_frozen(cfg, mesh)[0]  # the step's other input: {}, or LoRA's base
    batch = ts.abstract_batch(cfg, mesh)
    trained_n, trained_b = _shard_sizes(state.params)
    frozen_b = _shard_bytes(frozen)
    params_b = trained_b + frozen_b
    opt_b = _shard_bytes(state.opt_state)
    batch_b = _shard_bytes(batch)
    step_b = _shard_bytes(state.step)
    # 16 bytes (4-byte master, mu, nu, gradient) per trained weight, the frozen tree as it is
    analytic_state = 16 * trained_n + frozen_b
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    rows, T = rows_per_device(cfg, mesh), cfg.train.seq_len
    out = {
        "config": {
            "parameters": n,
            "devices": int(mesh.devices.size),
            "mesh": {a: int(mesh.shape[a]) for a in shd.MESH_AXES},
            "batch_size": cfg.train.batch_size,
            "grad_accum_steps": cfg.train.grad_accum_steps,
            "seq_len": T,
            "rows_per_device": rows,
            "dtype": mc.dtype,
            "param_dtype": mc.param_dtype,
            "backend": jax.default_backend(),
            "analytic_16_bytes_per_param": analytic_state,
            "trained": count(state.params),
            "frozen": count(frozen),
        },
        "policies": [],
    }
    shard = {"params": params_b, "trained": trained_b, "optimizer": opt_b, "batch": batch_b,
             "step": step_b}  # fmt: skip
    for policy in policies:
        row = _policy_row(cfg, mesh, policy, shard)
        row["analytic_state"] = analytic_state
        row["analytic_activations"] = analytic_activations(
            mc, policy, rows, T, int(mesh.shape["tensor"]), int(mesh.shape["context"]),
            cfg.mesh.sequence_parallel,
        )  # fmt: skip
        row["analytic_peak"] = row["analytic_state"] + row["analytic_activations"]
        out["policies"].append(row)
        if log:
            log(row)
    return out


def _policy_row(cfg: RunConfig, mesh, policy: str, shard: dict) -> dict:
    """Compiles the step under one remat policy; its memory_analysis() split into parts.

    shard: this device's bytes of params, optimizer state, batch and step (from shardings).
    """
    t0 = time.perf_counter()
    compiled = ts.compile_train_step(cfg.replace({"model.remat_policy": policy}), mesh)
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    arg, temp = int(m.argument_size_in_bytes), int(m.temp_size_in_bytes)
    outb, alias = int(m.output_size_in_bytes), int(m.alias_size_in_bytes)
    params_b = shard["params"]
    grads = shard["trained"]  # float32 gradients of the trained params, sharded like them
    optimizer = arg - params_b - shard["batch"] - shard["step"] if arg else shard["optimizer"]
    return {
        "policy": policy,
        "params": params_b,
        "optimizer": optimizer,
        "gradients": grads,
        "state_total": params_b + optimizer + grads,
        "activations": temp - grads,
        "batch": shard["batch"],
        "compiled_argument": arg,
        "compiled_temp": temp,
        "compiled_output": outb,
        "compiled_alias": alias,
        "peak": arg + temp + outb - alias,
        "compile_s": seconds,
    }


GiB = 2**30


def _policy_table(rows: list[dict], device_bytes: float | None) -> list[str]:
    """The per-policy rows of format_report, in GiB per device, columns aligned."""
    cols = ["policy", "params", "optimizer", "gradients", "state", "vs 16B/p", "activations",
            "analytic act", "peak", "compile_s"]  # fmt: skip
    table = []
    for r in rows:
        fits = "" if device_bytes is None else (" fits" if r["peak"] <= device_bytes else " OOM")
        gib = [f"{r[k] / GiB:.2f}" for k in ("params", "optimizer", "gradients", "state_total")]
        table.append([
            r["policy"], *gib, f"{r['state_total'] / r['analytic_state']:.3f}",
            f"{r['activations'] / GiB:.2f}", f"{r['analytic_activations'] / GiB:.2f}",
            f"{r['peak'] / GiB:.2f}{fits}", f"{r['compile_s']:.1f}",
        ])  # fmt: skip
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(cols)]
    return [
        "  ".join(h.ljust(w) for h, w in zip(cols, widths)) + "   (GiB per device)",
        "  ".join("-" * w for w in widths),
        *("  ".join(v.ljust(w) for v, w in zip(t, widths)) for t in table),
    ]


def format_report(result: dict, device_bytes: float | None = None) -> str:
    """A text table of analyze()'s result; device_bytes marks which policies fit."""
    c = result["config"]
    mesh = "x".join(str(c["mesh"][a]) for a in shd.MESH_AXES)
    lines = [
        (
            f"will it fit? per-device bytes of the compiled train step on {c['devices']} "
            f"{c['backend']} device(s), mesh ({','.join(shd.MESH_AXES)})={mesh}"
        ),
        (
            f"  {c['parameters']:,} parameters ("
            + (
                f"{c['param_dtype']} master, AdamW"
                if not c["frozen"]
                else f"{c['param_dtype']} frozen base; {c['trained']:,} trained, AdamW"
            )  # fmt: skip
            + "), compute "
            f"{c['dtype']}; activations for global batch {c['batch_size']} x seq {c['seq_len']} "
            f"(grad_accum {c['grad_accum_steps']}: {c['rows_per_device']} sequence(s) per device "
            "per microbatch); they scale with rows per device"
        ),
        f"  analytic state: 16 bytes/trained param + the frozen params, per device = "
        f"{c['analytic_16_bytes_per_param'] / GiB:.2f} GiB",
    ]
    lines += ["", *_policy_table(result["policies"], device_bytes)]
    lines += [
        "",
        "params/optimizer: XLA's argument bytes (optimizer = arguments - params - batch).",
        "gradients: float32 shards like the params; XLA keeps them among its temporaries, so",
        "  activations = temp bytes - gradients (saved activations, recompute working set,",
        "  logits, gathered weights). peak = arguments + temps + non-donated outputs.",
    ]
    if c["backend"] == "cpu" and c["dtype"] != "float32":
        lines.append(
            f"note: XLA:CPU computes {c['dtype']} ops in float32, so compiled activations here "
            "can be up to ~2x a GPU's; compare the analytic column."
        )
    return "\n".join(lines)
