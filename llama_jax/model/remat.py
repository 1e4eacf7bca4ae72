"""The remat policy table: what each scanned block keeps for the backward pass, by name.

One table serves both users: the model applies `policy` (a jax.checkpoint policy naming the
checkpoint_name tags in model/llama.py's math), and train/memory.py's analytic estimate reads `saved`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from llama_jax import config_fields

_cp = jax.checkpoint_policies
LINEAR_OUTPUTS = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp_gate", "mlp_up", "mlp_down")


class Remat(NamedTuple):
    policy: Any  # a jax.checkpoint policy; None = no remat
    # Activation elements saved per token per layer, in units of the compute dtype, as a
    # function of (D model dim, F ffn hidden, KH kv width); a rough count (XLA fuses some away).
    saved: Callable[[int, int, int], int]
    # How many of those are D-wide tensors of the residual layout (the block input, the
    # row-parallel outputs o_proj and mlp_down, norms): replicated over tensor parallelism,
    # split over it by sequence parallelism; the rest live inside the tensor-parallel regions.
    residual: int = 1


REMAT_POLICIES: dict[str, Remat] = {
    # No remat: every intermediate (norms, q/k/v before and after rope, attention output,
    # o_proj, residuals, gate/up/silu/product, down).
    "none": Remat(None, lambda D, F, KH: 10 * D + 3 * KH + 4 * F, residual=6),
    # Only the block input (the scan carry).
    "full": Remat(_cp.nothing_saveable, lambda D, F, KH: D),
    # The paper's choice: input, q, o, down + k, v + gate, up.
    "save_linear": Remat(
        _cp.save_only_these_names(*LINEAR_OUTPUTS),
        lambda D, F, KH: 4 * D + 2 * KH + 2 * F,
        residual=3,
    ),
    # input, q, attn_out + k, v.
    "save_qkv_attn": Remat(
        _cp.save_only_these_names("q_proj", "k_proj", "v_proj", "attn_out"),
        lambda D, F, KH: 3 * D + 2 * KH,
    ),
    # Linear outputs go to pinned host memory (on CPU the same as save_linear).
    "offload_linear": Remat(
        _cp.save_and_offload_only_these_names(
            names_which_can_be_saved=(),
            names_which_can_be_offloaded=LINEAR_OUTPUTS,
            offload_src="device",
            offload_dst="pinned_host",
        ),
        lambda D, F, KH: D,
    ),
}
if tuple(REMAT_POLICIES) != config_fields.REMAT_POLICIES:  # the schema names them; this serves them
    raise ImportError(
        f"config_fields.REMAT_POLICIES {config_fields.REMAT_POLICIES} != {tuple(REMAT_POLICIES)}"
    )


def check(name: str) -> str:
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; valid: {sorted(REMAT_POLICIES)}")
    return name


def remat_policy(name: str):
    """The jax.checkpoint policy of a name in REMAT_POLICIES (None for "none")."""
    return REMAT_POLICIES[check(name)].policy
