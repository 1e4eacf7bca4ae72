"""python -m launch.inspect --config configs/<name>.py [--config.x=y] [--json]

Parameter count, FLOPs per token and state bytes from abstract shapes: works for 65B on a laptop.
"""

import json

from absl import flags
from ml_collections import config_flags

from llama_jax import cli, stats
from llama_jax.config import ModelConfig

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file", lock_config=True)
_JSON = flags.DEFINE_bool("json", False, "print one JSON object")


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000:
            return f"{n:,.2f} {suffix}{unit}".strip()
        n /= 1000
    return f"{n:.2f} E{unit}"


def main(argv):
    del argv
    cfg = _CONFIG.value
    info = stats.summary(ModelConfig.from_config(cfg.model), cfg.train.seq_len)
    if _JSON.value:
        print(json.dumps(info))
        return
    print(f"parameters           {info['parameters']:,}")
    print(f"FLOPs/token (train)  {_human(info['flops_per_token'])} "
          f"(6N {_human(info['flops_per_token_6n'])} + causal attention "
          f"{_human(info['flops_per_token_attention'])} at seq {info['seq_len']})")
    for key in ("params", "adamw", "grads"):
        print(f"{key + ' bytes':<21}{_human(info[key + '_bytes'], 'B')}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    cli.run(main)
