"""Where a compiled step's time goes: a jax.profiler trace mapped onto the optimized HLO.

Each op event of the trace (a CPU thunk, or a GPU kernel's hlo_op) is an HLO instruction of
the step's optimized module; its category comes from that instruction:

  collectives  all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute
  optimizer    ops under jax.named_scope("optimizer") (train_step: norm, clip, AdamW)
  attention    ops under attention.SCOPE (the attention kernel, forward and backward)
  matmul       other instructions that are or contain a dot/convolution (projections, head)
  loss         other ops under "loss" (loss.head_loss: logsumexp, the target pick, its backward)
  copies       copy, transpose, (dynamic-)slice/update, gather/scatter, concatenate, pad
  loop         while/call/conditional bodies' own bookkeeping (not the ops inside)
  elementwise  every other fusion: norms, rope, SwiGLU's gate, residual adds, casts
  idle         wall time inside the step when no op runs (launch, sync, host work)

Wall time is split, not summed: at each instant the running ops share it equally (an op
spread over two threads gets both halves), nested events (a while loop and its body's ops)
count for the innermost one, and an op whose "end:" marker comes after its own event (an Eigen
dot finishing on a pool the trace does not show) counts until the marker. So the categories
add up to the traced step's wall time; the tracer's own cost (~1 us per op event) is the gap
to an untraced step, which breakdown_rows reports.
"""

from __future__ import annotations

import bisect
import collections
import glob
import os
import re
import tempfile
from typing import NamedTuple

import jax

from llama_jax.bench.common import time_fn
from llama_jax.model.attention import SCOPE as ATTENTION_SCOPE

CATEGORIES = (
    "matmul",
    "attention",
    "loss",
    "elementwise",
    "copies",
    "optimizer",
    "collectives",
    "loop",
    "idle",
)
COLLECTIVES = {
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
    "all-reduce-start",
    "all-gather-start",
    "collective-permute-start",
}
COPIES = {
    "copy",
    "transpose",
    "slice",
    "dynamic-slice",
    "dynamic-update-slice",
    "gather",
    "scatter",
    "concatenate",
    "pad",
    "copy-start",
}
LOOPS = {"while", "call", "conditional"}
MATMULS = {"dot", "convolution"}
ANNOTATION = "llama_jax/profiled_step"

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%?([\w.\-]+) = .*? ([a-z][a-z0-9\-]*)\((.*)$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CUSTOM_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_SCOPE_WORD = re.compile(r"[\w.\-]+")
_OPERAND = re.compile(r"%([\w.\-]+)")


class Op(NamedTuple):
    opcode: str
    op_name: str  # metadata: the jax name stack ("jit(step_fn)/transpose(jvp(Llama))/...")
    calls: tuple[str, ...]  # computations it runs (fusion bodies, loop bodies, reducers)
    target: str  # a custom-call's target
    operands: tuple[str, ...]


def parse_hlo(text: str) -> tuple[dict[str, Op], dict[str, list[str]], dict[str, str]]:
    """(instruction name -> Op, computation -> its instruction names, computation -> root)."""
    ops: dict[str, Op] = {}
    comps: dict[str, list[str]] = collections.defaultdict(list)
    roots: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = _INSTRUCTION.match(line)
        if m and current is not None:
            root, name, opcode, rest = m.groups()
            op_name = _OP_NAME.search(rest)
            target = _CUSTOM_TARGET.search(rest)
            ops[name] = Op(
                opcode,
                op_name.group(1) if op_name else "",
                tuple(_CALLS.findall(rest)),
                target.group(1) if target else "",
                tuple(_OPERAND.findall(rest.split(")", 1)[0])),
            )
            comps[current].append(name)
            if root:
                roots[current] = name
            continue
        m = _COMPUTATION.match(line)
        if m:
            current = m.group(1)
    return ops, dict(comps), roots


def _contains(ops, comps, names, opcodes, seen=None) -> bool:
    """Whether any of these instructions, or a computation they call, has one of opcodes."""
    seen = set() if seen is None else seen
    for n in names:
        op = ops.get(n)
        if op is None:
            continue
        library_gemm = any(w in op.target.lower() for w in ("gemm", "matmul"))  # cuBLAS(Lt)
        if op.opcode in opcodes or (library_gemm and "dot" in opcodes):
            return True
        for c in op.calls:
            if c not in seen and op.opcode != "while":
                seen.add(c)
                if _contains(ops, comps, comps.get(c, ()), opcodes, seen):
                    return True
    return False


def categorize(name: str, ops, comps, roots) -> str:
    """The CATEGORIES entry of one HLO instruction (see the module docstring)."""
    op = ops[name]
    if op.opcode in COLLECTIVES:
        return "collectives"
    scopes = set(_SCOPE_WORD.findall(op.op_name))  # "transpose(jvp(loss))/..." has "loss"
    if "optimizer" in scopes:
        return "optimizer"
    if ATTENTION_SCOPE in scopes:
        return "attention"
    if op.opcode in LOOPS:
        return "loop"
    if _contains(ops, comps, [name], MATMULS):
        return "matmul"
    if "loss" in scopes:
        return "loss"
    if op.opcode in COPIES:
        return "copies"
    if op.opcode == "fusion" and op.calls:  # a fusion that moves data: its root (under
        root = ops.get(roots.get(op.calls[0], ""))  # bitcasts, which are free) is a copy
        while root is not None and root.opcode == "bitcast" and root.operands:
            root = ops.get(root.operands[0])
        if root is not None and root.opcode in COPIES:
            return "copies"
    return "elementwise"


def _leaf_segments(events) -> list[tuple[int, int, str]]:
    """[(start, end, name)] of one thread, nested events resolved to the innermost one."""
    out, stack = [], []  # stack of (end, name)
    cursor = None
    for start, end, name in sorted(events, key=lambda e: (e[0], -e[1])):
        while stack and stack[-1][0] <= start:
            top_end, top = stack.pop()
            if cursor < top_end:
                out.append((cursor, top_end, top))
            cursor = max(cursor, top_end)
        if stack and cursor < start:
            out.append((cursor, start, stack[-1][1]))
        stack.append((end, name))
        cursor = start
    while stack:
        top_end, top = stack.pop()
        if cursor < top_end:
            out.append((cursor, top_end, top))
        cursor = max(cursor, top_end)
    return out


def share_time(segments, windows) -> tuple[dict[str, float], float]:
    """Nanoseconds per op name inside windows, concurrent ops sharing each instant equally;
    and the idle nanoseconds (no op running) inside them."""
    points = []
    for s, e, name in segments:
        points += [(s, 1, name), (e, -1, name)]
    for s, e in windows:
        points += [(s, 2, None), (e, -2, None)]
    points.sort(key=lambda p: (p[0], p[1]))
    per_op: dict[str, float] = collections.defaultdict(float)
    active: collections.Counter = collections.Counter()
    idle, inside, last = 0.0, 0, None
    for t, kind, name in points:
        if last is not None and t > last and inside:
            n = sum(active.values())
            if n == 0:
                idle += t - last
            for op, c in active.items():
                per_op[op] += (t - last) * c / n
        last = t
        if kind in (1, -1):
            active[name] += kind
            if active[name] == 0:
                del active[name]
        else:
            inside += 1 if kind == 2 else -1
    return dict(per_op), idle


def _event_op(event, ops) -> str | None:
    if event.name in ops:
        return event.name
    stats = dict(event.stats)
    hlo_op = stats.get("hlo_op")
    return hlo_op if hlo_op in ops else None


def _async_ends(events) -> dict[str, list[int]]:
    """Sorted end times of each op's "end: NAME" marker events (one per op execution)."""
    ends = collections.defaultdict(list)
    for e in events:
        if e.name.startswith("end: "):
            ends[e.name[5:]].append(e.end_ns)
    return {k: sorted(v) for k, v in ends.items()}


def _line_segments(events, ops, ends) -> list[tuple[int, int, str]]:
    """One thread's op segments. An op whose "end: NAME" marker comes after its own event
    ended (an Eigen dot finishing on a pool the trace does not show) runs asynchronously
    until that marker: a segment of its own, sharing time with whatever else runs."""
    nested, async_ops = [], []
    for e in events:
        name = _event_op(e, ops)
        if name is None:
            continue
        done = ends.get(name, [])
        i = bisect.bisect_left(done, e.start_ns)
        end = done[i] if i < len(done) else e.end_ns
        # a loop's marker comes after its body's ops, which have events of their own
        if end > e.end_ns + 1000 and ops[name].opcode not in LOOPS:
            async_ops.append((e.start_ns, end, name))
        else:
            nested.append((e.start_ns, e.end_ns, name))
    return _leaf_segments(nested) + async_ops


def trace_breakdown(xspace_path: str, ops) -> tuple[dict[str, float], float, list]:
    """(ns per op name, idle ns, windows) of the ANNOTATION windows of one trace file."""
    data = jax.profiler.ProfileData.from_file(xspace_path)
    lines = [list(line.events) for plane in data.planes for line in plane.lines]
    ends = _async_ends(e for events in lines for e in events)
    windows = [(e.start_ns, e.end_ns) for ev in lines for e in ev if e.name == ANNOTATION]
    segments = [s for events in lines for s in _line_segments(events, ops, ends)]
    per_op, idle = share_time(segments, windows)
    return per_op, idle, windows


def profile(fn, hlo_text: str, *, steps: int = 5, keep_dir: str = "") -> dict:
    """Traces `steps` calls of fn() (each blocked on) and breaks their wall time down.

    Returns {"step_s": mean traced step wall time, "untraced_s": the median of as many
    untraced steps timed just before, "categories": {category: seconds per step}, "top":
    [(seconds per step, category, op name, op_name metadata), ...]}. With keep_dir the
    trace (TensorBoard/xprof/Perfetto) and the optimized HLO stay there.
    """
    ops, comps, roots = parse_hlo(hlo_text)
    untraced = time_fn(fn, warmup=1, repeats=steps)["median"]
    with tempfile.TemporaryDirectory() as tmp:
        d = keep_dir or tmp
        if keep_dir:
            os.makedirs(keep_dir, exist_ok=True)
            with open(os.path.join(keep_dir, "step.optimized_hlo.txt"), "w") as f:
                f.write(hlo_text)
        options = jax.profiler.ProfileOptions()
        options.python_tracer_level = 0  # Python calls are not ops; tracing them costs time
        with jax.profiler.trace(d, profiler_options=options):
            jax.block_until_ready(fn())  # the tracer's own start-up stays out of the windows
            for _ in range(steps):
                with jax.profiler.TraceAnnotation(ANNOTATION):
                    jax.block_until_ready(fn())
        files = sorted(glob.glob(f"{d}/**/*.xplane.pb", recursive=True), key=os.path.getmtime)
        if not files:
            raise RuntimeError(f"jax.profiler wrote no trace under {d}")
        per_op, idle, windows = trace_breakdown(files[-1], ops)
    if len(windows) != steps:
        raise RuntimeError(f"the trace holds {len(windows)} of {steps} step annotations")
    cats = dict.fromkeys(CATEGORIES, 0.0)
    cats["idle"] = idle / steps / 1e9
    top = []
    for name, ns in per_op.items():
        cat = categorize(name, ops, comps, roots)
        cats[cat] += ns / steps / 1e9
        top.append((ns / steps / 1e9, cat, name, ops[name].op_name))
    wall = sum(e - s for s, e in windows) / steps / 1e9
    return {
        "step_s": wall,
        "untraced_s": untraced,
        "categories": cats,
        "top": sorted(top, reverse=True),
    }


def breakdown_rows(label: str, result: dict) -> list[dict]:
    """Table rows of one profile: a row per category (ms per step, share of the traced step,
    how many HLO ops, the costliest one), then their sum against the untraced step time."""
    rows = []
    for cat, sec in result["categories"].items():
        mine = [t for t in result["top"] if t[1] == cat]
        top = f"{mine[0][2]} {_short(mine[0][3])}" if mine else ""
        rows.append(
            {
                "policy": label,
                "category": cat,
                "ms": sec * 1e3,
                "share": sec / result["step_s"],
                "ops": len(mine),
                "top_op": top[:80],
            }
        )
    total = sum(result["categories"].values())
    rows.append(
        {
            "policy": label,
            "category": "sum (vs untraced step)",
            "ms": total * 1e3,
            "share": total / result["untraced_s"],
        }
    )
    return rows


def _short(op_name: str) -> str:
    """The informative tail of an op_name: its last two scopes."""
    return "/".join(op_name.split("/")[-2:])
