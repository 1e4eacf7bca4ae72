"""Fine-tune the tiny model from weights: --config.train.init_from=hf:DIR | meta:DIR | ours:DIR.

With train.init_from the model's shape (and tokenizer) comes from the weights, whatever their
shape; tiny.py's shape below is what a run without weights builds. A shape field given on the
command line (e.g. --config.model.n_layers=4) must agree with the weights, or the run is
refused naming it. Fine-tuning recipes (Alpaca, LLaMA-I) use a small peak lr, a short warmup
and no weight decay.
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
