"""Wrappers that change what a model trains without editing it (LoRA)."""
