"""What a run writes about itself: metrics.jsonl, TensorBoard events, throughput, loss.png,
and the summary block printed at the end of the main job. Process 0 only writes."""

from __future__ import annotations

import json
import logging
import math
import os
import time

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def _record_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a line torn by a killed process (dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def last_record(workdir: str, upto: float = math.inf) -> dict:
    """The last complete line of metrics.jsonl (counters carry over on resume), or of those up
    to step `upto` (what MetricsWriter.open keeps on a resume from that step)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return {}
    rows = [line for line in open(path) if (s := _record_step(line)) < math.inf and s <= upto]
    return json.loads(rows[-1]) if rows else {}


def _summary_writer():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch when it
    is installed (it is, with the test extras) only to accept torch tensors. AMD EPYC, 2 cores:
    the import 4.0 s -> 0.26 s on a loaded host, ~1.4 s per run on a quiet one (the 8 runs of
    tests/test_train.py's 1-process chaos test: 101 s -> 90 s). We log Python floats.
    The block lasts only this import; a process that already imported torch keeps it."""
    import sys

    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX catches
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """metrics.jsonl (one object per logged step) plus TensorBoard events; process 0 only.
    open() trims the history to the resume step and opens TensorBoard; writes before it fail."""

    def __init__(self, workdir: str, resume_step: int, enabled: bool):
        self.enabled, self.resume_step = enabled, resume_step
        self.path = os.path.join(workdir, METRICS_FILE)
        self.tb_dir = os.path.join(workdir, "tb")
        self.tb = None

    def open(self) -> None:
        if not self.enabled:
            return
        resume_step = self.resume_step
        # Steps after the checkpoint we resume from were lost: drop their records. The kept
        # ones go to a new file renamed over the old one, so a kill or a full disk during the
        # rewrite leaves the old file whole, never a truncated history.
        if os.path.exists(self.path):
            with open(self.path) as f:
                keep = [line for line in f if _record_step(line) <= resume_step]
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        try:
            self.tb = _summary_writer()(self.tb_dir)
        except ImportError:  # TensorBoard events are optional; metrics.jsonl is not
            log.warning("tensorboardX not installed: no TensorBoard events")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


class Throughput:
    """Training tokens per second between log points; evaluation and saving are excluded
    (mark() after them), and the first interval, which holds compilation, gives no rate."""

    def __init__(self, tokens_seen: int):
        self.t_mark, self.tokens_mark = None, tokens_seen
        self.train_seconds, self.train_tokens = 0.0, 0

    def rate(self, tokens_seen: int) -> float | None:
        if self.t_mark is None:
            return None
        seconds = time.perf_counter() - self.t_mark
        self.train_seconds += seconds
        self.train_tokens += tokens_seen - self.tokens_mark
        return (tokens_seen - self.tokens_mark) / seconds

    def mark(self, tokens_seen: int) -> None:
        self.t_mark, self.tokens_mark = time.perf_counter(), tokens_seen

    @property
    def mean_rate(self) -> float | None:
        """Tokens/s over every timed interval of this process's run."""
        return self.train_tokens / self.train_seconds if self.train_seconds else None


def plot_losses(workdir: str) -> str | None:
    """loss.png: train and validation loss vs tokens seen, from metrics.jsonl."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return None
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone

    rows = [json.loads(line) for line in open(path) if line.strip()]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    tr = [(r["tokens_seen"], r["loss"]) for r in rows if "loss" in r]
    va = [(r["tokens_seen"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if tr:
        ax.plot(*zip(*tr), label="train")
    if va:
        ax.plot(*zip(*va), "o-", label="validation")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    out = os.path.join(workdir, "loss.png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:,.3g}{unit}"
        n /= 1000
    return f"{n:,.3g}P"


def summary_block(
    *,
    workdir: str,
    last: dict,
    vocab_size: int,
    tokens_seen: int,
    tokens_per_sec: float | None,
    wall_seconds: float,
    checkpoints: str,
    plot: str | None,
    tokenizer: str,
    command: str | None,
    dataset: str,
) -> str:
    """The block a newcomer reads at the end of the main job: how far the model got (val loss
    next to a uniform guess over the vocabulary), how fast, where everything is, what next.
    command: the command line that ran this (the same again, with more steps, extends it)."""
    uniform = math.log(vocab_size)
    val = last.get("val_loss")
    loss = (
        f"val loss {val:.3f}" if val is not None else f"train loss {last.get('loss', math.nan):.3f}"
    )
    rate = f"{_human(tokens_per_sec)} tokens/s" if tokens_per_sec else "n/a tokens/s"
    export = os.path.join(workdir, "export")
    again = command or f"python -m launch.train --config CONFIG --workdir {workdir}"
    lines = [
        "=" * 72,
        f"done: {loss} nats/token (uniform over {vocab_size} tokens: {uniform:.3f}), step "
        f"{last.get('step', '?')}",
        f"  {_human(tokens_seen)} tokens seen, {rate} while training, wall time "
        + (f"{wall_seconds:.0f} s" if wall_seconds < 120 else f"{wall_seconds / 60:.1f} min"),
        f"  checkpoints  {checkpoints}",
        f"  metrics      {os.path.join(workdir, METRICS_FILE)}",
        f"  loss plot    {plot or '(none)'}",
        f"  TensorBoard  tensorboard --logdir {os.path.join(workdir, 'tb')}",
        "next:",
        f"  resume/extend  {again} --config.train.steps=N",
        f"  export         python -m launch.export --workdir {workdir} --output {export}",
        f"  generate       python -m launch.generate --checkpoint {export} --tokenizer {tokenizer}"
        " --prompt 'def '",
        f"  evaluate       python -m launch.eval --checkpoint {export} --tokenizer {tokenizer} "
        f"--task {dataset}",
        "=" * 72,
    ]
    return "\n".join(lines)
