"""Mesh construction and the one table that maps logical axis names to mesh axes.

model/llama.py names only logical axes (embed, heads, mlp, batch, ...). Everything that decides
where those axes live on hardware is here, so a layout change is a one-line rule edit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "context")  # make_mesh's (and mesh config's) order
# The device grid's order: tensor innermost, on the closest devices (NVLink), context next.
GRID_AXES = ("data", "fsdp", "context", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axis (or tuple of axes, or None = replicated). Rules are tried in
# order and a mesh axis is used at most once per array, so for an activation
# [batch, length, embed] the batch rule takes "fsdp" first and embed stays replicated,
# while a weight [embed, mlp] gets FSDP over embed and tensor parallelism over mlp.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),  # data parallel + the FSDP ranks each see their own rows
    # The sequence: inside attention and the MLP ("length") and in the residual stream
    # between them ("residual_length"): split over context for the whole model (context
    # parallelism); sequence parallelism adds tensor to the residual's (axis_rules).
    ("residual_length", "context"),
    ("length", "context"),
    ("embed", "fsdp"),  # FSDP: weights and optimizer state sharded over the model dim
    ("heads", "tensor"),  # Megatron tensor parallel: attention heads...
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),  # ...the SwiGLU hidden dim...
    ("vocab", "tensor"),  # ...and the vocabulary (embedding rows, logits)
    ("head_dim", None),
    ("layers", None),  # the nn.scan axis of stacked block weights
)


def axis_rules(sequence_parallel: bool = False) -> tuple[tuple[str, Any], ...]:
    """The rule table, with sequence parallelism (Korthikanti et al. 2022) when asked: the
    residual stream, the norms and the loss input split along the sequence over tensor too,
    so XLA all-gathers entering each column-parallel block (q/k/v, w1/w3) and
    reduce-scatters leaving each row-parallel one (wo, w2) instead of all-reducing."""
    if not sequence_parallel:
        return LOGICAL_AXIS_RULES
    sp = ("residual_length", ("context", "tensor"))
    return tuple(
        sp if name == "residual_length" else (name, axes) for name, axes in LOGICAL_AXIS_RULES
    )


def make_mesh(
    data: int = 1,
    fsdp: int = -1,
    tensor: int = 1,
    context: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds the mesh of GRID_AXES over all devices of all processes.

    Args:
      data, fsdp, tensor, context: axis sizes; one may be -1 (the devices left over).
      devices: defaults to jax.devices() (every process's devices).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [data, fsdp, tensor, context]
    described = ", ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes))
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"{described}: each size must be positive, and at most one may be -1")
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
        if n % fixed:
            raise ValueError(f"{described}: {fixed} does not divide the {n} devices")
        sizes[free[0]] = n // fixed
    if math.prod(sizes) != n:
        raise ValueError(
            f"{described}: the sizes multiply to {math.prod(sizes)}, but there are {n} devices; "
            "make the product equal the device count or set one size to -1"
        )
    size = dict(zip(MESH_AXES, sizes))
    return jax.make_mesh(
        tuple(size[a] for a in GRID_AXES),
        GRID_AXES,
        axis_types=(AxisType.Auto,) * len(GRID_AXES),
        devices=devices,
    )


def logical_to_mesh_spec(logical: P | Sequence[str | None], rules=LOGICAL_AXIS_RULES) -> P:
    """A logical PartitionSpec (e.g. P("embed", "mlp")) -> the mesh PartitionSpec."""
    return nn.logical_to_mesh_axes(tuple(logical), rules)


def logical_to_sharding(logical_spec_tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES, shapes=None):
    """Maps a tree of logical PartitionSpecs (nn.get_partition_spec output) to NamedShardings.

    With `shapes` (a matching tree of arrays or ShapeDtypeStructs), a mesh axis that does
    not divide its dimension is dropped (that dim is replicated over it) instead of failing:
    e.g. 8 kv heads on a tensor axis of 16 are replicated, as Megatron does for GQA.
    """
    is_spec = lambda x: isinstance(x, P)
    if shapes is None:
        return jax.tree.map(
            lambda spec: NamedSharding(mesh, logical_to_mesh_spec(spec, rules)),
            logical_spec_tree,
            is_leaf=is_spec,
        )
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, _fit(logical_to_mesh_spec(spec, rules), x.shape, mesh)),
        logical_spec_tree,
        shapes,
        is_leaf=is_spec,
    )


def _fit(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drops (trailing) mesh axes from each dim of spec until they divide the dim."""
    out = []
    for i, axes in enumerate(spec):
        axes = [axes] if isinstance(axes, str) else list(axes or ())
        while axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
            axes.pop()
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*out)


def tree_shardings(boxed, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """(shapes, shardings) of a tree still boxed in nn.Partitioned (e.g. jax.eval_shape of a
    model's init): the one recipe from logical names to NamedShardings on `mesh`."""
    shapes = nn.meta.unbox(boxed)
    specs = nn.get_partition_spec(boxed)
    return shapes, logical_to_sharding(specs, mesh, rules, shapes=shapes)


def batch_shards(mesh: Mesh) -> int:
    """Devices a batch's rows are split over (data x fsdp)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[B, T] token batches: rows over ("data", "fsdp"), sequence whole on each device."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


@contextlib.contextmanager
def model_context(mesh: Mesh | None, rules=LOGICAL_AXIS_RULES):
    """Makes the model's nn.with_logical_constraint calls bind to `mesh` via `rules`.

    Usable inside jit (it sets the abstract mesh, not the concrete one). With mesh None the
    constraints stay no-ops, which is how the unsharded reference runs.
    """
    if mesh is None:
        yield
        return
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
        yield
