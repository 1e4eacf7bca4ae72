"""The training loop and its services: setup, stop signals and profiler, metrics, validation."""
