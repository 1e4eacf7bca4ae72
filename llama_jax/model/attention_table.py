"""attention_impl="auto" by measurement: the fastest implementation for a device and shape.

attention_table.json, beside this module, holds what `python -m launch.benchmark attention
--attn-table` measured: per platform, device kind, dtype, sequence length T and head_dim H,
the forward+backward milliseconds of each implementation. choose() takes the measured point
nearest to the call's (T, H) on the same platform and dtype (nearest in log2 T + log2 H) and
returns the fastest implementation there among the ones this call can use. The reference
implementation stores each layer's [B, N, T, S] float32 probabilities for the backward pass,
so it is a candidate only while they fit REFERENCE_BUDGET_BYTES.
"""

from __future__ import annotations

import datetime
import json
import math
import os

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attention_table.json")
REFERENCE_BUDGET_BYTES = 64 * 2**20


def load(path: str = TABLE_PATH) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["entries"]


def _key(e: dict) -> tuple:
    return (e["platform"], e["device"], e["dtype"], e["T"], e["H"])


def merge(entries: list[dict], path: str = TABLE_PATH) -> list[dict]:
    """Writes entries into the table at path, replacing earlier ones of the same key."""
    new = {_key(e): e for e in entries}
    kept = [e for e in load(path) if _key(e) not in new]
    table = sorted([*kept, *new.values()], key=_key)
    doc = {
        "about": "written by `python -m launch.benchmark attention --attn-table`; "
        "read by llama_jax.model.attention_table.choose for attention_impl=auto",
        "updated": datetime.date.today().isoformat(),
        "entries": table,
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    return table


def reference_fits(rows: int | None, T: int | None, S: int | None) -> bool:
    """Whether the reference's [rows = B*N, T, S] float32 probabilities fit the budget."""
    if rows is None or T is None:
        return False
    return rows * T * (S or T) * 4 <= REFERENCE_BUDGET_BYTES


def choose(
    platform: str, dtype: str, T: int | None, H: int, candidates: list[str], table=None
) -> tuple[str, str] | None:
    """(implementation, reason) measured fastest among candidates at the nearest point, or
    None when the table has no measurement for this platform and dtype (or T is unknown)."""
    entries = [e for e in (load() if table is None else table) if e["platform"] == platform]
    entries = [e for e in entries if e["dtype"] == dtype and set(candidates) & set(e["ms"])]
    if T is None or not entries:
        return None
    e = min(entries, key=lambda e: abs(math.log2(e["T"] / T)) + abs(math.log2(e["H"] / H)))
    times = {k: v for k, v in e["ms"].items() if k in candidates}
    best = min(times, key=times.get)
    shown = ", ".join(f"{k} {v:.3g} ms" for k, v in sorted(times.items(), key=lambda kv: kv[1]))
    return best, f"measured on {e['device']} {dtype} at T={e['T']} H={e['H']}: {shown}"
