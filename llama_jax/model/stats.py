"""Parameter counts, FLOPs per token and state bytes, from abstract shapes (nothing allocated)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.config import ModelConfig
from llama_jax.model.llama import abstract_params


def param_shapes(cfg: ModelConfig):
    """The parameter tree as jax.ShapeDtypeStructs (nothing allocated)."""
    return nn.unbox(abstract_params(cfg))


def count_params(cfg: ModelConfig) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(param_shapes(cfg)))


def flops_per_token(cfg: ModelConfig, seq_len: int, n_params: int | None = None) -> dict:
    """Training FLOPs per token (forward + backward = 3x forward) on three bases.

    "6n": 6 x all parameters, the paper's accounting (the embedding lookup counts too, as in
    its 48% MFU figure). "attention": the score and value matmuls, 2*2*T*D per layer forward for
    full attention, halved because causal attention skips the masked half, times 3 for
    training. "total" is their sum, the causal basis. "palm": PaLM's (appendix B, used by
    MaxText's tables): 6 x the non-embedding parameters (all but the token and learned position
    tables, whose lookups do no matmul; the output layer stays, and so does a tied table, which
    is the head's matmul too) + 12 x L x D x T, the attention matmuls of full, unmasked attention.
    A tied table is one parameter tensor, so "6n" counts it once.
    """
    n = count_params(cfg) if n_params is None else n_params
    attention = 3 * 2 * 2 * cfg.n_layers * cfg.dim * seq_len / 2
    embedding = (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.dim) + (
        cfg.max_seq_len * cfg.dim if cfg.position == "learned" else 0
    )
    palm = 6.0 * (n - embedding) + 12.0 * cfg.n_layers * cfg.dim * seq_len
    return {"6n": 6.0 * n, "attention": attention, "total": 6.0 * n + attention, "palm": palm}


def mfu(tokens_per_sec: float, flops: dict, devices: int, peak: float | None) -> dict:
    """Model FLOPs utilization on the paper's 6N basis and on PaLM's (see flops_per_token),
    each labelled; {} when the device has no known peak (CPUs)."""
    if not peak:
        return {}
    return {f"mfu_{k}": tokens_per_sec * flops[k] / (devices * peak) for k in ("6n", "palm")}


def state_bytes(cfg: ModelConfig, n_params: int | None = None) -> dict:
    """Bytes of master weights and AdamW moments (both in param_dtype), and gradients."""
    n = count_params(cfg) if n_params is None else n_params
    itemsize = jnp.dtype(cfg.weight_dtype).itemsize
    return {"params": n * itemsize, "adamw": 2 * n * itemsize, "grads": n * itemsize}


def summary(cfg: ModelConfig, seq_len: int) -> dict:
    n = count_params(cfg)
    flops = flops_per_token(cfg, seq_len, n)
    return {
        "parameters": n,
        "flops_per_token": flops["total"],
        "flops_per_token_6n": flops["6n"],
        "flops_per_token_palm": flops["palm"],
        "flops_per_token_attention": flops["attention"],
        "seq_len": seq_len,
        "hidden_dim": cfg.mlp_dim,
        "head_dim": cfg.head_dim,
        "n_kv_heads": cfg.kv_heads,
        **{f"{k}_bytes": v for k, v in state_bytes(cfg, n).items()},
    }


# Dense bf16 peak FLOP/s per device, for MFU. CPUs have no meaningful peak: MFU is n/a there.
# Matched in order on device_kind, so the PCIe/NVL variants come before the SXM default.
PEAK_FLOPS = {
    "A100": 312e12,
    "H100 PCIE": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "B200": 2250e12,
}


def device_peak_flops(device=None) -> float | None:
    """The bf16 peak of a known accelerator (matched on its device_kind), else None."""
    kind = (device or jax.devices()[0]).device_kind.upper()
    for name, peak in PEAK_FLOPS.items():
        if name in kind:
            return peak
    return None
