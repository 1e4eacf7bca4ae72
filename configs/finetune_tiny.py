"""Fine-tune the tiny model from weights: --config.train.init_from=hf:DIR | meta:DIR | ours:DIR.

The model fields below are tiny.py's; weights of another shape are refused, naming the field
(override it on the command line to match them). Fine-tuning recipes (Alpaca, LLaMA-I) use a
small peak lr, a short warmup and no weight decay.
"""

from configs.tiny import get_config as tiny


def get_config():
    c = tiny()
    c.train.steps = 200
    c.train.lr = 3e-4
    c.train.warmup_steps = 10
    c.train.weight_decay = 0.0
    c.train.eval_every = 50
    c.train.samples = 0
    c.checkpoint.every_steps = 100
    return c
