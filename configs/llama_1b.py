"""A ~1.1B LLaMA that trains on one 80 GB GPU: the benchmark model (TinyLlama-like shape)."""

from configs.base import base_config


def get_config():
    c = base_config()
    c.model.dim = 2048
    c.model.n_layers = 22
    c.model.n_heads = 32  # head dim 64
    c.model.n_kv_heads = 4  # grouped-query attention, as TinyLlama (1.10B parameters)
    c.model.multiple_of = 256  # SwiGLU hidden 5632
    c.train.batch_size = 16  # sequences per step on one GPU
    c.train.seq_len = 2048
    c.train.lr = 3e-4
    c.mesh.fsdp = -1
    return c
