"""What a training step trains: the model's variables as one trainable and one frozen tree.

The step (train/step.py) differentiates and updates the trainable tree and takes the frozen
one as an input like the batch; the memory inspector counts both and the trainer holds both.
Full training trains the model's "params" and freezes nothing: the frozen tree is {}, which
jit takes as no input at all. LoRA trains its "lora" collection over the frozen "params" of
the base. Another way to fine-tune is another Trainable here, not a flag in those signatures.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from llama_jax.adapters import lora
from llama_jax.config import ModelConfig
from llama_jax.model.llama import Llama
from llama_jax.parallel import sharding as shd


@dataclasses.dataclass(frozen=True)
class Trainable:
    """The model a step applies, and which of its variable collections the optimizer updates.

    model: what has init/apply (Llama, or lora.LoRA around it); collection: the trained one;
    merged: joined variables -> the plain model's params (for sampling and export)."""

    model: Any
    collection: str
    merged: Callable[[dict], Any] = operator.itemgetter("params")

    def split(self, variables) -> tuple[Any, dict]:
        """(trainable, frozen): the trained collection, and a dict of every other one."""
        frozen = {k: v for k, v in variables.items() if k != self.collection}
        return variables[self.collection], frozen

    def join(self, trainable, frozen: dict) -> dict:
        """The variables to apply the model to: split's inverse."""
        return {**frozen, self.collection: trainable}

    def abstract_frozen(self, mesh: Mesh):
        """(frozen tree of ShapeDtypeStructs carrying their shardings, shardings); ({}, {})
        when nothing is frozen. jax.eval_shape of init: nothing is allocated."""
        tokens = jnp.zeros((1, 1), jnp.int32)
        boxed = jax.eval_shape(lambda: self.model.init(jax.random.key(0), tokens))
        shapes, shardings = shd.tree_shardings(self.split(boxed)[1], mesh)
        abstract = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
        )
        return abstract, shardings


def of(cfg: ModelConfig) -> Trainable:
    """The Trainable of a ModelConfig: LoRA's adapters when lora_rank > 0, else all params."""
    if cfg.lora_rank:
        model = lora.wrap(Llama(cfg), cfg)
        return Trainable(model, "lora", lambda variables: lora.merged(variables, cfg))
    return Trainable(Llama(cfg), "params")
