"""KV-cache decoding: one jitted prefill of the (left-padded) prompts, then one jitted step per token.

Prompts of different lengths share a batch by left padding: every row's last prompt token sits
in the same cache slot, so each step writes one slot for all rows. Positions restart at 0 at a
row's first real token, and padding carries segment id 0 while real tokens carry 1, so the
cache's segment mask keeps padding out of every real token's attention (Attention._cached).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from llama_jax.config import ModelConfig
from llama_jax.data.tokenizer import Tokenizer, check_vocab
from llama_jax.model.llama import BTKH, Llama
from llama_jax.parallel.sharding import logical_to_sharding, make_mesh, model_context
from llama_jax.weights.params_io import load_config, load_for_inference

PAD_BUCKET = 16  # prompt batches are padded to a multiple of this, so lengths share compilations


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 (or top_p 0) is greedy; top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0


def sample_logits(logits, rng, s: Sampling):
    """[B, V] float logits -> [B] int32 tokens: greedy, or temperature + top-k + nucleus (top-p)."""
    if s.temperature <= 0.0 or s.top_p <= 0.0:  # top_p 0 keeps only the most likely token
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / s.temperature
    if s.top_k > 0:
        kth = jax.lax.top_k(logits, s.top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if s.top_p < 1.0:
        sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
        # before[0] is 0 < top_p, so at least the top token is kept (top_p 0 returned above:
        # it would keep none, and index -1 would wrap to the least likely, keeping all)
        n_keep = jnp.sum(before < s.top_p, axis=-1, keepdims=True)  # [B, 1]
        cutoff = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# Logical axes of the cache variables (Attention._cached), behind nn.scan's leading layer axis.
CACHE_AXES = {
    "k": ("layers", *BTKH),
    "v": ("layers", *BTKH),
    "segment_ids": ("layers", "batch", "length"),
    "index": ("layers",),
}


def init_cache(cfg: ModelConfig, batch: int, length: int, mesh=None):
    """A zero KV cache of `length` slots for `batch` rows (shapes from Llama.init, no compute).

    With a mesh, each array is created sharded like the activations it holds (CACHE_AXES
    through sharding.py's rules), and the decode steps keep it so.
    """
    model = Llama(cfg)
    tokens = jnp.zeros((batch, length), jnp.int32)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), tokens, tokens, decode=True)["cache"]
    )
    if mesh is None:
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    specs = jax.tree_util.tree_map_with_path(
        lambda path, s: PartitionSpec(*CACHE_AXES[path[-1].key]), shapes
    )
    shardings = logical_to_sharding(specs, mesh, shapes=shapes)
    return jax.tree.map(lambda s, sh: jnp.zeros(s.shape, s.dtype, device=sh), shapes, shardings)


@functools.lru_cache(maxsize=16)
def _compiled(cfg: ModelConfig, sampling: Sampling):
    model = Llama(cfg)

    def forward(params, cache, tokens, positions, segment_ids):
        logits, new = model.apply(
            {"params": params, "cache": cache},
            tokens,
            positions,
            segment_ids,
            decode=True,
            mutable=["cache"],
        )
        return logits[:, -1], new["cache"]  # [B, V]

    def prefill(params, cache, tokens, positions, segment_ids, rng):
        last, cache = forward(params, cache, tokens, positions, segment_ids)
        return sample_logits(last, rng, sampling), cache

    def step(params, cache, token, position, rng):
        ones = jnp.ones_like(token)[:, None]
        last, cache = forward(params, cache, token[:, None], position[:, None], ones)
        return sample_logits(last, rng, sampling), cache

    return jax.jit(prefill, donate_argnums=1), jax.jit(step, donate_argnums=1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, bucket: int = PAD_BUCKET):
    """-> tokens, positions, segment_ids, each [B, P] int32, with P a multiple of bucket."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    P = -(-max(len(p) for p in prompts) // bucket) * bucket
    tokens = np.full((len(prompts), P), pad_id, np.int32)
    segs = np.zeros((len(prompts), P), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, P - len(p) :] = p
        segs[b, P - len(p) :] = 1
    positions = np.maximum(np.cumsum(segs, axis=1) - 1, 0).astype(np.int32)
    return tokens, positions, segs


def generate(
    params,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    eos_id: int | None = None,
    pad_id: int = 0,
    on_token: Callable[[int, int], None] | None = None,
    stop: Callable[[int, list[int]], bool] | None = None,
    mesh=None,
) -> list[list[int]]:
    """Continues each prompt (token ids, BOS included if wanted) by up to max_new_tokens.

    Args:
      params: the raw params tree (e.g. from params_io.load_params).
      prompts: B token-id lists, of any lengths.
      eos_id: a row stops when it samples this id (which is not returned).
      on_token: called as on_token(row, token_id) for each new token, as soon as it is known.
      stop: stop(row, new_ids) -> True ends that row after its latest token (stop strings).
      mesh: with a jax Mesh, the model's logical constraints bind to it (sharding.py's rules),
        so the KV cache is sharded like the k/v activations (batch, kv heads).
    Returns:
      B lists of new token ids.
    """
    tokens, positions, segs = left_pad(prompts, pad_id)
    P = tokens.shape[1]
    if P + max_new_tokens > cfg.max_seq_len:  # RoPE runs on; the model was never trained there
        logging.getLogger(__name__).warning(
            "prompt + new tokens (%d) exceed max_seq_len %d", P + max_new_tokens, cfg.max_seq_len
        )
    prefill, step = _compiled(cfg, sampling)
    with model_context(mesh):
        cache = init_cache(cfg, tokens.shape[0], P + max_new_tokens, mesh)
        return _decode_loop(
            params,
            cache,
            (prefill, step),
            (tokens, positions, segs),
            max_new_tokens,
            seed,
            eos_id,
            on_token,
            stop,
        )


def _decode_loop(params, cache, fns, batch, max_new_tokens, seed, eos_id, on_token, stop):
    (prefill, step), (tokens, positions, segs) = fns, batch
    B = tokens.shape[0]
    rng = jax.random.PRNGKey(seed)
    token, cache = prefill(params, cache, tokens, positions, segs, jax.random.fold_in(rng, 0))
    position = jnp.asarray(positions[:, -1] + 1)
    out: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    for n in range(max_new_tokens):
        # dispatch the next step before reading this token back, so the device runs meanwhile
        if n + 1 < max_new_tokens:
            nxt, cache = step(params, cache, token, position, jax.random.fold_in(rng, n + 1))
            position = position + 1
        host = np.asarray(token)
        for b in np.flatnonzero(~done):
            t = int(host[b])
            if eos_id is not None and t == eos_id:
                done[b] = True
                continue
            out[b].append(t)
            if on_token is not None:
                on_token(int(b), t)
            if stop is not None and stop(int(b), out[b]):
                done[b] = True
        if done.all() or n + 1 == max_new_tokens:
            break
        token = nxt
    return out


def sample_texts(
    params,
    cfg: ModelConfig,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    sampling: Sampling = Sampling(temperature=0.8, top_k=40),
    seed: int = 0,
) -> list[str]:
    """Prompt + continuation texts, for a look at what a (small) model learned.

    Runs unsharded on each process: on several processes the params are gathered first.
    """
    from jax.experimental import multihost_utils

    room = cfg.max_seq_len - max(len(p) for p in prompts)
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    params = jax.device_get(params)
    out = generate(
        params,
        cfg,
        prompts,
        max(1, min(max_new_tokens, room)),
        sampling=sampling,
        seed=seed,
        eos_id=tokenizer.eos_id,
    )
    return [tokenizer.decode(list(p) + o) for p, o in zip(prompts, out)]  # whole: keeps spaces


def load(
    checkpoint: str,
    tokenizer_path: str,
    dtype: str | None = None,
    tensor: int = 1,
    report: Callable[[str], None] | None = None,
):
    """(params, ModelConfig, Tokenizer, mesh or None) of a params checkpoint (launch.export or
    launch.convert --to ours), its vocab checked against the tokenizer; with tensor > 1 the
    params are sharded over that many devices (heads, mlp and vocab: sharding.py's rules).
    Computes in the stored weights' dtype, or in dtype (params cast to it); reports which."""

    tokenizer = Tokenizer(tokenizer_path)
    check_vocab(tokenizer, load_config(checkpoint).vocab_size)
    mesh = None
    if tensor > 1:
        mesh = make_mesh(data=1, fsdp=1, tensor=tensor, devices=jax.devices()[:tensor])
    params, cfg, line = load_for_inference(checkpoint, dtype=dtype, mesh=mesh)
    (report or logging.getLogger(__name__).info)(f"{checkpoint}: {line}")
    return params, cfg, tokenizer, mesh
