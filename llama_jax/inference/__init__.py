"""Sampling with a KV cache, and offline evaluation (perplexity, bits per byte, multiple choice)."""
