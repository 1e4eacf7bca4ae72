"""Benchmark section "parallel": the train step per mesh, its time and its communication.

Per mesh over this host's devices (8 simulated CPU devices in CI and on a laptop): the step's
median time and tokens/s, and the bytes its compiled HLO moves per device per step, by
collective (the result bytes of each all-reduce, all-gather, reduce-scatter,
collective-permute and all-to-all, times the trip count of every loop it sits in: the
scanned layers). Next to them, the analytic bytes of the ring's K/V traffic, the one that
context parallelism adds: per layer, K and V blocks of B/(data fsdp) x T/context x K x H
(K split over tensor where it divides) sent context - 1 times forward and again backward,
and their float32 dK, dV context times. On CPU a reduce-scatter is an all-reduce and a slice
(XLA:CPU never forms reduce-scatter), and GQA under tensor parallelism (kv heads
replicated) adds collective-permutes of its own, so with tensor > 1 the measured
collective-permute bytes exceed the ring's.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import numpy as np

from llama_jax.bench.common import load_config, time_fn
from llama_jax.config import MeshConfig, RunConfig
from llama_jax.parallel import sharding as shd
from llama_jax.train import step as ts

# name -> mesh options, for 8 devices
MESHES = {
    "data8": dict(data=8, fsdp=1),
    "fsdp8": dict(fsdp=8),
    "fsdp2-tensor4": dict(fsdp=2, tensor=4),
    "fsdp2-tensor4-sp": dict(fsdp=2, tensor=4, sequence_parallel=True),
    "fsdp4-context2-allgather": dict(fsdp=4, context=2),
    "fsdp2-context4-ring": dict(fsdp=2, context=4, context_strategy="ring"),
    "fsdp2-context2-tensor2-sp-ring": dict(
        fsdp=2, context=2, tensor=2, sequence_parallel=True, context_strategy="ring"
    ),
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}


def _shape_bytes(shape: str) -> int:
    """Bytes of an HLO result shape, e.g. f32[8,32]{1,0} or a tuple of them."""
    total = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape):
        total += _BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
    return total


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes per collective kind of one execution of the optimized HLO module `hlo`: each
    instruction's result bytes times the trip counts of the while loops around it."""
    header = re.compile(r"^(?:ENTRY )?(%[\w.-]+) ")
    instr = re.compile(r"^\s*(?:ROOT )?%[\w.-]+ = (\([^=]*?\)|\S+) ([\w-]+)\(")
    bodies, calls, comp = {}, {}, None
    for line in hlo.splitlines():
        line = re.sub(r"/\*.*?\*/", "", line)  # tuple shapes carry /*index=5*/ comments
        if (m := header.match(line)) and line.rstrip().endswith("{"):
            comp = m.group(1)
            bodies[comp] = []
            continue
        if comp is None or not (m := instr.match(line)):
            continue
        bodies[comp].append((m.group(1), m.group(2).removesuffix("-start")))
        trip = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
        for attr, name in re.findall(r"(body|calls|to_apply|condition)=(%[\w.-]+)", line):
            calls.setdefault(comp, []).append(
                (name, int(trip.group(1)) if trip and attr == "body" else 1)
            )
    entry = next(
        m.group(1) for line in hlo.splitlines() if (m := re.match(r"^ENTRY (%[\w.-]+)", line))
    )
    times = {entry: 1}
    order = [entry]
    for c in order:  # breadth first from the entry: each computation's executions
        for callee, n in calls.get(c, []):
            if callee not in times:
                order.append(callee)
            times[callee] = times.get(callee, 0) + times[c] * n
    out = dict.fromkeys(COLLECTIVES, 0)
    for c, n in times.items():
        for shape, op in bodies.get(c, []):
            if op in out:
                out[op] += n * _shape_bytes(shape)
    return out


def ring_kv_bytes(cfg: RunConfig, mesh) -> int:
    """Analytic bytes one device sends around the ring per step (module docstring)."""
    P = mesh.shape["context"]
    if P == 1 or cfg.mesh.context_strategy != "ring":
        return 0
    mc = cfg.model
    rows = cfg.train.batch_size // shd.batch_shards(mesh)
    t = mesh.shape["tensor"]
    kv_heads = mc.kv_heads // t if mc.kv_heads % t == 0 else mc.kv_heads  # as sharding._fit
    block = rows * (cfg.train.seq_len // P) * kv_heads * mc.head_dim
    item = np.dtype(mc.compute_dtype).itemsize
    per_layer = 2 * block * item * 2 * (P - 1) + 2 * block * 4 * P
    return per_layer * mc.n_layers


def _row(cfg: RunConfig, name: str, repeats: int) -> dict:
    mesh = shd.make_mesh(*cfg.mesh.sizes)
    state, shardings = ts.create_train_state(cfg, mesh)
    step = ts.make_train_step(cfg, mesh, shardings)
    B, T, V = cfg.train.batch_size, cfg.train.seq_len, cfg.model.vocab_size
    toks = np.random.default_rng(0).integers(0, V, (B, T + 1)).astype(np.int32)
    batch = jax.device_put(
        {"inputs": toks[:, :-1], "targets": toks[:, 1:]}, shd.batch_sharding(mesh)
    )
    hlo = step.lower(state, batch, {}).compile().as_text()
    box = [state]

    def run():
        box[0], metrics = step(box[0], batch, {})
        return metrics

    t = time_fn(run, warmup=1, repeats=repeats)
    moved = collective_bytes(hlo)
    row = {"mesh": name, "ms": round(1e3 * t["median"], 1), "tokens/s": round(B * T / t["median"])}
    row.update({f"{k} MB": round(v / 1e6, 2) for k, v in moved.items() if v})
    row["ring K/V MB (analytic)"] = round(ring_kv_bytes(cfg, mesh) / 1e6, 2)
    return row


def measure(args) -> list[dict]:
    cfg = load_config(args)
    if jax.device_count() != 8:
        return [{"skipped": f"needs 8 devices, have {jax.device_count()} (XLA_FLAGS="
                 "--xla_force_host_platform_device_count=8 on CPU)"}]  # fmt: skip
    names = [n for n in args.parallel_meshes.split(",") if n] or list(MESHES)
    rows = []
    for name in names:
        mesh = {**dataclasses.asdict(MeshConfig()), **MESHES[name]}
        c = cfg.replace({f"mesh.{k}": v for k, v in mesh.items()})
        rows.append(_row(c, name, args.parallel_repeats))
    return rows


def add_args(parser) -> None:
    parser.add_argument("--parallel-meshes", default="", help=f"comma list of {list(MESHES)}")
    parser.add_argument("--parallel-repeats", type=int, default=5)
