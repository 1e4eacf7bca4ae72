"""python -m launch.convert --from {hf,meta,ours} --to {hf,meta,ours} --input PATH --output PATH
    [--dtype bfloat16] [--config.model.max_seq_len=4096 ...] [--shards N]

The model config is derived from the source's own config (config.json, params.json or
model_config.json); --config.model.FIELD=VALUE only sets fields the source does not hold (e.g.
max_seq_len for Meta's params.json, or the compute dtype), and shapes are still checked against
the weights. Each override is checked against the schema (configs/base.py).
"""

import argparse

from llama_jax import cli


def model_overrides(c: cli.Command) -> dict:
    """{"max_seq_len": 4096, ...}: the model fields given on the command line."""
    other = sorted(k for k in c.overrides if not k.startswith("model."))
    if other:
        raise ValueError(
            f"launch.convert takes model fields only (--config.model.FIELD=VALUE), got {other}"
        )
    return {k.removeprefix("model."): v for k, v in c.overrides.items()}


def execute(c: cli.Command):
    from llama_jax.weights.convert import convert

    a = c.args
    cfg = convert(
        a.src,
        a.dst,
        a.input,
        a.output,
        dtype=a.dtype,
        overrides=model_overrides(c),
        num_shards=a.shards,
    )
    print(
        f"wrote {a.dst} checkpoint to {a.output}: dim={cfg.dim} n_layers={cfg.n_layers} "
        f"n_heads={cfg.n_heads} n_kv_heads={cfg.kv_heads} vocab_size={cfg.vocab_size} "
        f"ffn={cfg.hidden_dim} param_dtype={cfg.param_dtype}"
    )


def parser() -> argparse.ArgumentParser:
    from llama_jax.weights.convert import FORMATS

    p = argparse.ArgumentParser(
        prog="python -m launch.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--from", dest="src", required=True, choices=FORMATS)
    p.add_argument("--to", dest="dst", required=True, choices=FORMATS)
    p.add_argument("--input", required=True, help="source directory")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: source's)")
    p.add_argument("--shards", type=int, default=1, help="model-parallel shards for --to meta")
    return p


def main(argv=None):
    cli.call(execute, parser(), argv, config="overrides")


if __name__ == "__main__":
    main()
