"""LoRA fine-tuning of LLaMA-7B ("fine-tune 7B with LoRA on one GPU"): start from the released
weights with --config.train.init_from=hf:DIR (or meta:DIR); the shape comes from them.

Rank 16 on every linear layer of the blocks (about 40M trained parameters); the frozen base in
bfloat16 (13.5 GB); Alpaca's recipe otherwise: lr 2e-4 for LoRA, 3% warmup, no weight decay,
sequences of 512 tokens of instruction data (prepare_data --format instruction --seq-len 511).
"""

from configs.llama_7b import get_config as llama_7b


def get_config():
    c = llama_7b()
    c.model.lora_rank = 16
    c.model.lora_alpha = 32.0
    c.model.lora_targets = "q,k,v,o,w1,w2,w3"
    c.model.param_dtype = "bfloat16"  # the frozen base; adapters and their moments stay float32
    c.model.remat_policy = "save_linear"
    c.train.seq_len = 511
    c.train.batch_size = 64
    c.train.steps = 2_000
    c.train.lr = 2e-4
    c.train.warmup_steps = 60
    c.train.weight_decay = 0.0
    c.train.eval_every = 200
    c.checkpoint.every_steps = 200
    c.mesh.fsdp = -1
    c.data.mixture = ""  # instruction data instead: --config.data.path=DIR (--format instruction)
    return c
