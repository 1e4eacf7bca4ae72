"""The training run: `setup()` builds everything one object holds, `train()` loops.

`train(cfg, workdir)` is everything `python -m launch.train` does. Every process of a
multi-host job runs it; only process 0 writes logs, metrics and plots, while all of them take
part in checkpoint writes (orbax coordinates them).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llama_jax.adapters import lora, trainable
from llama_jax.checkpoint.manager import (
    Checkpointer,
    CheckpointSaveError,
    check_resume,
    check_resume_data,
)
from llama_jax.config import RunConfig
from llama_jax.data import mixture, run_data
from llama_jax.data.loader import Loader
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.inference.evaluate import MixtureValidation, ValidationLoss
from llama_jax.inference.generate import Sampling, sample_texts
from llama_jax.model import stats
from llama_jax.model.attention import resolve_impl
from llama_jax.parallel import distributed
from llama_jax.parallel import sharding as shd
from llama_jax.train import step as ts
from llama_jax.trainer import metrics
from llama_jax.trainer.control import (
    PeerWatch,
    Profiler,
    StepWatchdog,
    StopFlag,
    WorkdirLock,
    gather_flags,
    inject_fault,
)
from llama_jax.weights import init_from

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


@jax.jit
def _track(acc, step_metrics, step):
    """Counts skipped steps and remembers the first non-finite loss, on device, every step."""
    bad = ~jnp.isfinite(step_metrics["loss"])
    first = jnp.where((acc["first_bad"] < 0) & bad, step, acc["first_bad"])
    return {"skipped": acc["skipped"] + step_metrics["skipped"], "first_bad": first}


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
    log.info(
        "devices: %d x %s (%s), processes: %d",
        len(devices),
        devices[0].device_kind,
        devices[0].platform,
        jax.process_count(),
    )
    log.info("mesh: %s", dict(mesh.shape))
    log.info(
        "attention: %s, remat policy: %s, dtype: %s, params dtype: %s",
        _attention_impl(cfg),
        mc.remat_policy,
        mc.dtype,
        mc.param_dtype,
    )
    log.info(
        "parameters: %s (%.3g B), tokens per step: %s",
        f"{n_params:,}",
        n_params / 1e9,
        f"{cfg.train.tokens_per_step:,}",
    )


@dataclasses.dataclass
class Run:
    """Everything a training run holds; setup() builds it, train() drives it."""

    cfg: RunConfig
    workdir: str
    mesh: Mesh
    tokenizer: Tokenizer
    dataset_dir: str
    data_fingerprint: dict  # data.format.fingerprint(): stored with every checkpoint
    ckpt: Checkpointer
    state: Any  # train_step.TrainState
    step_fn: Any
    loader: Loader
    validate: Any  # evaluate.ValidationLoss, or None when validation is off
    writer: metrics.MetricsWriter
    n_params: int
    start: int
    tokens_seen: int
    last_saved: int | None
    skipped_before: int
    frozen: dict  # the step's frozen input: {} for full training, LoRA's base (adapters/trainable)
    stop: StopFlag = dataclasses.field(default_factory=StopFlag)
    profiler: Profiler | None = None
    throughput: metrics.Throughput | None = None
    acc: dict | None = None  # on-device counters of _track
    last: dict = dataclasses.field(default_factory=dict)
    t_start: float = dataclasses.field(default_factory=time.perf_counter)

    def __post_init__(self):
        self.is_main = jax.process_index() == 0
        # A run resumed at its last step trains nothing but still reports where it got to.
        self.last = metrics.last_record(self.workdir) if self.start else {}
        self.profiler = Profiler(self.cfg.train.profile_range, self.workdir)
        self.watchdog = StepWatchdog(self.cfg.train.step_timeout_s)
        self.peers = PeerWatch(self.cfg.distributed.peer_timeout_s)
        self.throughput = metrics.Throughput(self.tokens_seen)
        self.acc = {"skipped": jnp.zeros((), jnp.int32), "first_bad": jnp.full((), -1, jnp.int32)}
        self.flops_per_token = stats.flops_per_token(
            self.cfg.model, self.cfg.train.seq_len, self.n_params
        )
        self.peak = stats.device_peak_flops()
        self.eval_every = self.cfg.train.eval_every if self.validate is not None else 0
        # Every process must stop at the same step; across hosts agreeing costs a collective
        # and a host sync, so multi-process jobs ask every few steps rather than every step.
        self.log_every = max(1, self.cfg.train.log_every)
        self.stop_every = 1 if jax.process_count() == 1 else min(self.log_every, 10)
        from tqdm import tqdm

        self.bar = tqdm(
            total=self.cfg.train.steps,
            initial=self.start,
            disable=not self.is_main,
            unit="step",
            dynamic_ncols=True,
        )
        self.stop.install()

    def full_params(self):
        """The plain model's params: the trained ones, or LoRA's base with the adapters merged."""
        seam = trainable.of(self.cfg.model)
        return seam.merged(seam.join(self.state.params, self.frozen))

    # ---- the loop's pieces ---------------------------------------------------------------

    def log_start(self) -> None:
        """Step 0's record: the validation loss of the untrained model (the curve's start) and,
        for a run from released weights, the loss of the first batch before any update."""
        record = {"step": 0, "tokens_seen": 0}
        if self.eval_every:
            record["val_loss"] = self.validate(self.state.params)
        if self.cfg.train.init_from:
            _, shardings = ts.abstract_train_state(self.cfg, self.mesh)
            evaluate = ts.make_eval_step(self.cfg, self.mesh, shardings)
            batch = self.loader.batch(self.start)
            record["first_batch_loss"] = float(
                evaluate(self.state.params, batch, self.frozen)["loss"]
            )
            log.info("first batch loss before any update: %.6f", record["first_batch_loss"])
        if len(record) > 2:
            self.writer.write(record)

    def step(self, step: int) -> None:
        """One optimizer step (step counts from 0); step_metrics kept for the next log."""
        self.profiler.before(step)
        self.state, self.step_metrics = self.step_fn(self.state, next(self.loader), self.frozen)
        self.acc = _track(self.acc, self.step_metrics, step + 1)
        self.profiler.after(step, self.state)
        self.tokens_seen += self.cfg.train.tokens_per_step
        inject_fault(step + 1)
        self.watchdog.beat(step + 1)

    def should_stop(self, done: int) -> bool:
        """True when any process was signalled; raises CheckpointSaveError on every process as
        soon as one knows its async save failed (disk full: at the failing save, not the next)."""
        if done % self.stop_every and not self.save_due(done, False):
            return False  # (before a save the processes agree that the last one was written)
        error = self.ckpt.save_error()
        flags = gather_flags(self.stop.signal is not None, error is not None)
        if flags[:, 1].any():
            failed = int(np.flatnonzero(flags[:, 1])[0])
            raise CheckpointSaveError(
                error or f"saving checkpoint step {self.ckpt.saving} failed on process {failed}"
            )
        return bool(flags[:, 0].any())

    def log_due(self, done: int, save: bool) -> bool:
        return done % self.log_every == 0 or save or self._eval_due(done)

    def save_due(self, done: int, stopping: bool) -> bool:
        every = self.cfg.checkpoint.every_steps
        return done == self.cfg.train.steps or stopping or bool(every and done % every == 0)

    def _eval_due(self, done: int) -> bool:
        e = self.eval_every
        return bool(e) and (done % e == 0 or done == self.cfg.train.steps)

    def log(self, done: int) -> None:
        """Writes the metrics record of step `done` (with val loss when due); raises on a
        non-finite loss unless train.skip_nonfinite."""
        m = {k: float(v) for k, v in jax.device_get(self.step_metrics).items()}
        a = {k: int(v) for k, v in jax.device_get(self.acc).items()}
        rate = self.throughput.rate(self.tokens_seen)
        record = {
            "step": done,
            "loss": m["loss"],
            "lr": m["lr"],
            "grad_norm": m["grad_norm"],
            "tokens_seen": self.tokens_seen,
            "tokens_per_sec": rate,
            "skipped_steps": self.skipped_before + a["skipped"],
        }
        if rate is not None:  # mfu_6n (the paper's basis) and mfu_palm, on a known device
            record.update(stats.mfu(rate, self.flops_per_token, jax.device_count(), self.peak))
        if self._eval_due(done):
            self.watchdog.pause()  # evaluation is not a step
            record["val_loss"] = self.validate(self.state.params)
            for name, loss in getattr(self.validate, "per_source", {}).items():
                record[f"val_loss/{name}"] = loss
            self.watchdog.resume()
        if isinstance(self.loader, mixture.MixtureLoader):
            for name, tokens in self.loader.tokens_seen(done).items():
                record[f"tokens_seen/{name}"] = tokens
        self.writer.write(record)
        self.last = record
        if a["first_bad"] >= 0 and not self.cfg.train.skip_nonfinite:
            raise NonFiniteLossError(
                f"non-finite loss at step {a['first_bad']} (step {done}: loss {m['loss']}, grad "
                f"norm {m['grad_norm']}); last good checkpoint: step {self.last_saved} in "
                f"{self.ckpt.directory}. Lower train.lr, or set train.skip_nonfinite=true to "
                "skip such steps"
            )
        self._progress(done, record)

    def _progress(self, done: int, record: dict) -> None:
        self.bar.update(done - self.bar.n)
        post = {
            "loss": f"{record['loss']:.3f}",
            "lr": f"{record['lr']:.2e}",
            "gnorm": f"{record['grad_norm']:.2f}",
        }
        if record["tokens_per_sec"] is not None:
            post["tok/s"] = f"{record['tokens_per_sec']:,.0f}"
        if "mfu_6n" in record:
            post["mfu(6N/PaLM)"] = f"{record['mfu_6n']:.1%}/{record['mfu_palm']:.1%}"
        if record.get("val_loss") is not None:
            post["val"] = f"{record['val_loss']:.3f}"
        self.bar.set_postfix(post, refresh=False)

    def save(self, done: int) -> None:
        self.watchdog.pause()  # a (sync) save is not a step
        meta = {"step": done, "tokens_seen": self.tokens_seen, "config": self.cfg.to_dict(),
                "dataset": self.data_fingerprint}  # fmt: skip
        self.ckpt.save(done, self.state, meta)
        self.last_saved = done
        self.watchdog.resume()

    def stopped(self, done: int) -> dict:
        """After a stop signal: the checkpoint of `done` is written; the same command resumes."""
        self.watchdog.pause()
        self.ckpt.wait()
        signame = self.stop.signal or "signal"
        msg = (
            f"{signame} received: saved step {done} to {self.ckpt.directory}; "
            "run the same command again to resume"
        )
        log.warning(msg)
        if self.is_main:
            print(msg, flush=True)
        return {**self.last, "stopped_by": signame}

    def close(self, failed: bool = False) -> None:
        try:
            self.watchdog.close()
            self.profiler.stop()
            self.bar.close()
            self.stop.restore()
            self.loader.close()
            if self.validate is not None:
                self.validate.close()
            self.writer.close()
            self.ckpt.close()
        except BaseException:
            failed = True
            raise
        finally:
            # Last: while closing (the last save waiting for a peer that failed) the peer watch
            # can still end this process instead of leaving it in orbax's barrier.
            self.peers.close(failed)


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
    return (
        state,
        shardings,
        int(meta.get("tokens_seen", int(state.step) * cfg.train.tokens_per_step)),
    )


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


def _validation(
    cfg: RunConfig, mesh: Mesh, shardings, dataset_dir: str, tokenizer: Tokenizer, frozen: dict
):
    """The validation-loss evaluator, or None when validation is off or the split too small."""

    if not (cfg.train.eval_every and cfg.train.eval_batches > 0):
        return None
    step = ts.make_eval_step(cfg, mesh, shardings)
    evaluate = lambda params, batch: step(params, batch, frozen)  # noqa: E731
    if cfg.data.mixture:
        return _mixture_validation(cfg, mesh, evaluate, tokenizer)
    try:
        return ValidationLoss(
            evaluate,
            cfg.train,
            dataset_dir,
            shd.batch_sharding(mesh),
            tokenizer.sha256,
            run_data.document_bos(cfg, tokenizer),
        )
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


def setup(cfg: RunConfig, workdir: str, config_diff: dict | None = None) -> Run:
    """Mesh, data, train state (restored or fresh), step functions, checkpointer, writers."""
    os.makedirs(workdir, exist_ok=True)
    mesh = shd.make_mesh(*cfg.mesh.sizes)
    n_params = stats.count_params(cfg.model)
    dataset_dir, tokenizer = run_data.open_data(cfg)
    _log_startup(cfg, config_diff or {}, mesh, n_params)
    c = cfg.checkpoint
    _check_history(workdir, c.allow_restart)
    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=c.keep,
        keep_period=c.keep_period,
        async_save=c.async_save,
    )
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
    return Run(
        cfg=cfg,
        workdir=workdir,
        mesh=mesh,
        tokenizer=tokenizer,
        dataset_dir=dataset_dir,
        data_fingerprint=data,
        ckpt=ckpt,
        state=state,
        step_fn=ts.make_train_step(cfg, mesh, shardings),
        loader=loader,
        validate=_validation(cfg, mesh, shardings, dataset_dir, tokenizer, frozen),
        frozen=frozen,
        writer=metrics.MetricsWriter(workdir, start, jax.process_index() == 0),
        n_params=n_params,
        start=start,
        tokens_seen=tokens_seen,
        last_saved=start if ckpt.latest_step() is not None else None,
        skipped_before=int(metrics.last_record(workdir).get("skipped_steps", 0)) if start else 0,
    )


def train(
    cfg: RunConfig, workdir: str, *, config_diff: dict | None = None, command: str | None = None
) -> dict:
    """Runs (or resumes) the training job described by cfg in workdir.

    Returns the last logged metrics, plus "stopped_by" when a signal ended the run early.
    Raises NonFiniteLossError on a non-finite loss (unless train.skip_nonfinite). command:
    the command line that runs this again (shown in the end-of-run summary).
    """
    distributed.initialize(
        cfg.distributed.coordinator, cfg.distributed.num_processes, cfg.distributed.process_id
    )
    cfg = init_from.apply_source(cfg)  # the model's shape from released weights, if any
    os.makedirs(workdir, exist_ok=True)
    lock = WorkdirLock(workdir)
    if jax.process_index() == 0:  # one holder per job: the others follow process 0
        lock.acquire()
    try:
        return _train(cfg, workdir, config_diff, command)
    finally:
        lock.release()


def _train(cfg: RunConfig, workdir: str, config_diff: dict | None, command: str | None) -> dict:
    run = setup(cfg, workdir, config_diff)
    failed = True  # until the loop ends or stops: peers stop at once instead of waiting
    try:
        if run.start == 0:
            run.log_start()
        for step in range(run.start, cfg.train.steps):
            run.step(step)
            done = step + 1
            stopping = run.should_stop(done)
            save = run.save_due(done, stopping)
            if run.log_due(done, save):
                run.log(done)
                if save:
                    run.save(done)
                run.throughput.mark(run.tokens_seen)  # evaluating and saving are not training
            if stopping:
                failed = False
                return run.stopped(done)
        run.watchdog.pause()
        run.ckpt.wait()
        failed = False
    except jax.errors.JaxRuntimeError:  # a collective failed: name the peer that died
        lost = run.peers.lost_peer()
        if lost:
            run.peers.fire(lost)  # exits: closing would wait for the lost peer
        raise
    finally:
        run.close(failed)
    finish(run, command)
    return run.last


def _samples(run: Run) -> None:
    """Samples continuing validation prompts (train.samples of them), printed by process 0."""

    cfg, sampling = run.cfg, Sampling(temperature=0.8, top_k=40)
    if run.n_params > 2e9:
        log.info("no samples: %d parameters are too many to gather on one host", run.n_params)
        return
    prompts = run_data.val_prompts(run.dataset_dir, run.tokenizer, cfg.train.samples)
    if not prompts:
        log.info("no samples: no validation prompts")
        return
    texts = sample_texts(run.full_params(), lora.plain(cfg.model), run.tokenizer, prompts,
                         cfg.train.sample_tokens, sampling=sampling, seed=cfg.train.seed)  # fmt: skip
    for prompt, text in zip(prompts, texts):
        if run.is_main:
            shown = run.tokenizer.decode(prompt)
            what = f"temperature {sampling.temperature}, top-k {sampling.top_k}"
            print(f"--- sample (prompt {shown!r}, {what}) ---\n{text}", flush=True)


def finish(run: Run, command: str | None = None) -> None:
    """After the last step: loss.png, samples from validation prompts, the summary block."""
    png = metrics.plot_losses(run.workdir) if run.is_main else None
    if run.cfg.train.samples > 0:
        _samples(run)
    if run.is_main:
        print(
            metrics.summary_block(
                workdir=run.workdir,
                last=run.last,
                vocab_size=run.tokenizer.vocab_size,
                tokens_seen=run.tokens_seen,
                tokens_per_sec=run.throughput.mean_rate,
                wall_seconds=time.perf_counter() - run.t_start,
                checkpoints=run.ckpt.directory,
                plot=png,
                tokenizer=run.tokenizer.model_path,
                command=command,
                dataset=run.dataset_dir,
            ),
            flush=True,
        )
