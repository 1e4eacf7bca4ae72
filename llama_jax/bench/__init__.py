"""Benchmark sections; launch.benchmark runs them. One file per section, sharing common.py.

Each section module exposes `measure(args) -> list[dict]` (one dict per table row) and
`add_args(parser)`; SECTIONS maps the CLI name to the module path.
"""

SECTIONS = {
    "attention": "llama_jax.bench.attention",
    "step": "llama_jax.bench.step",
    "data": "llama_jax.bench.data",
    "compile": "llama_jax.bench.compile",
    "peers": "llama_jax.bench.peers",
    "parallel": "llama_jax.bench.parallel",
}
