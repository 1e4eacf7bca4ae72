"""The training loop: `train()` sets a run up (trainer/setup.py), then `Loop` drives it.

`train(cfg, workdir)` is everything `python -m launch.train` does. Every process of a
multi-host job runs it; only process 0 writes logs, metrics and plots, while all of them take
part in checkpoint writes (orbax coordinates them).
"""

from __future__ import annotations

import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.adapters import lora
from llama_jax.checkpoint.manager import CheckpointSaveError
from llama_jax.config import RunConfig
from llama_jax.data import mixture, run_data
from llama_jax.inference.generate import Sampling, sample_texts
from llama_jax.model import stats
from llama_jax.parallel import distributed
from llama_jax.train import step as ts
from llama_jax.trainer import metrics
from llama_jax.trainer.control import WorkdirLock, gather_flags
from llama_jax.trainer.setup import Inputs, Progress, Services, setup
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


class Loop:
    """Drives one run: reads `inputs`, advances `progress`, talks to `services`."""

    def __init__(self, inputs: Inputs, progress: Progress, services: Services):
        self.inputs, self.progress, self.services = inputs, progress, services
        cfg = inputs.cfg
        self.cfg, self.is_main = cfg, jax.process_index() == 0
        self.flops_per_token = stats.flops_per_token(cfg.model, cfg.train.seq_len, inputs.n_params)
        self.peak = stats.device_peak_flops()
        self.eval_every = cfg.train.eval_every if inputs.validate is not None else 0
        # Every process must stop at the same step; across hosts agreeing costs a collective
        # and a host sync, so multi-process jobs ask every few steps rather than every step.
        self.log_every = max(1, cfg.train.log_every)
        self.stop_every = 1 if jax.process_count() == 1 else min(self.log_every, 10)
        self.t_start = time.perf_counter()

    def train(self) -> dict:
        """Steps from progress.start to train.steps, logging, validating and saving as due;
        returns the last record, plus "stopped_by" when a signal ended the run early."""
        p, s, failed = self.progress, self.services, True  # failed: peers stop at once
        try:
            s.start(self.cfg.train.steps, p.start)
            if p.start == 0:
                self.log_start()
            for step in range(p.start, self.cfg.train.steps):
                self.step(step)
                done = step + 1
                stopping = self.should_stop(done)
                save = self.save_due(done, stopping)
                if self.log_due(done, save):
                    self.log(done)
                    if save:
                        self.save(done)
                    s.throughput.mark(p.tokens_seen)  # evaluating and saving are not training
                if stopping:
                    failed = False
                    return self.stopped(done)
            s.watchdog.pause()
            s.ckpt.wait()
            failed = False
        except jax.errors.JaxRuntimeError:  # a collective failed: name the peer that died
            if lost := s.peers.lost_peer():
                s.peers.fire(lost)  # exits: closing would wait for the lost peer
            raise
        finally:
            self.close(failed)
        return p.last

    def log_start(self) -> None:
        """Step 0's record: the validation loss of the untrained model (the curve's start) and,
        for a run from released weights, the loss of the first batch before any update."""
        i, state = self.inputs, self.progress.state
        record = {"step": 0, "tokens_seen": 0}
        if self.eval_every:
            record["val_loss"] = i.validate(state.params)
        if self.cfg.train.init_from:
            _, shardings = ts.abstract_train_state(self.cfg, i.mesh)
            evaluate = ts.make_eval_step(self.cfg, i.mesh, shardings)
            batch = i.loader.batch(self.progress.start)
            record["first_batch_loss"] = float(evaluate(state.params, batch, i.frozen)["loss"])
            log.info("first batch loss before any update: %.6f", record["first_batch_loss"])
        if len(record) > 2:
            self.services.writer.write(record)

    def step(self, step: int) -> None:
        """One optimizer step (step counts from 0); step_metrics kept for the next log."""
        i, p, s = self.inputs, self.progress, self.services
        s.profiler.before(step)
        p.state, p.step_metrics = i.step_fn(p.state, next(i.loader), i.frozen)
        p.acc = _track(p.acc, p.step_metrics, step + 1)
        s.profiler.after(step, p.state)
        p.tokens_seen += self.cfg.train.tokens_per_step
        for hook in s.hooks:
            hook(step + 1)
        s.watchdog.beat(step + 1)

    def should_stop(self, done: int) -> bool:
        """True when any process was signalled; raises CheckpointSaveError on every process as
        soon as one knows its async save failed (disk full: at the failing save, not the next)."""
        if done % self.stop_every and not self.save_due(done, False):
            return False  # (before a save the processes agree that the last one was written)
        ckpt = self.services.ckpt
        error = ckpt.save_error()
        flags = gather_flags(self.services.stop.signal is not None, error is not None)
        if flags[:, 1].any():
            failed = int(np.flatnonzero(flags[:, 1])[0])
            raise CheckpointSaveError(
                error or f"saving checkpoint step {ckpt.saving} failed on process {failed}"
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

    def _record(self, done: int) -> tuple[dict, dict]:
        """(the metrics record of step `done` without validation, the on-device counters)."""
        p = self.progress
        m = {k: float(v) for k, v in jax.device_get(p.step_metrics).items()}
        a = {k: int(v) for k, v in jax.device_get(p.acc).items()}
        rate = self.services.throughput.rate(p.tokens_seen)
        record = {"step": done, "loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"],
                  "tokens_seen": p.tokens_seen, "tokens_per_sec": rate,
                  "skipped_steps": p.skipped_before + a["skipped"]}  # fmt: skip
        if rate is not None:  # mfu_6n (the paper's basis) and mfu_palm, on a known device
            record.update(stats.mfu(rate, self.flops_per_token, jax.device_count(), self.peak))
        if isinstance(self.inputs.loader, mixture.MixtureLoader):
            for name, tokens in self.inputs.loader.tokens_seen(done).items():
                record[f"tokens_seen/{name}"] = tokens
        return record, a

    def log(self, done: int) -> None:
        """Writes the metrics record of step `done` (with val loss when due); raises on a
        non-finite loss unless train.skip_nonfinite."""
        p, s, validate = self.progress, self.services, self.inputs.validate
        record, a = self._record(done)
        if self._eval_due(done):
            s.watchdog.pause()  # evaluation is not a step
            record["val_loss"] = validate(p.state.params)
            for name, loss in getattr(validate, "per_source", {}).items():
                record[f"val_loss/{name}"] = loss
            s.watchdog.resume()
        s.writer.write(record)
        p.last = record
        if a["first_bad"] >= 0 and not self.cfg.train.skip_nonfinite:
            raise NonFiniteLossError(
                f"non-finite loss at step {a['first_bad']} (step {done}: loss {record['loss']}, "
                f"grad norm {record['grad_norm']}); last good checkpoint: step {p.last_saved} in "
                f"{s.ckpt.directory}. Lower train.lr, or set train.skip_nonfinite=true to "
                "skip such steps"
            )
        self._progress_bar(done, record)

    def _progress_bar(self, done: int, record: dict) -> None:
        bar = self.services.bar
        bar.update(done - bar.n)
        post = {"loss": f"{record['loss']:.3f}", "lr": f"{record['lr']:.2e}",
                "gnorm": f"{record['grad_norm']:.2f}"}  # fmt: skip
        if record["tokens_per_sec"] is not None:
            post["tok/s"] = f"{record['tokens_per_sec']:,.0f}"
        if "mfu_6n" in record:
            post["mfu(6N/PaLM)"] = f"{record['mfu_6n']:.1%}/{record['mfu_palm']:.1%}"
        if record.get("val_loss") is not None:
            post["val"] = f"{record['val_loss']:.3f}"
        bar.set_postfix(post, refresh=False)

    def save(self, done: int) -> None:
        p, s = self.progress, self.services
        s.watchdog.pause()  # a (sync) save is not a step
        meta = {"step": done, "tokens_seen": p.tokens_seen, "config": self.cfg.to_dict(),
                "dataset": self.inputs.data_fingerprint}  # fmt: skip
        s.ckpt.save(done, p.state, meta)
        p.last_saved = done
        s.watchdog.resume()

    def stopped(self, done: int) -> dict:
        """After a stop signal: the checkpoint of `done` is written; the same command resumes."""
        s = self.services
        s.watchdog.pause()
        s.ckpt.wait()
        signame = s.stop.signal or "signal"
        msg = (
            f"{signame} received: saved step {done} to {s.ckpt.directory}; "
            "run the same command again to resume"
        )
        log.warning(msg)
        if self.is_main:
            print(msg, flush=True)
        return {**self.progress.last, "stopped_by": signame}

    def close(self, failed: bool = False) -> None:
        try:
            self.inputs.loader.close()
            if self.inputs.validate is not None:
                self.inputs.validate.close()
        except BaseException:
            failed = True
            raise
        finally:
            self.services.close(failed)

    def finish(self, command: str | None = None) -> None:
        """After the last step: loss.png, samples from validation prompts, the summary block."""
        i, p = self.inputs, self.progress
        png = metrics.plot_losses(i.workdir) if self.is_main else None
        if self.cfg.train.samples > 0:
            self._samples()
        if self.is_main:
            block = metrics.summary_block(
                workdir=i.workdir, last=p.last, vocab_size=i.tokenizer.vocab_size,
                tokens_seen=p.tokens_seen, tokens_per_sec=self.services.throughput.mean_rate,
                wall_seconds=time.perf_counter() - self.t_start,
                checkpoints=self.services.ckpt.directory, plot=png,
                tokenizer=i.tokenizer.model_path, command=command, dataset=i.dataset_dir,
            )  # fmt: skip
            print(block, flush=True)

    def _samples(self) -> None:
        """Samples continuing validation prompts (train.samples of them), printed by process 0."""
        i, cfg, sampling = self.inputs, self.cfg, Sampling(temperature=0.8, top_k=40)
        if i.n_params > 2e9:
            log.info("no samples: %d parameters are too many to gather on one host", i.n_params)
            return
        prompts = run_data.val_prompts(i.dataset_dir, i.tokenizer, cfg.train.samples)
        if not prompts:
            log.info("no samples: no validation prompts")
            return
        params = i.full_params(self.progress.state.params)
        texts = sample_texts(params, lora.plain(cfg.model), i.tokenizer, prompts,
                             cfg.train.sample_tokens, sampling=sampling, seed=cfg.train.seed)  # fmt: skip
        for prompt, text in zip(prompts, texts):
            if self.is_main:
                shown = i.tokenizer.decode(prompt)
                what = f"temperature {sampling.temperature}, top-k {sampling.top_k}"
                print(f"--- sample (prompt {shown!r}, {what}) ---\n{text}", flush=True)


def train(
    cfg: RunConfig,
    workdir: str,
    *,
    config_diff: dict | None = None,
    command: str | None = None,
    hooks=(),
) -> dict:
    """Runs (or resumes) the training job described by cfg in workdir.

    Returns the last logged metrics, plus "stopped_by" when a signal ended the run early.
    Raises NonFiniteLossError on a non-finite loss (unless train.skip_nonfinite). command:
    the command line that runs this again (shown in the end-of-run summary). hooks: callables
    run after every step with the number of steps done (tests inject faults this way).
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
        loop = Loop(*setup(cfg, workdir, config_diff, hooks))
        last = loop.train()
        if "stopped_by" not in last:
            loop.finish(command)
        return last
    finally:
        lock.release()
