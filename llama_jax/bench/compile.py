"""Compile time of forward+backward vs depth: scanned layers keep it flat.

The limit here is the shallowest model's compile time: "vs_first" near 1 at every depth
means compile cost does not grow with layers (one compile per depth, single run each).
"""

from __future__ import annotations

import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from llama_jax.bench.common import load_config
from llama_jax.config import ModelConfig
from llama_jax.model.llama import Llama, abstract_params


def add_args(parser):
    parser.add_argument("--compile-layers", default="4,32", help="depths to compile")


def _compile_seconds(cfg: ModelConfig, seq_len: int) -> tuple[float, int]:
    model = Llama(cfg)
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    params = {"params": nn.unbox(abstract_params(cfg))}

    def loss(p, t):
        logits = model.apply(p, t)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], t[:, 1:]).mean()

    t0 = time.perf_counter()
    lowered = jax.jit(jax.value_and_grad(loss)).lower(params, tokens)
    lowered.compile()
    return time.perf_counter() - t0, len(lowered.as_text())


def measure(args) -> list[dict]:
    cfg = load_config(args)
    seq_len = min(cfg.train.seq_len, 256)
    rows = []
    for n in [int(x) for x in str(getattr(args, "compile_layers", "4,32")).split(",")]:
        mc = dataclasses.replace(cfg.model, n_layers=n)
        seconds, size = _compile_seconds(mc, seq_len)
        rows.append(
            {
                "layers": n,
                "seq_len": seq_len,
                "compile_s": seconds,
                "stablehlo_chars": size,
            }
        )
    for r in rows:
        r["vs_first"] = r["compile_s"] / rows[0]["compile_s"]
    return rows
