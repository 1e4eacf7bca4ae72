"""LLaMA-7B as in Table 2 of the paper (6,738,415,616 parameters released)."""

from configs.base import base_config, llama_mixture, steps_for_tokens


def get_config():
    c = base_config()
    c.model.dim = 4096
    c.model.n_layers = 32
    c.model.n_heads = 32
    c.train.lr = 3e-4  # peak learning rate from Table 2
    c.train.batch_size = 2048  # 4M tokens per step at seq_len 2048
    c.train.steps = steps_for_tokens(c, 1.0e12)  # 1.0T tokens, as the paper trained
    c.data.mixture = llama_mixture()  # Table 1; placeholder paths (README: Data)
    return c
