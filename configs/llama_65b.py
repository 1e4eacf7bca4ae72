"""LLaMA-65B as in Table 2 of the paper (65,285,660,672 parameters released)."""

from configs.base import base_config, llama_mixture, steps_for_tokens


def get_config():
    c = base_config()
    c.model.dim = 8192
    c.model.n_layers = 80
    c.model.n_heads = 64
    c.train.lr = 1.5e-4  # peak learning rate from Table 2
    c.train.batch_size = 2048  # 4M tokens per step at seq_len 2048
    c.train.steps = steps_for_tokens(c, 1.4e12)  # 1.4T tokens, as the paper trained
    c.data.mixture = llama_mixture()  # Table 1; placeholder paths (README: Data)
    return c
