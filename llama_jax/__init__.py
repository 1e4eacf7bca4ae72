"""llama_jax: LLaMA pre-training in JAX/Flax."""

__version__ = "0.1.0"
