"""The trainer's validation loss: the same held-out batches at every evaluation, one
ValidationLoss per source under data.mixture (offline evaluation is inference/evaluate.py)."""

from __future__ import annotations

import jax

from llama_jax.data.loader import Loader


class ValidationLoss:
    """The trainer's validation loss: mean over the same `batches` global batches of a
    prepared dataset's held-out split at every evaluation (comparable across evaluations and
    runs).

    Batches are split like training microbatches (grad_accum_steps), so evaluation never needs
    more activation memory than a training step.
    """

    def __init__(
        self,
        eval_fn,
        train,
        dataset_dir: str,
        sharding,
        tokenizer_sha: str,
        document_bos: int | None = None,
    ):

        self.eval_fn, self.n = eval_fn, train.eval_batches * train.grad_accum_steps
        self.loader = Loader(
            dataset_dir,
            "val",
            batch_size=train.microbatch_size,
            seq_len=train.seq_len,
            seed=train.data_order_seed + 1,
            sharding=sharding,
            prefetch=0,
            expected_tokenizer_sha=tokenizer_sha,
            document_bos=document_bos,
        )

    def __call__(self, params) -> float:
        total, tokens = 0.0, 0.0
        for i in range(self.n):
            m = jax.device_get(self.eval_fn(params, self.loader.batch(i)))
            total, tokens = total + float(m["loss_sum"]), tokens + float(m["tokens"])
        return total / max(tokens, 1.0)

    def close(self):
        self.loader.close()


class MixtureValidation:
    """data.mixture's validation loss: a ValidationLoss per source; the call returns their
    mixture-weighted mean and keeps each source's loss in .per_source."""

    def __init__(self, losses: dict, weights: dict[str, float]):
        self.losses, self.weights, self.per_source = losses, weights, {}

    def __call__(self, params) -> float:
        self.per_source = {name: v(params) for name, v in self.losses.items()}
        total = sum(self.weights[n] for n in self.per_source)
        return sum(self.weights[n] * v for n, v in self.per_source.items()) / total

    def close(self):
        for v in self.losses.values():
            v.close()
