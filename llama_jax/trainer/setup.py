"""setup(): everything a training run needs, built in three parts and started by none of them.

`Inputs` is what the loop reads and never changes (config, mesh, data, the compiled step, the
validation evaluator); `Progress` is where it is (the train state and the counters a checkpoint
or a log continues); `Services` is what it talks to (checkpointer, metrics writer, signal flag,
watchdogs, profiler, throughput meter, after-step hooks). Building them opens the checkpoint
and the data, nothing more: signal handlers, watchdog threads, the metrics rewrite and the
progress bar start when the loop starts (`Services.start`), and stop in `Services.close`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from tqdm import tqdm

from llama_jax.adapters import lora, trainable
from llama_jax.checkpoint.manager import Checkpointer
from llama_jax.checkpoint.resume import check_resume, check_resume_data
from llama_jax.config import RunConfig
from llama_jax.data import mixture, run_data
from llama_jax.data.loader import Loader
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.model import stats
from llama_jax.model.attention import resolve_impl
from llama_jax.parallel import sharding as shd
from llama_jax.train import step as ts
from llama_jax.trainer import metrics
from llama_jax.trainer.control import PeerWatch, Profiler, StepWatchdog, StopFlag
from llama_jax.trainer.validation import MixtureValidation, ValidationLoss
from llama_jax.weights import init_from

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What the loop reads; nothing here changes while it runs."""

    cfg: RunConfig
    workdir: str
    mesh: Mesh
    tokenizer: Tokenizer
    dataset_dir: str
    data_fingerprint: dict  # data.format.fingerprint(): stored with every checkpoint
    step_fn: Any  # train.step.make_train_step's jitted step
    loader: Loader
    validate: Any  # ValidationLoss / MixtureValidation, or None when validation is off
    frozen: dict  # the step's frozen input: {} for full training, LoRA's base (adapters/trainable)
    n_params: int

    def full_params(self, params):
        """The plain model's params: the trained ones, or LoRA's base with the adapters merged."""
        seam = trainable.of(self.cfg.model)
        return seam.merged(seam.join(params, self.frozen))


@dataclasses.dataclass
class Progress:
    """Where the loop is. acc holds on-device counters (skipped steps, the first non-finite
    loss's step) that are read only at log points, so a step never waits for the host."""

    state: Any  # train.step.TrainState
    start: int
    tokens_seen: int
    last_saved: int | None
    skipped_before: int
    last: dict  # the last logged record
    acc: dict = dataclasses.field(default_factory=dict)
    step_metrics: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Services:
    """What the loop talks to. hooks: callables run after every step with the steps done, the
    seam tests use to inject faults (control.fault_hooks)."""

    ckpt: Checkpointer
    writer: metrics.MetricsWriter
    throughput: metrics.Throughput
    profiler: Profiler
    watchdog: StepWatchdog
    peers: PeerWatch
    stop: StopFlag = dataclasses.field(default_factory=StopFlag)
    hooks: tuple[Callable[[int], None], ...] = ()
    bar: Any = None

    def start(self, total: int, initial: int) -> None:
        """Rewrites the metrics history back to `initial`, installs the stop signals, starts
        the watchdog threads and the progress bar (process 0 only)."""
        self.writer.open()
        self.stop.install()
        self.watchdog.start()
        self.peers.start()
        main = jax.process_index() == 0
        self.bar = tqdm(total=total, initial=initial, disable=not main, unit="step",
                        dynamic_ncols=True)  # fmt: skip

    def close(self, failed: bool) -> None:
        try:
            self.watchdog.close()
            self.profiler.stop()
            if self.bar is not None:
                self.bar.close()
            self.stop.restore()
            self.writer.close()
            self.ckpt.close()
        except BaseException:
            failed = True
            raise
        finally:
            # Last: while closing (the last save waiting for a peer that failed) the peer watch
            # can still end this process instead of leaving it in orbax's barrier.
            self.peers.close(failed)


def fresh_counters() -> dict:
    return {"skipped": jnp.zeros((), jnp.int32), "first_bad": jnp.full((), -1, jnp.int32)}


def _attention_impl(cfg: RunConfig) -> str:
    mc, t = cfg.model, cfg.train
    rows = t.batch_size // t.grad_accum_steps * mc.n_heads  # B * N of one microbatch
    shape = (rows, t.seq_len, t.seq_len)
    picked = resolve_impl(mc.attention_impl, mc.compute_dtype, mc.head_dim, False, shape=shape)
    return picked if picked == mc.attention_impl else f"{mc.attention_impl} -> {picked}"


def _log_startup(cfg: RunConfig, diff: dict, mesh: Mesh, n_params: int) -> None:
    mc, devices = cfg.model, jax.devices()
    changes = ", ".join(f"{k}={v!r} (was {d!r})" for k, (d, v) in diff.items())
    log.info("config changes from the file: %s", changes or "none")
    log.info("devices: %d x %s (%s), processes: %d", len(devices), devices[0].device_kind,
             devices[0].platform, jax.process_count())  # fmt: skip
    log.info("mesh: %s", dict(mesh.shape))
    log.info("attention: %s, remat policy: %s, dtype: %s, params dtype: %s",
             _attention_impl(cfg), mc.remat_policy, mc.dtype, mc.param_dtype)  # fmt: skip
    log.info("parameters: %s (%.3g B), tokens per step: %s", f"{n_params:,}", n_params / 1e9,
             f"{cfg.train.tokens_per_step:,}")  # fmt: skip


def _restore_or_init(cfg: RunConfig, mesh: Mesh, ckpt: Checkpointer, data: dict):
    """(state, state shardings, tokens_seen): the latest checkpoint (after checking it continues
    this run's data and data order; data: this run's dataset fingerprint), else a fresh init."""
    abstract, shardings = ts.abstract_train_state(cfg, mesh)

    def check(meta):  # before anything is restored: a refused config is not corruption
        check_resume(meta.get("config"), cfg)
        check_resume_data(meta.get("dataset"), data, cfg)

    fallback = cfg.checkpoint.on_corrupt == "fallback"
    restored = ckpt.restore_newest(abstract, check, fallback=fallback)
    if restored is None and cfg.train.init_from and not cfg.model.lora_rank:
        params = init_from.load_params(cfg, shardings.params)
        log.info(init_from.describe(cfg))
        return ts.train_state_from_params(cfg, mesh, params)[0], shardings, 0
    if restored is None:
        state, _ = ts.create_train_state(cfg, mesh)
        return state, shardings, 0
    state, meta = restored
    log.info("resumed from %s step %d", ckpt.directory, int(state.step))
    tokens_seen = int(meta.get("tokens_seen", int(state.step) * cfg.train.tokens_per_step))
    return state, shardings, tokens_seen


def _frozen(cfg: RunConfig, mesh: Mesh) -> dict:
    """The step's frozen input (step.abstract_frozen): {} when the whole model trains; LoRA's
    base params, train.init_from's weights (or the seed's random init)."""
    _, shardings = ts.abstract_frozen(cfg, mesh)
    if not shardings:
        return {}
    if cfg.train.init_from:
        frozen = {"params": init_from.load_params(cfg, shardings["params"])}
        log.info(init_from.describe(cfg))
    else:
        frozen = ts.random_frozen(cfg, mesh)
    log.info("LoRA rank %d on %s: %s trained parameters", cfg.model.lora_rank,
             cfg.model.lora_targets, f"{lora.count(cfg.model):,}")  # fmt: skip
    return frozen


def _mixture_validation(cfg: RunConfig, mesh: Mesh, evaluate, tokenizer: Tokenizer):
    """A validation loss per mixture source (those with a val split of at least a batch)."""
    losses, sources = {}, mixture.parse(cfg.data.mixture)
    for name, (path, _) in sources.items():
        try:
            losses[name] = ValidationLoss(evaluate, cfg.train, path, shd.batch_sharding(mesh),
                                          tokenizer.sha256, run_data.document_bos(cfg, tokenizer))  # fmt: skip
        except ValueError as e:
            log.warning("no validation loss for mixture source %s: %s", name, e)
    return MixtureValidation(losses, {n: w for n, (_, w) in sources.items()}) if losses else None


def _validation(cfg: RunConfig, mesh: Mesh, shardings, dataset_dir: str, tokenizer: Tokenizer,
                frozen: dict):  # fmt: skip
    """The validation-loss evaluator, or None when validation is off or the split too small."""
    if not (cfg.train.eval_every and cfg.train.eval_batches > 0):
        return None
    step = ts.make_eval_step(cfg, mesh, shardings)
    evaluate = lambda params, batch: step(params, batch, frozen)  # noqa: E731
    if cfg.data.mixture:
        return _mixture_validation(cfg, mesh, evaluate, tokenizer)
    try:
        return ValidationLoss(evaluate, cfg.train, dataset_dir, shd.batch_sharding(mesh),
                              tokenizer.sha256, run_data.document_bos(cfg, tokenizer))  # fmt: skip
    except ValueError as e:
        log.warning("validation disabled: %s", e)
        return None


def _check_history(workdir: str, allow_restart: bool) -> None:
    """Refuses to restart from step 0 over a run whose checkpoints/ directory is gone (a wrong
    mount, a clean-up script): metrics.jsonl would be cut back to step 0. With allow_restart
    the old metrics are kept aside as metrics.jsonl.before-restart-<time> and the run starts
    over. A checkpoints/ directory without a complete checkpoint is a run killed before its
    first save: it restarts, as before."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    last = metrics.last_record(workdir)
    if os.path.isdir(ckpt_dir) or not last.get("step"):
        return
    if not allow_restart:
        raise FileNotFoundError(
            f"{workdir} holds metrics up to step {last['step']} but no checkpoints/ directory: "
            "restore the checkpoints (wrong mount?), use a new --workdir, or set "
            "--config.checkpoint.allow_restart=true to start over (the old metrics are kept)"
        )
    if jax.process_index() == 0:
        path = os.path.join(workdir, metrics.METRICS_FILE)
        os.replace(path, f"{path}.before-restart-{time.strftime('%Y%m%d-%H%M%S')}")
    log.warning("checkpoint.allow_restart: starting %s over from step 0", workdir)


def _checkpointer(cfg: RunConfig, workdir: str) -> Checkpointer:
    c = cfg.checkpoint
    return Checkpointer(os.path.join(workdir, "checkpoints"), keep=c.keep,
                        keep_period=c.keep_period, async_save=c.async_save)  # fmt: skip


def setup(cfg: RunConfig, workdir: str, config_diff: dict | None = None, hooks=()):
    """(Inputs, Progress, Services) of a run: mesh, data, train state (restored or fresh), the
    step functions, the checkpointer and writers. hooks: see Services."""
    os.makedirs(workdir, exist_ok=True)
    mesh = shd.make_mesh(*cfg.mesh.sizes)
    n_params = stats.count_params(cfg.model)
    dataset_dir, tokenizer = run_data.open_data(cfg)
    _log_startup(cfg, config_diff or {}, mesh, n_params)
    _check_history(workdir, cfg.checkpoint.allow_restart)
    ckpt = _checkpointer(cfg, workdir)
    data = run_data.fingerprint(cfg, dataset_dir, tokenizer)
    frozen = _frozen(cfg, mesh)
    try:
        state, shardings, tokens_seen = _restore_or_init(cfg, mesh, ckpt, data)
    except BaseException:
        # an open manager's background threads would print "Event loop is closed" tracebacks
        # at exit, after the one-line error
        ckpt.close()
        raise
    start = int(state.step)
    loader = run_data.train_loader(cfg, shd.batch_sharding(mesh), dataset_dir, tokenizer, start)
    validate = _validation(cfg, mesh, shardings, dataset_dir, tokenizer, frozen)
    inputs = Inputs(cfg, workdir, mesh, tokenizer, dataset_dir, data,
                    ts.make_train_step(cfg, mesh, shardings), loader, validate, frozen, n_params)  # fmt: skip
    before = metrics.last_record(workdir, upto=start) if start else {}
    progress = Progress(
        state, start, tokens_seen,
        last_saved=start if ckpt.latest_step() is not None else None,
        skipped_before=int(before.get("skipped_steps", 0)),
        last=before,  # a run resumed at its last step trains nothing but reports where it got to
        acc=fresh_counters(),
    )  # fmt: skip
    services = Services(
        ckpt,
        metrics.MetricsWriter(workdir, start, jax.process_index() == 0),
        metrics.Throughput(tokens_seen),
        Profiler(cfg.train.profile_range, workdir),
        StepWatchdog(cfg.train.step_timeout_s),
        PeerWatch(cfg.distributed.peer_timeout_s),
        hooks=tuple(hooks),
    )
    return inputs, progress, services
