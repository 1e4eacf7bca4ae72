"""Params-only checkpoints ("ours" format): what launch.export and launch.convert --to ours write.

Layout of a checkpoint directory:
  path/params/            orbax PyTree checkpoint of the raw (unboxed) parameter tree
  path/model_config.json  dataclasses.asdict(ModelConfig)

The tree is the inner params dict (tok_embeddings, layers, norm, output), the one that
Llama.apply takes as {"params": tree}; it holds no optimizer state and no step.
"""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.config import ModelConfig
from llama_jax.config_fields import dtype_name, dtype_of
from llama_jax.model.llama import abstract_params
from llama_jax.parallel.sharding import tree_shardings

PARAMS_DIR = "params"
CONFIG_FILE = "model_config.json"


def _cast(tree, dtype):
    """Casts floating leaves to dtype; integer leaves (none today) are left alone."""
    if dtype is None:
        return tree

    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, tree)


def _inner(params):
    """Accepts either the params tree or the {"params": tree} variables dict."""
    params = nn.meta.unbox(params)
    if isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]
    return params


def save_params(path: str, params, model_cfg: ModelConfig, dtype=None) -> str:
    """Writes params (boxed or raw, optionally cast to dtype) and the model config under path.

    Args:
      path: output directory; created if missing. An existing params/ inside it is an error.
      params: the params tree, boxed (nn.LogicallyPartitioned) or raw, or {"params": tree}.
      model_cfg: the ModelConfig the params belong to.
      dtype: None keeps the params' dtype; else a jnp dtype or a name in config.DTYPES.
    Returns:
      the absolute path written.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    tree = _cast(_inner(params), dtype_of(dtype))
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(path, PARAMS_DIR), tree)
    ckptr.wait_until_finished()
    if jax.process_index() == 0:
        cfg = dataclasses.asdict(model_cfg)
        if dtype is not None:  # the stored weights are the master weights from now on
            cfg["param_dtype"] = dtype_name(dtype_of(dtype))
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
    return path


def load_config(path: str) -> ModelConfig:
    """Reads path/model_config.json into a ModelConfig."""
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: {path} is not a params checkpoint")
    with open(cfg_path) as f:
        return ModelConfig.from_dict(json.load(f))


def load_for_inference(path: str, dtype=None, mesh=None):
    """(params, ModelConfig, a line saying which dtype computes) of a params checkpoint for
    decoding or evaluation: computed in the dtype its weights are stored in (a float32 export
    of a run trained in bfloat16 decodes in float32), or in dtype when one is asked for (the
    params are cast to it)."""
    params, cfg = load_params(path, dtype=dtype, mesh=mesh)
    stored = jax.tree.leaves(params)[0].dtype
    cfg = dataclasses.replace(cfg, dtype=dtype_name(stored))
    why = "as asked (--dtype)" if dtype is not None else "the checkpoint's; --dtype to change"
    return params, cfg, f"computing in {cfg.dtype} ({why}), params in {dtype_name(stored)}"


def load_params(path: str, dtype=None, sharding=None, mesh=None):
    """Reads a checkpoint written by save_params.

    Args:
      path: the directory given to save_params.
      dtype: None restores the stored dtype; else floating leaves are cast while reading.
      sharding: None puts every array on the first local device; a jax.sharding.Sharding
        applies to all leaves; or a tree of Shardings matching the params tree (e.g. from
        the logical partition specs of the model's boxed params).
      mesh: instead of sharding, a jax Mesh: each leaf sharded per its logical axis names
        (sharding.py's rules), e.g. attention heads over a "tensor" axis.
    Returns:
      (params, model_cfg): the raw params tree and its ModelConfig.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    model_cfg = load_config(path)
    if dtype is not None:
        model_cfg = dataclasses.replace(model_cfg, param_dtype=dtype_name(dtype_of(dtype)))
    ckptr = ocp.StandardCheckpointer()
    params_dir = os.path.join(path, PARAMS_DIR)
    stored = _readable(lambda: ckptr.metadata(params_dir).item_metadata.tree, path)
    if mesh is not None:
        sharding = tree_shardings(abstract_params(model_cfg), mesh)[1]
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(sharding, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: sharding, stored)
    else:
        shardings = sharding
    want = dtype_of(dtype)

    def abstract(meta, shard):
        dt = meta.dtype
        if want is not None and jnp.issubdtype(dt, jnp.floating):
            dt = want
        return jax.ShapeDtypeStruct(tuple(meta.shape), dt, sharding=shard)

    target = jax.tree.map(abstract, stored, shardings)
    return _readable(lambda: ckptr.restore(params_dir, target), path), model_cfg


class CorruptParamsError(RuntimeError):
    pass


def _readable(read, path: str):
    """read(), with whatever orbax/tensorstore raise for a truncated or damaged checkpoint
    (a bare Exception among them) turned into one error naming the checkpoint."""
    try:
        return read()
    except Exception as e:  # noqa: BLE001 - orbax's errors for bad files have no common type
        first = str(e).splitlines()[0] if str(e) else ""
        raise CorruptParamsError(
            f"cannot read the params checkpoint {path}: {type(e).__name__}: {first[:300]}"
        ) from e
