"""Shared timing, memory and table helpers for the benchmark sections."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax


def time_fn(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5) -> dict:
    """Wall seconds of fn() (outputs blocked on) over repeats after warmup: median/min/max."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def compiled_memory(compiled) -> dict:
    """Per-device bytes from XLA's memory_analysis() of a compiled executable."""
    m = compiled.memory_analysis()
    if m is None:
        return {"temp_bytes": None, "argument_bytes": None, "output_bytes": None}
    return {
        "temp_bytes": int(m.temp_size_in_bytes),
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
    }


def load_config(args):
    """The section's RunConfig: --config with its --config.group.field=value overrides
    (parsed once by launch.benchmark, as args.cfg)."""
    return args.cfg


def cpu_model() -> str:
    """The host CPU's model name (lscpu's "Model name"), with its core count: a CPU timing
    holds for that CPU only (AMD and Intel machines of the same size differ)."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    except OSError:
        names = []
    name = names[0] if names else (platform.processor() or platform.machine())
    return f"{name}, {os.cpu_count()} cores"


def device_description() -> str:
    d = jax.devices()[0]
    where = cpu_model() if d.platform == "cpu" else d.device_kind
    return f"{len(jax.devices())} x {d.device_kind} ({d.platform}; {where})"


def fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.3e}"
    return str(v)


def print_table(
    title: str, rows: list[dict], *, as_json: bool = False, device: str | None = None
) -> None:
    """Prints rows as one aligned text table (or one JSON object per section with --json)."""
    device = device or device_description()
    if as_json:
        print(json.dumps({"section": title, "device": device, "rows": rows}))
        return
    print(f"\n## {title}  [{device}]")
    if not rows:
        print("(no rows)")
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
