"""LLaMA-7B at 32,768 tokens a sequence: context parallelism over 8 devices per sequence.

On 64 devices (fsdp 8 x context 8): parameters and AdamW state sharded 8 ways over fsdp, each
sequence split 8 ways over context (zig-zag chunks; K/V blocks passed around the ring), 8
sequences (262,144 tokens) a step. `python -m launch.inspect --config configs/llama_7b_32k.py
--memory --devices 64` compiles this step on 64 simulated CPU devices (BENCHMARKS.md).
"""

from configs.llama_7b import get_config as llama_7b


def get_config():
    c = llama_7b()
    c.model.max_seq_len = 32768
    c.train.seq_len = 32768
    c.train.batch_size = 8  # one sequence per fsdp group; 262,144 tokens per step
    c.train.steps = 1000
    c.mesh.fsdp = 8
    c.mesh.context = 8
    c.mesh.context_strategy = "ring"  # no device holds the whole sequence's K/V
    return c
