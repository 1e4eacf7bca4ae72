"""Linear layers whose backward pass is laid out for the device's matmul library.

dense(spec, x, w) is jnp.einsum(spec, x, w) for a linear layer: x's leading letters are
batch letters (B, T), its trailing ones are contracted with w's leading ones. Its weight
gradient sums over the batch letters, which lead in both x and the output's cotangent g: a
"transposed A" GEMM. BLAS and cuBLAS take a transpose flag for free; XLA:CPU's library
(YNNPACK) wants the contracted dimension minor, so XLA either copies g ([B, T, V] for the
output layer: 32 MiB at vocab 4096) into a transposed layout, or falls back to an Eigen dot
that runs beside the other thunks and fights them for the cores. On CPU dense's backward
copies x instead, the smaller operand, into [contracted, batch] order first (an optimization
barrier keeps XLA from folding the copy back into the dot). Elsewhere dense is the einsum.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _letters(spec: str) -> tuple[str, str, str]:
    ins, out = spec.split("->")
    xs, ws = ins.split(",")
    return xs, ws, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dense_cpu(spec, x, w):
    return jnp.einsum(spec, x, w)


def _dense_fwd(spec, x, w):
    return jnp.einsum(spec, x, w), (x, w)


def weight_grad(spec: str, x, g):
    """The weight gradient of jnp.einsum(spec, x, w) given the output's cotangent g: the sum
    over the batch letters of x times g, with x copied to [contracted, batch] order on CPU."""
    xs, ws, out = _letters(spec)
    if jax.default_backend() != "cpu":
        return jnp.einsum(f"{xs},{out}->{ws}", x, g)
    contracted = "".join(c for c in xs if c in ws)  # D (or NH for the attention output)
    batch = "".join(c for c in xs if c not in ws)  # B, T
    xt = x.transpose([xs.index(c) for c in contracted + batch])  # [D, B, T]
    xt = jax.lax.optimization_barrier(xt)
    return jnp.einsum(f"{contracted + batch},{out}->{ws}", xt, g)


def _dense_bwd(spec, res, g):
    x, w = res
    xs, ws, out = _letters(spec)
    dx = jnp.einsum(f"{out},{ws}->{xs}", g, w)
    return dx.astype(x.dtype), weight_grad(spec, x, g).astype(w.dtype)


_dense_cpu.defvjp(_dense_fwd, _dense_bwd)


def dense(spec: str, x, w):
    """jnp.einsum(spec, x, w), e.g. dense("BTD,DNH->BTNH", x, wq): the same value and
    gradients, with a CPU-friendly weight gradient (see the module docstring)."""
    if jax.default_backend() != "cpu":
        return jnp.einsum(spec, x, w)
    return _dense_cpu(spec, x, w)
