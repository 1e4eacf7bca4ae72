"""The checks that a resumed run continues the run it resumes: the same data order and
dataset, a model of the same parameter shape, and every other change named (or refused under
checkpoint.strict_resume), all before anything is restored."""

from __future__ import annotations

import logging

import jax

from llama_jax.config import RunConfig
from llama_jax.model.stats import param_shapes

log = logging.getLogger(__name__)


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
