"""python -m launch.convert --from {hf,meta,ours} --to {hf,meta,ours} --input PATH --output PATH
    [--dtype bfloat16] [--config max_seq_len=4096 ...] [--shards N]

The model config is derived from the source's own config (config.json, params.json or
model_config.json); --config only sets fields the source does not hold (e.g. max_seq_len for
Meta's params.json, or the compute dtype), and shapes are still checked against the weights.
"""

import argparse
import dataclasses

from llama_jax import cli
from llama_jax.config import ModelConfig


def parse_overrides(items) -> dict:
    """["max_seq_len=4096", "dtype=float32"] -> typed ModelConfig fields; unknown is an error."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    out = {}
    for item in items:
        key, sep, value = item.lstrip("-").removeprefix("model.").partition("=")
        if not sep:
            raise ValueError(f"--config {item!r}: expected field=value")
        if key not in fields:
            raise KeyError(f"unknown model config field {key!r}; valid: {sorted(fields)}")
        out[key] = type(fields[key].default)(value)  # every field is a str, int or float
    return out


def main(argv=None):
    from llama_jax.convert import FORMATS, convert

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
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="set a ModelConfig field the source does not hold; repeatable",
    )
    p.add_argument("--shards", type=int, default=1, help="model-parallel shards for --to meta")
    a = p.parse_args(argv)
    try:
        cfg = convert(
            a.src,
            a.dst,
            a.input,
            a.output,
            dtype=a.dtype,
            overrides=parse_overrides(a.config),
            num_shards=a.shards,
        )
    except cli.USER_ERRORS as e:
        cli.fail(e)
    print(
        f"wrote {a.dst} checkpoint to {a.output}: dim={cfg.dim} n_layers={cfg.n_layers} "
        f"n_heads={cfg.n_heads} n_kv_heads={cfg.n_kv_heads} vocab_size={cfg.vocab_size} "
        f"ffn={cfg.hidden_dim} param_dtype={cfg.param_dtype}"
    )


if __name__ == "__main__":
    main()
