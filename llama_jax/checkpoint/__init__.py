"""Orbax checkpoints of training state: the manager, resume checks, export of params."""
