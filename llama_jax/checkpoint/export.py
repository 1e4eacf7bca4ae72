"""A training checkpoint's params for other tools: plain params (params_io) that
launch.generate, launch.eval and launch.convert read, LoRA adapters merged into their base, or
a Hugging Face PEFT adapter (launch.export)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

import jax

from llama_jax.adapters import lora
from llama_jax.checkpoint.manager import Checkpointer
from llama_jax.config import RunConfig
from llama_jax.parallel.sharding import make_mesh
from llama_jax.train import step as ts
from llama_jax.weights import init_from, params_io
from llama_jax.weights.peft import write_peft

log = logging.getLogger(__name__)


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
        write_peft(peft, jax.device_get(state.params), cfg.model, base)
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
