"""Architecture ablations the cheap way: small model, fixed token budget, several init seeds.

A sweep trains every variant of a base config on the same data in the same order
(train.data_seed is pinned) for the same number of tokens, once per init seed, and reports
validation loss. By default the variants are one-factor-at-a-time: the base config (LLaMA's
choices) plus one run per alternative value of each varied field, every other field kept;
grid=True crosses all axes instead.

    workdir/
      sweep.json                     the variants, seeds and budget (a resumed sweep must match)
      <variant>/seed<k>/             one trainer.train run: metrics.jsonl, checkpoints, ...
      <variant>/seed<k>/done.json    written when the run finished; a rerun skips it
      results.csv, results.md        one row per variant: mean and spread over seeds
      ablation.png                   validation loss vs tokens, seed range shaded

A run cut short (Ctrl-C, SIGTERM, a killed process) resumes from its last checkpoint when the
sweep is started again; finished runs are not repeated.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import logging
import math
import os
import time

import numpy as np

from llama_jax.config import RunConfig, parse_value
from llama_jax.model import stats
from llama_jax.trainer import loop as trainer

log = logging.getLogger(__name__)

DONE = "done.json"


class SweepInterrupted(RuntimeError):
    """A signal stopped a run; its checkpoint is saved and the same call resumes the sweep."""


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str  # directory-safe label: "baseline", "norm=layernorm", "mlp=gelu+position=none"
    changes: tuple[tuple[str, str], ...]  # ((dotted field, value string), ...) vs the base


def parse_vary(spec: str) -> tuple[str, list[str]]:
    """ "model.norm=rmsnorm,layernorm" -> ("model.norm", ["rmsnorm", "layernorm"])."""
    key, sep, values = spec.partition("=")
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key.strip() or not vals:
        raise ValueError(f"--vary needs field=value[,value...], got {spec!r}")
    return key.strip(), vals


def parse_tokens(text) -> int:
    """ "2M", "1.5e6", "500k" or 2000000 -> tokens."""
    s = str(text).strip().lower().replace("_", "")
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}.get(s[-1:], 1)
    n = int(float(s[:-1] if scale != 1 else s) * scale)
    if n <= 0:
        raise ValueError(f"token budget must be positive, got {text!r}")
    return n


def _label(key: str, value: str) -> str:
    return f"{key.removeprefix('model.')}={value}".replace("/", "_")


def make_variants(base_cfg, axes, grid: bool = False) -> list[Variant]:
    """The variants of a sweep, baseline first.

    Args:
      base_cfg: the config every variant starts from (its values are the baseline).
      axes: [(dotted field, [value strings])], e.g. from parse_vary.
      grid: cross all axes instead of changing one field at a time.
    """
    typed = []  # per axis: [(value string, parsed value)], so "1e-3" and "0.001" are one value
    for key, values in axes:
        parsed = [(v, parse_value(key, v)) for v in values]
        typed.append((key, base_cfg.flat()[key], parsed))
    if grid:
        combos = itertools.product(
            *[[(key, v, p, p != b) for v, p in parsed] for key, b, parsed in typed]
        )
        changesets = [tuple((k, v, p) for k, v, p, differs in combo if differs) for combo in combos]
    else:
        changesets = [()] + [
            ((key, v, p),) for key, b, parsed in typed for v, p in parsed if p != b
        ]
    out, seen = [], set()
    for changes in changesets:
        same = tuple((k, repr(p)) for k, _, p in changes)
        if same in seen:
            continue
        seen.add(same)
        name = "+".join(_label(k, v) for k, v, _ in changes) or "baseline"
        out.append(Variant(name, tuple((k, v) for k, v, _ in changes)))
    return out


def run_config(base_cfg: RunConfig, variant: Variant, seed: int, tokens: int, evals: int = 8):
    """The trainer config of one run: the variant's changes, `tokens` worth of steps, `evals`
    validation points, init seed `seed`, and the base config's data order."""
    cfg = base_cfg.replace([f"{k}={v}" for k, v in variant.changes])
    per_step = cfg.train.tokens_per_step
    steps = max(1, tokens // per_step)
    if tokens < per_step:
        log.warning(
            "token budget %d is below one step (%d tokens): running 1 step", tokens, per_step
        )
    return cfg.replace(
        {
            # pin the base config's data order before train.seed changes
            "train.data_seed": base_cfg.train.data_order_seed,
            "train.seed": seed,
            "train.steps": steps,
            "train.eval_every": max(1, steps // max(1, evals)),
            # A short budget keeps its learning-rate schedule: warmup is at most a fifth of the run.
            "train.warmup_steps": min(cfg.train.warmup_steps, max(1, steps // 5)),
            "train.samples": 0,
        }
    )


def _plain(d):
    return json.loads(json.dumps(d, sort_keys=True))


def _check_or_write(path: str, payload: dict, what: str) -> None:
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if _plain(old) != _plain(payload):
            raise ValueError(f"{path} holds a different {what}; use a new workdir or delete it")
    else:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1, sort_keys=True)
        os.replace(tmp, path)


def seeds_of(base_cfg: RunConfig, n: int) -> list[int]:
    return [base_cfg.train.seed + i for i in range(n)]


def sweep(
    base_cfg: RunConfig,
    axes,
    *,
    tokens: int,
    seeds: int = 2,
    workdir: str,
    grid: bool = False,
    evals: int = 8,
    report: bool = True,
    hooks=(),
) -> list[dict]:
    """Trains every (variant, seed) not yet done, then writes results.csv/.md and ablation.png.

    Args:
      base_cfg: RunConfig of the baseline (e.g. config.load("configs/tiny.py", [...])).
      axes: [(dotted field, [values])]; see make_variants.
      tokens: training tokens per run (steps = tokens // (batch_size * seq_len)).
      seeds: init seeds per variant (train.seed, train.seed + 1, ...).
      hooks: after-step hooks of every run (trainer.loop.train).
    Returns:
      the result rows (see summarize).
    Raises:
      SweepInterrupted when a signal stopped a run (call again to resume).
    """
    variants = make_variants(base_cfg, axes, grid)
    seed_list = seeds_of(base_cfg, seeds)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "sweep.json"), "w") as f:  # a record; runs check their own
        json.dump(
            {
                "axes": [[k, list(v)] for k, v in axes],
                "grid": grid,
                "tokens": int(tokens),
                "seeds": seed_list,
                "evals": int(evals),
                "variants": [v.name for v in variants],
                "base": base_cfg.to_dict(),
            },
            f,
            indent=1,
        )
    total = len(variants) * len(seed_list)
    for i, (variant, seed) in enumerate(itertools.product(variants, seed_list)):
        run_dir = os.path.join(workdir, variant.name, f"seed{seed}")
        cfg = run_config(base_cfg, variant, seed, tokens, evals)
        what = f"[{i + 1}/{total}] {variant.name} seed {seed}"
        _train_one(cfg, run_dir, what, hooks)
    rows = summarize(workdir, variants, seed_list)
    if report:
        write_tables(rows, workdir, tokens=tokens, seeds=seed_list, grid=grid)
        plot(workdir, variants, seed_list)
    return rows


def _train_one(cfg: RunConfig, run_dir: str, what: str, hooks=()) -> None:
    """Trains one (variant, seed) run into run_dir unless it is done; DONE marks it finished."""

    os.makedirs(run_dir, exist_ok=True)
    # A run started (or finished) under other settings is an error, never silently reused.
    _check_or_write(os.path.join(run_dir, "config.json"), cfg.to_dict(), "run config")
    if os.path.exists(os.path.join(run_dir, DONE)):
        log.info("%s: done, skipped", what)
        return
    log.info("%s: %d steps", what, cfg.train.steps)
    t0 = time.time()
    try:
        last = trainer.train(cfg, run_dir, hooks=hooks)
    except trainer.NonFiniteLossError as e:  # a result of the ablation, not a sweep failure
        log.warning("%s diverged: %s", what, e)
        last = {"diverged": str(e)}
    if "stopped_by" in last:
        raise SweepInterrupted(
            f"{last['stopped_by']} stopped {run_dir} at step "
            f"{last.get('step')}; run the sweep again to resume"
        )
    with open(os.path.join(run_dir, DONE), "w") as f:
        json.dump({"last": last, "wall_s": time.time() - t0}, f, indent=1)


def read_run(run_dir: str) -> dict:
    """One finished run: its validation curve [(tokens, loss)], final and best val loss,
    median tokens/s (the first logged interval holds compilation and has none)."""
    path, rows = os.path.join(run_dir, "metrics.jsonl"), []
    if os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    curve = [(r["tokens_seen"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    rates = [r["tokens_per_sec"] for r in rows if r.get("tokens_per_sec")]
    diverged = False
    if os.path.exists(os.path.join(run_dir, DONE)):
        with open(os.path.join(run_dir, DONE)) as f:
            diverged = "diverged" in json.load(f)["last"]
    return {
        "curve": curve,
        "diverged": diverged,  # a non-finite loss ended it: no final loss to report
        "final": curve[-1][1] if curve and not diverged else math.nan,
        "best": min(v for _, v in curve) if curve and not diverged else math.nan,
        "train_loss": rows[-1].get("loss", math.nan) if rows else math.nan,
        "tokens": rows[-1]["tokens_seen"] if rows else 0,
        "tokens_per_sec": float(np.median(rates)) if rates else math.nan,
    }


def _mean_std(xs):
    xs = np.asarray(xs, float)
    return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0


def summarize(workdir: str, variants, seeds) -> list[dict]:
    """One row per variant with finished runs: mean and sample std over seeds."""

    rows = []
    for v in variants:
        runs = [os.path.join(workdir, v.name, f"seed{s}") for s in seeds]
        runs = [r for r in runs if os.path.exists(os.path.join(r, DONE))]
        if not runs:
            continue
        with open(os.path.join(runs[0], "config.json")) as f:
            model = RunConfig.from_dict(json.load(f)).model
        got = [read_run(r) for r in runs]
        final, final_sd = _mean_std([g["final"] for g in got])
        best, best_sd = _mean_std([g["best"] for g in got])
        rows.append(
            {
                "variant": v.name,
                "changes": " ".join(f"{k}={val}" for k, val in v.changes) or "(LLaMA)",
                "params": stats.count_params(model),
                "tokens": int(np.mean([g["tokens"] for g in got])),
                "seeds": len(got),
                "diverged": sum(g["diverged"] for g in got),
                "final_val_loss": final,
                "final_val_loss_std": final_sd,
                "best_val_loss": best,
                "best_val_loss_std": best_sd,
                "final_train_loss": float(np.mean([g["train_loss"] for g in got])),
                "tokens_per_sec": float(np.mean([g["tokens_per_sec"] for g in got])),
            }
        )
    base = next((r for r in rows if r["variant"] == "baseline"), None)
    for r in rows:
        r["delta_vs_baseline"] = r["final_val_loss"] - base["final_val_loss"] if base else math.nan
    return rows


def write_tables(rows, workdir: str, *, tokens: int, seeds, grid: bool = False) -> tuple[str, str]:
    """results.csv (every number) and results.md (the readable table)."""
    csv_path, md_path = os.path.join(workdir, "results.csv"), os.path.join(workdir, "results.md")
    cols = [
        "variant",
        "changes",
        "params",
        "tokens",
        "seeds",
        "diverged",
        "final_val_loss",
        "final_val_loss_std",
        "best_val_loss",
        "best_val_loss_std",
        "delta_vs_baseline",
        "final_train_loss",
        "tokens_per_sec",
    ]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows({c: r[c] for c in cols} for r in rows)
    lines = [
        (
            f"{'Grid' if grid else 'One-factor-at-a-time'} ablation: {tokens:,} tokens per run, "
            f"init seeds {list(seeds)} (same data order); validation loss in nats/token, "
            "mean ± sample std over seeds."
        ),
        "",
        "| variant | params | final val loss | best val loss | Δ final vs baseline | tokens/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["diverged"]:
            loss = best = f"diverged ({r['diverged']}/{r['seeds']} seeds)"
        else:
            loss = f"{r['final_val_loss']:.4f} ± {r['final_val_loss_std']:.4f}"
            best = f"{r['best_val_loss']:.4f} ± {r['best_val_loss_std']:.4f}"
        lines.append(
            f"| {r['variant']} | {r['params']:,} | {loss} | {best} | "
            f"{r['delta_vs_baseline']:+.4f} | {r['tokens_per_sec']:,.0f} |"
        )
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return csv_path, md_path


def plot(workdir: str, variants, seeds) -> str | None:
    """ablation.png: validation loss vs tokens, the mean over seeds per variant, min-max shaded."""
    # The Figure API, not pyplot: a notebook's plotting backend is left as it was.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    drawn = 0
    for v in variants:
        curves = [
            read_run(os.path.join(workdir, v.name, f"seed{s}"))["curve"]
            for s in seeds
            if os.path.exists(os.path.join(workdir, v.name, f"seed{s}", DONE))
        ]
        curves = [c for c in curves if c]
        if not curves:
            continue
        n = min(len(c) for c in curves)  # seeds of one variant share their eval steps
        x = np.array([t for t, _ in curves[0][:n]])
        y = np.array([[val for _, val in c[:n]] for c in curves])  # [seeds, points]
        style = {"lw": 2.5, "color": "k"} if v.name == "baseline" else {"lw": 1.5}
        (line,) = ax.plot(
            x, y.mean(0), "o-", ms=3, label=f"{v.name} ({y.mean(0)[-1]:.3f})", **style
        )
        if len(curves) > 1:
            ax.fill_between(x, y.min(0), y.max(0), color=line.get_color(), alpha=0.2)
        drawn += 1
    if not drawn:
        return None
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"ablation: mean over {len(seeds)} seed(s), range shaded")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = os.path.join(workdir, "ablation.png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out
