"""The training run: data, sharded state, the loop, validation, checkpoints, faults, reports.

`train(cfg, workdir)` is everything `python -m launch.train` does. Every process of a
multi-host job runs it; only process 0 writes logs, metrics and plots, while all of them
take part in checkpoint writes (orbax coordinates them).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from llama_jax import distributed, stats
from llama_jax import sharding as shd
from llama_jax import train_step as ts
from llama_jax.checkpoint import Checkpointer
from llama_jax.data.loader import Loader
from llama_jax.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(default_cfg, cfg) -> dict:
    """{field: (default, value)} for every field that differs from the config file."""
    a, b = _flatten(default_cfg.to_dict()), _flatten(cfg.to_dict())
    return {k: (a.get(k), v) for k, v in b.items() if a.get(k) != v}


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop finishes its step, saves and exits cleanly."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def install(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)

    def any_process(self) -> bool:
        """True when any process was signalled (all must stop at the same step)."""
        local = np.array([self.signal is not None], np.int32)
        if jax.process_count() == 1:
            return bool(local[0])
        return bool(np.max(multihost_utils.process_allgather(local)))


def resolve_data(cfg) -> tuple[str, str]:
    """(dataset_dir, tokenizer_path): the configured dataset, or the built-in default corpus."""
    if cfg.data.path:
        path = cfg.data.path
        if not os.path.exists(os.path.join(path, "metadata.json")):
            raise FileNotFoundError(f"data.path={path!r} is not a prepared dataset (no metadata.json)")
        tokenizer = cfg.data.tokenizer or os.path.join(path, "tokenizer.model")
        if not os.path.exists(tokenizer):
            raise FileNotFoundError(f"tokenizer not found: {tokenizer!r}; set data.tokenizer")
        return path, tokenizer
    if cfg.data.tokenizer:
        raise ValueError("data.tokenizer is set but data.path is not: the built-in default corpus "
                         "has its own tokenizer; prepare a dataset with yours (launch.prepare_data)")
    from llama_jax.data.default_corpus import ensure_default_dataset

    return ensure_default_dataset(vocab_size=int(cfg.model.vocab_size))


def _record_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a line torn by a killed process (dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class MetricsWriter:
    """metrics.jsonl (one object per logged step) plus TensorBoard events; process 0 only."""

    def __init__(self, workdir: str, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        # Steps after the checkpoint we resume from were lost: drop their records.
        if os.path.exists(self.path):
            with open(self.path) as f:
                keep = [line for line in f if _record_step(line) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(keep)
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tb"))
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


def data_seed(cfg) -> int:
    """Seed of the data order: train.data_seed, or train.seed when that is -1 (or absent)."""
    seed = int(cfg.train.get("data_seed", -1))
    return int(cfg.train.seed) if seed < 0 else seed


class Evaluator:
    """Validation loss over the same train.eval_batches global batches of the held-out split
    at every evaluation (comparable across evaluations and runs).

    Batches are split like training microbatches (train.grad_accum_steps), so evaluation
    never needs more activation memory than a training step.
    """

    def __init__(self, eval_fn, cfg, dataset_dir, sharding, tokenizer_sha):
        accum = max(1, int(cfg.train.grad_accum_steps))
        self.eval_fn, self.n = eval_fn, int(cfg.train.eval_batches) * accum
        self.loader = Loader(dataset_dir, "val", batch_size=int(cfg.train.batch_size) // accum,
                             seq_len=int(cfg.train.seq_len), seed=data_seed(cfg) + 1,
                             sharding=sharding, prefetch=0, expected_tokenizer_sha=tokenizer_sha)

    def __call__(self, params) -> float:
        total, tokens = 0.0, 0.0
        for i in range(self.n):
            m = jax.device_get(self.eval_fn(params, self.loader.batch(i)))
            total, tokens = total + float(m["loss_sum"]), tokens + float(m["tokens"])
        return total / max(tokens, 1.0)

    def close(self):
        self.loader.close()


@jax.jit
def _track(acc, metrics, step):
    """Counts skipped steps and remembers the first non-finite loss, on device, every step."""
    bad = ~jnp.isfinite(metrics["loss"])
    first = jnp.where((acc["first_bad"] < 0) & bad, step, acc["first_bad"])
    return {"skipped": acc["skipped"] + metrics["skipped"], "first_bad": first}


def plot_losses(workdir: str) -> str | None:
    """loss.png: train and validation loss vs tokens seen, from metrics.jsonl."""
    path = os.path.join(workdir, "metrics.jsonl")
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


def greedy_samples(params, cfg, tokenizer: Tokenizer, prompts, n_tokens: int) -> list[str]:
    """Greedy continuations of prompts, for a look at what the model learned."""
    from llama_jax.generate import Sampling, generate

    ids = [tokenizer.encode(p, bos=True) for p in prompts]
    room = int(cfg.model.max_seq_len) - max(len(i) for i in ids)
    # Sampling runs unsharded on each process (it is for small models; see train.samples).
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    params = jax.device_get(params)
    out = generate(params, ts.model_config(cfg), ids, max(1, min(n_tokens, room)),
                   sampling=Sampling(temperature=0.0), eos_id=tokenizer.eos_id)
    return [tokenizer.decode(i + o) for i, o in zip(ids, out)]  # decoded whole: keeps spaces


def _log_startup(cfg, diff, mesh, mc, n_params, tokens_per_step, impl):
    devices = jax.devices()
    log.info("config changes from the file: %s",
             ", ".join(f"{k}={v!r} (was {d!r})" for k, (d, v) in diff.items()) or "none")
    log.info("devices: %d x %s (%s), processes: %d", len(devices), devices[0].device_kind,
             devices[0].platform, jax.process_count())
    log.info("mesh: %s", dict(mesh.shape))
    log.info("attention: %s, remat policy: %s, dtype: %s, params dtype: %s",
             impl, mc.remat_policy, mc.dtype, mc.param_dtype)
    log.info("parameters: %s (%.3g B), tokens per step: %s", f"{n_params:,}", n_params / 1e9,
             f"{tokens_per_step:,}")


def _attention_impl(mc) -> str:
    from llama_jax.attention import resolve_impl

    picked = resolve_impl(mc.attention_impl, mc.compute_dtype, mc.head_dim, False)
    return picked if picked == mc.attention_impl else f"{mc.attention_impl} -> {picked}"


# Fields that fix which tokens each step sees: changing them on resume would silently skip or
# repeat data. Schedule fields may change (extending a run), with a warning.
RESUME_FIXED = ("train.batch_size", "train.seq_len", "data.path")
RESUME_WARN = ("train.steps", "train.lr", "train.warmup_steps", "train.min_lr_ratio")


def check_resume_config(saved: dict, cfg) -> None:
    """Raises when the run's data order would differ from the checkpoint's; warns on schedule."""
    if not saved:
        return
    old, new = _flatten(saved), _flatten(cfg.to_dict())
    bad = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in RESUME_FIXED if old.get(k) != new.get(k)]
    old_seed = data_seed(ConfigDict(saved))
    if old_seed != data_seed(cfg):
        bad.append(f"data seed: {old_seed} -> {data_seed(cfg)}")
    if bad:
        raise ValueError("resuming with a different data order than the checkpoint ("
                         + "; ".join(bad) + "): use the original values or a new --workdir")
    for k in RESUME_WARN:
        if old.get(k) != new.get(k):
            log.warning("resuming with %s changed: %r -> %r (the schedule changes)", k, old.get(k),
                        new.get(k))


def _inject_fault(step: int) -> None:
    """Fault injection for tests: LLAMA_JAX_SIGNAL_AT_STEP="SIGNUM:STEP" sends this process a
    real signal after that step, e.g. 9:12 (SIGKILL) or 15:5 (SIGTERM)."""
    spec = os.environ.get("LLAMA_JAX_SIGNAL_AT_STEP")
    if spec and int(spec.split(":")[1]) == step:
        os.kill(os.getpid(), int(spec.split(":")[0]))


def _profile_range(spec: str) -> tuple[int, int] | None:
    if not spec:
        return None
    a, _, b = str(spec).partition(",")
    a, b = int(a), int(b or a)
    if not 0 <= a <= b:
        raise ValueError(f"train.profile_steps={spec!r}: want 'a,b' with 0 <= a <= b")
    return a, b


def last_record(workdir: str) -> dict:
    """The last complete line of metrics.jsonl (counters carry over on resume)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    rows = [line for line in open(path) if math.isfinite(_record_step(line))]
    return json.loads(rows[-1]) if rows else {}


def train(cfg, workdir: str, *, config_diff: dict | None = None) -> dict:
    """Runs (or resumes) the training job described by cfg in workdir.

    Returns the last logged metrics, plus "stopped_by" when a signal ended the run early.
    Raises NonFiniteLossError on a non-finite loss (unless train.skip_nonfinite).
    """
    distributed.initialize(cfg.distributed)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    mesh = shd.make_mesh(cfg.mesh)
    mc = ts.model_config(cfg)
    n_params = stats.count_params(mc)
    B, T, steps = int(cfg.train.batch_size), int(cfg.train.seq_len), int(cfg.train.steps)
    if T > mc.max_seq_len:
        raise ValueError(f"train.seq_len={T} exceeds model.max_seq_len={mc.max_seq_len}")
    flops_per_token = stats.flops_per_token(mc, T, n_params)
    peak = stats.device_peak_flops()

    dataset_dir, tokenizer_path = resolve_data(cfg)
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.vocab_size > mc.vocab_size:
        raise ValueError(f"tokenizer vocab {tokenizer.vocab_size} ({tokenizer_path}) is larger "
                         f"than model.vocab_size={mc.vocab_size}")
    _log_startup(cfg, config_diff or {}, mesh, mc, n_params, B * T, _attention_impl(mc))

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint)
    abstract, shardings = ts.abstract_train_state(cfg, mesh)
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(abstract)
        check_resume_config(meta.get("config"), cfg)
        log.info("resumed from %s step %d", ckpt.directory, int(state.step))
        tokens_seen = int(meta.get("tokens_seen", int(state.step) * B * T))
    else:
        state, _ = ts.create_train_state(cfg, mesh)
        tokens_seen = 0
    start = int(state.step)
    batch_sharding = shd.batch_sharding(mesh)
    loader = Loader(dataset_dir, "train", batch_size=B, seq_len=T, seed=data_seed(cfg),
                    sharding=batch_sharding, step=start, prefetch=int(cfg.data.prefetch),
                    expected_vocab_size=mc.vocab_size, expected_tokenizer_sha=tokenizer.sha256)
    step_fn = ts.make_train_step(cfg, mesh, shardings)
    eval_every, evaluate = int(cfg.train.eval_every), None
    if eval_every and int(cfg.train.eval_batches) > 0:
        try:
            evaluate = Evaluator(ts.make_eval_step(cfg, mesh, shardings), cfg, dataset_dir,
                                 batch_sharding, tokenizer.sha256)
        except ValueError as e:
            log.warning("validation disabled: %s", e)
    if evaluate is None:
        eval_every = 0
    writer = MetricsWriter(workdir, start, is_main)
    stop = _StopFlag()
    stop.install()
    log_every = max(1, int(cfg.train.log_every))
    every = int(cfg.checkpoint.every_steps)
    profile, profiling = _profile_range(cfg.train.profile_steps), False
    # Every process must stop at the same step; across hosts agreeing costs a collective and a
    # host sync, so multi-process jobs ask every few steps rather than every step.
    stop_every = 1 if jax.process_count() == 1 else max(1, min(log_every, 10))

    def meta(step):
        return {"step": step, "tokens_seen": tokens_seen, "config": cfg.to_dict()}

    from tqdm import tqdm

    bar = tqdm(total=steps, initial=start, disable=not is_main, unit="step", dynamic_ncols=True)
    last, last_saved = {}, (start if ckpt.latest_step() is not None else None)
    acc = {"skipped": jnp.zeros((), jnp.int32), "first_bad": jnp.full((), -1, jnp.int32)}
    skipped_before = int(last_record(workdir).get("skipped_steps", 0)) if start else 0
    t_mark, tokens_mark = None, tokens_seen
    try:
        if start == 0 and eval_every:  # the untrained model's loss: where the curve starts
            writer.write({"step": 0, "tokens_seen": 0, "val_loss": evaluate(state.params)})
        for step in range(start, steps):
            if profile and step == profile[0]:
                trace_dir = os.path.join(workdir, "profile", f"process_{jax.process_index()}")
                jax.profiler.start_trace(trace_dir)
                profiling = True
            state, metrics = step_fn(state, next(loader))
            acc = _track(acc, metrics, step + 1)
            if profiling and step == profile[1]:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                profiling = False
            tokens_seen += B * T
            done = step + 1
            _inject_fault(done)
            stopping = done % stop_every == 0 and stop.any_process()
            save_now = done == steps or stopping or (every and done % every == 0)
            log_now = done % log_every == 0 or save_now or (eval_every and done % eval_every == 0)
            if not log_now:
                continue
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            a = {k: int(v) for k, v in jax.device_get(acc).items()}
            now = time.perf_counter()
            rate = None
            if t_mark is not None:  # the first interval holds compilation: not a rate
                rate = (tokens_seen - tokens_mark) / (now - t_mark)
            record = {"step": done, "loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"],
                      "tokens_seen": tokens_seen, "tokens_per_sec": rate,
                      "skipped_steps": skipped_before + a["skipped"]}
            if rate is not None and peak:
                record["mfu"] = rate * flops_per_token["6n"] / (jax.device_count() * peak)
            if eval_every and (done % eval_every == 0 or done == steps):
                record["val_loss"] = evaluate(state.params)
            writer.write(record)
            last = record
            if a["first_bad"] >= 0 and not cfg.train.skip_nonfinite:
                raise NonFiniteLossError(
                    f"non-finite loss at step {a['first_bad']} (step {done}: loss {m['loss']}, grad "
                    f"norm {m['grad_norm']}); last good checkpoint: step {last_saved} in "
                    f"{ckpt.directory}. Lower train.lr, or set train.skip_nonfinite=true to skip "
                    "such steps")
            bar.update(done - bar.n)
            post = {"loss": f"{m['loss']:.3f}", "lr": f"{m['lr']:.2e}", "gnorm": f"{m['grad_norm']:.2f}"}
            if rate is not None:
                post["tok/s"] = f"{rate:,.0f}"
            if "mfu" in record:
                post["mfu"] = f"{record['mfu']:.1%}"
            if record.get("val_loss") is not None:
                post["val"] = f"{record['val_loss']:.3f}"
            bar.set_postfix(post, refresh=False)
            if save_now:
                ckpt.save(done, state, meta(done))
                last_saved = done
            # Evaluation and saving are not training time: the next rate starts here.
            t_mark, tokens_mark = time.perf_counter(), tokens_seen
            if stopping:
                ckpt.wait()
                msg = (f"{stop.signal or 'signal'} received: saved step {done} to {ckpt.directory}; "
                       "run the same command again to resume")
                log.warning(msg)
                if is_main:
                    print(msg, flush=True)
                last["stopped_by"] = stop.signal or "signal"
                return last
        ckpt.wait()
    finally:
        if profiling:
            jax.profiler.stop_trace()
        bar.close()
        stop.restore()
        loader.close()
        if evaluate is not None:
            evaluate.close()
        writer.close()
        ckpt.close()

    if is_main:
        png = plot_losses(workdir)
        if png:
            log.info("loss plot: %s", png)
    if int(cfg.train.samples) > 0 and n_params > 2e9:
        log.info("no samples: %d parameters are too many to gather on one host", n_params)
    elif int(cfg.train.samples) > 0:
        prompts = ["def ", "import ", "class ", "    return ", "# ", "for "][: int(cfg.train.samples)]
        for text in greedy_samples(state.params, cfg, tokenizer, prompts,
                                   int(cfg.train.sample_tokens)):
            if is_main:
                print(f"--- sample ---\n{text}", flush=True)
    return last
