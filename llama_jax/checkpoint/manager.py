"""Orbax checkpoints of the whole train state: async saves, retention, resume, re-sharding,
and the checks that a resumed run continues the run it resumes.

A checkpoint step directory holds `state` (params, optimizer state, step) and `meta` (the
config, which holds the seeds, and loop counters as JSON). Training draws no random numbers
after init: the data order is a function of (data seed, step). Orbax writes each step into a
temporary directory and renames it only once complete, so an interrupted write is never picked
up by latest_step().
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

import jax
import orbax.checkpoint as ocp

from llama_jax.adapters import lora
from llama_jax.config import RunConfig
from llama_jax.model.stats import param_shapes
from llama_jax.parallel.sharding import make_mesh
from llama_jax.train import step as ts
from llama_jax.weights import convert, init_from, params_io

log = logging.getLogger(__name__)


class CorruptCheckpointError(RuntimeError):  # noqa: N818
    pass


class CheckpointSaveError(RuntimeError):
    """An (async) save failed: disk full, a lost mount, a write error."""


def _first_line(e: BaseException) -> str:
    text = str(e).split(" See full TensorStore details")[0]
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


class _QuietOrbax(logging.Filter):
    """orbax logs a failed background write as ERROR with a full traceback, three times, and
    asyncio one 'exception was never retrieved' traceback per array it was writing; our
    CheckpointSaveError carries the first line, so those tracebacks go (kept at DEBUG level)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if log.isEnabledFor(logging.DEBUG):
            return True
        if record.name == "asyncio":
            message = record.getMessage()
            return not ("exception was never retrieved" in message and "orbax" in message)
        if "orbax" in record.pathname and record.exc_info:
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_event_loop_closed(hook):
    """After one write of an async save fails, orbax's event loop closes while tensorstore's
    other writes still complete into it; each prints 'RuntimeError: Event loop is closed'
    through sys.unraisablehook (30-76 tracebacks). Those say nothing the save error does not."""

    def unraisable(u):
        if not (
            isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value)
        ):
            hook(u)

    unraisable.quiet_event_loop_closed = True
    return unraisable


def quiet_orbax() -> None:
    """Installs both (idempotent)."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietOrbax) for f in logger.filters):
            logger.addFilter(_QuietOrbax())
    if not getattr(sys.unraisablehook, "quiet_event_loop_closed", False):
        sys.unraisablehook = _quiet_event_loop_closed(sys.unraisablehook)


class Checkpointer:
    """Args: keep the most recent checkpoints kept; keep_period also keeps every step
    divisible by it (0 = none); async_save writes in the background; read_only never writes
    (export, inspection)."""

    def __init__(
        self,
        directory: str,
        *,
        keep: int = 3,
        keep_period: int = 0,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = os.path.abspath(directory)
        self.saving: int | None = None  # the step of the newest save started
        quiet_orbax()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max(1, keep),
            keep_period=keep_period or None,
            enable_async_checkpointing=async_save,
            create=not read_only,
            cleanup_tmp_directories=not read_only,  # partial writes of a killed run
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, meta: dict, *, force: bool = True) -> None:
        """Starts an (async) save of state at step; meta must be JSON-serializable. Raises
        CheckpointSaveError naming the step whose save failed (this one or the one before)."""
        error = self.save_error()
        if error:
            raise CheckpointSaveError(error)
        self.saving = step
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        try:
            self.manager.save(step, args=args, force=force)
        except Exception as e:  # noqa: BLE001 - whatever the write raised
            raise CheckpointSaveError(self._save_failed(e)) from e

    def save_error(self) -> str | None:
        """Without waiting: the error of an async save that has failed, as one line naming the
        step and the newest complete checkpoint (each error is reported once)."""
        if self.saving is None or self.manager.is_saving_in_progress():
            return None
        try:  # finished: returns at once, raising what the save raised (once)
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - whatever the write raised
            return self._save_failed(e)
        return None

    def _save_failed(self, e: BaseException) -> str:
        newest = self.latest_step()
        intact = "no checkpoint yet" if newest is None else f"step {newest} is intact"
        return (
            f"saving checkpoint step {self.saving} to {self.directory} failed: {_first_line(e)}; "
            f"{intact}. Free space or fix the file system, then run the same command again"
        )

    def restore(self, abstract_state, step: int | None = None):
        """Restores onto the shardings of abstract_state (a tree of ShapeDtypeStruct with
        .sharding), which may describe a different mesh than the one that saved it.

        Returns (state, meta).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        out = self._read(step, "restore checkpoint", args)
        return out["state"], out["meta"]

    def restore_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return self._read(step, "read checkpoint", {"meta": ocp.args.JsonRestore()})["meta"]

    def _read(self, step: int, what: str, args: dict) -> dict:
        """Reads items of step on every process, then the processes agree whether all of them
        could: any failure is a CorruptCheckpointError on all of them, naming the process.

        orbax's own restore ends in a cross-process barrier that a process whose read failed
        never reaches, which left the others waiting (and their next save hanging), so the
        read here skips it (active_processes = this one) and agreeing is the barrier."""
        options = ocp.options.MultiprocessingOptions(active_processes={jax.process_index()})
        reader = ocp.Checkpointer(ocp.CompositeCheckpointHandler(), multiprocessing_options=options)
        out, error = None, ""
        try:
            out = reader.restore(
                os.path.join(self.directory, str(step)), ocp.args.Composite(**args)
            )
        except Exception as e:  # noqa: BLE001 - orbax raises many types for truncated files
            error = _first_line(e)
        finally:
            reader.close()
        failed = _failed_processes(bool(error))
        if failed:
            where = f" on process {failed[0]}" if jax.process_count() > 1 else ""
            raise CorruptCheckpointError(
                f"cannot {what} step {step} from {self.directory}{where}: "
                + (error or f"process {failed[0]} could not read it")
            )
        return out

    def restore_newest(self, abstract_state, check=None, fallback: bool = True):
        """(state, meta) of the newest checkpoint that restores, or None when there is none.

        check(meta) runs before each restore and may raise (a config that does not fit is the
        user's error, not corruption). A step that cannot be read is moved aside to
        corrupt-<step> and the next older one tried (fallback), or raised (fallback=False);
        if none restores, that is an error too: never a silent restart from step 0.
        """
        corrupt = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                meta = self.restore_meta(step)
                if check is not None:
                    check(meta)
                return self.restore(abstract_state, step)
            except CorruptCheckpointError as e:
                if not fallback:
                    raise CorruptCheckpointError(
                        f"{e}; move {os.path.join(self.directory, str(step))} aside to continue "
                        "from an older checkpoint (checkpoint.on_corrupt=fallback does that)"
                    ) from e
                log.warning("%s; moved aside, trying the next older checkpoint", e)
                corrupt.append(self._set_aside(step))
        if corrupt:
            raise CorruptCheckpointError(
                f"no checkpoint in {self.directory} restores (moved aside: {corrupt})"
            )
        return None

    def _set_aside(self, step: int) -> str:
        """Moves step's directory to corrupt-<step> (process 0; the others wait) and forgets it."""
        from jax.experimental import multihost_utils

        dest = os.path.join(self.directory, f"corrupt-{step}")
        if jax.process_index() == 0:
            os.replace(os.path.join(self.directory, str(step)), dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"llama_jax checkpoint {step} set aside")
        self.manager.reload()
        return dest

    def wait(self) -> None:
        """Blocks until the pending save is written; raises CheckpointSaveError if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - whatever the write raised
            raise CheckpointSaveError(self._save_failed(e)) from e

    def close(self) -> None:
        self.wait()
        self.manager.close()


def _failed_processes(failed: bool) -> list[int]:
    """The indices of the processes that passed failed=True (every process must call this)."""
    if jax.process_count() == 1:
        return [0] if failed else []
    import numpy as np
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.int32(failed))
    return [int(i) for i in np.flatnonzero(np.asarray(flags).reshape(-1))]


# Fields that fix which tokens each step sees: changing them on resume would silently skip or
# repeat data. Schedule fields may change (extending a run), with a warning.
RESUME_FIXED = ("train.batch_size", "train.seq_len", "data.path", "data.mixture")
# The run's environment, free to change on resume without a word: the mesh (restore re-shards
# onto any mesh), multi-process settings, loader prefetch and the resume switches themselves.
RESUME_FREE = ("mesh.", "distributed.", "data.prefetch", "data.allow_dataset_change",
               "checkpoint.allow_restart", "checkpoint.strict_resume", "checkpoint.on_corrupt",
               "train.step_timeout_s")  # fmt: skip


def check_resume_data(saved: dict | None, current: dict, cfg: RunConfig) -> None:
    """Raises when the data differs from the checkpoint's: saved and current are
    data.format.fingerprint()s (tokenizer and prepared-metadata hashes)."""
    if not saved:  # a checkpoint from before fingerprints: nothing to compare
        log.warning("checkpoint has no dataset fingerprint: cannot check the data it trained on")
        return
    changed = [f"{k} {saved.get(k, '?')[:12]}... -> {v[:12]}..." for k, v in current.items()
               if saved.get(k) != v]  # fmt: skip
    if not changed:
        return
    if cfg.data.allow_dataset_change:
        log.warning("resuming on a different dataset (%s), as data.allow_dataset_change says",
                    "; ".join(changed))  # fmt: skip
        return
    raise ValueError(
        f"resuming on a different dataset than the checkpoint ({'; '.join(changed)}): the "
        f"tokenizer or the prepared data at data.path={cfg.data.path!r} changed; use the "
        "original data, a new --workdir, or --config.data.allow_dataset_change=true to "
        "continue on this data on purpose"
    )


def check_resume(saved: dict | None, cfg: RunConfig) -> None:
    """Compares cfg with the config stored in the checkpoint (saved), field by field, before
    anything is restored. Refused, naming the fields and both values: a different data order
    (silently skipped or repeated data), and a model of another parameter shape (it cannot be
    restored; orbax would call it corruption). Any other change is listed in one warning, or
    refused under checkpoint.strict_resume."""
    if not saved:
        return
    before = RunConfig.from_dict(saved)
    old, new = before.flat(), cfg.flat()
    bad = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in RESUME_FIXED if old[k] != new[k]]
    if before.train.data_order_seed != cfg.train.data_order_seed:
        bad.append(f"data seed: {before.train.data_order_seed} -> {cfg.train.data_order_seed}")
    if bad:
        raise ValueError(
            "resuming with a different data order than the checkpoint ("
            + "; ".join(bad)
            + "): use the original values or a new --workdir"
        )
    changed = {
        k: (old[k], new[k]) for k in old if old[k] != new[k] and not k.startswith(RESUME_FREE)
    }
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
    if _param_shapes(before.model) != _param_shapes(cfg.model):
        shape = "; ".join(
            f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items() if k.startswith("model.")
        )
        raise ValueError(
            f"resuming with a model of another shape than the checkpoint ({shape}): its "
            "parameters do not fit; use the original values or a new --workdir"
        )
    if changed and cfg.checkpoint.strict_resume:
        raise ValueError(
            f"resuming with a changed config ({listed}) under checkpoint.strict_resume: use the "
            "original values, or drop strict_resume to accept the changes"
        )
    if changed:
        log.warning("resuming with a changed config (the checkpoint's -> now): %s", listed)


def _param_shapes(model) -> list:
    """The parameter tree's structure, shapes and dtypes (nothing allocated)."""

    shapes = param_shapes(model)
    return [jax.tree.structure(shapes), [(x.shape, x.dtype) for x in jax.tree.leaves(shapes)]]


def export(
    workdir: str,
    output: str | None,
    step: int | None = None,
    dtype: str | None = None,
    *,
    merge_lora: bool = False,
    peft: str | None = None,
    peft_base: str | None = None,
    report: Callable[[str], None] = log.info,
) -> str:
    """Writes the params of a training checkpoint (no optimizer state) plus the model config,
    in the params_io format launch.generate, launch.eval and launch.convert read. Restores onto
    this machine's devices whatever mesh wrote it (FSDP over all of them).

    A LoRA checkpoint holds adapters: merge_lora folds them into the base (train.init_from,
    reloaded) in float32 and writes plain params to output, in float32 unless dtype names
    another (the merge error goes to report); peft writes a Hugging Face PEFT adapter whose
    base_model_name_or_path is peft_base, else train.init_from's directory when it is hf:."""

    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoints in {workdir} (expected {ckpt_dir})")
    ckpt = Checkpointer(ckpt_dir, keep=1, async_save=False, read_only=True)
    step = ckpt.latest_step() if step is None else step
    if step is None or step not in ckpt.all_steps():
        raise FileNotFoundError(f"no checkpoint step {step} in {ckpt_dir}; have {ckpt.all_steps()}")
    cfg = RunConfig.from_dict(ckpt.restore_meta(step)["config"])
    mesh = make_mesh(data=1, fsdp=-1, tensor=1)
    state, _ = ckpt.restore(ts.abstract_train_state(cfg, mesh)[0], step)
    ckpt.close()
    if not cfg.model.lora_rank:
        if output is None or peft:
            raise ValueError(f"{workdir} trained all parameters (no LoRA): give --output alone")
        params_io.save_params(output, jax.device_get(state.params), cfg.model, dtype=dtype)
        return output
    if not (merge_lora or peft) or bool(output) != merge_lora:
        raise ValueError(
            f"{workdir} holds LoRA adapters: --output DIR --merge-lora writes the base with them "
            "merged, --peft DIR a Hugging Face PEFT adapter"
        )
    if peft:
        base = _peft_base(cfg) if peft_base is None else peft_base
        convert.write_peft(peft, jax.device_get(state.params), cfg.model, base)
    if merge_lora:
        _export_merged(cfg, mesh, state.params, output, dtype or "float32", report)
    return output or peft


def _export_merged(cfg: RunConfig, mesh, adapters, output: str, dtype: str, report) -> None:
    """The base with the adapters merged in float32, stored in dtype; reports the merge error."""

    base = _lora_base(cfg, mesh)
    merged = jax.device_get(lora.merge(base, adapters, cfg.model))
    path = params_io.save_params(output, merged, lora.plain(cfg.model), dtype=dtype)
    err = lora.merge_error(base, adapters, params_io.load_params(path)[0], cfg.model)
    lossy = err > 1e-3  # float32 rounding is ~1e-7 of the update; bfloat16's is ~1e-1
    report(
        f"merged the adapters into the base in float32, stored in {dtype}: largest error "
        f"{err:.2e} of the adapters' largest update entry"
        + ("; an export in float32 (no --dtype) keeps the whole update" if lossy else "")
    )


def _peft_base(cfg: RunConfig) -> str:
    """What AutoPeftModelForCausalLM loads the base from: a Hugging Face directory."""
    fmt, _, path = cfg.train.init_from.partition(":")
    if fmt == "hf":
        return os.path.abspath(path)
    print(
        f"warning: the base (train.init_from={cfg.train.init_from!r}) is not a Hugging Face "
        "directory: adapter_config.json names no base; convert it (launch.convert --to hf) "
        "and pass --peft-base DIR", file=sys.stderr,
    )  # fmt: skip
    return ""


def _lora_base(cfg: RunConfig, mesh):
    """The base params the adapters were trained over: the step's frozen "params"."""
    if cfg.train.init_from:
        return init_from.load_params(cfg, ts.abstract_frozen(cfg, mesh)[1]["params"])
    return ts.random_frozen(cfg, mesh)["params"]
