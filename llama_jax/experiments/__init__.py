"""Experiments built on the trainer: architecture ablation sweeps."""
