"""LoRA adapters -> a Hugging Face PEFT adapter (adapter_config.json +
adapter_model.safetensors) that peft loads onto transformers' LlamaForCausalLM."""

from __future__ import annotations

import json
import os

import numpy as np

from llama_jax.adapters import lora
from llama_jax.weights.hf import meta_to_hf_rows

# LoRA target -> its Hugging Face module under model.layers.{i}
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "w1": "mlp.gate_proj", "w2": "mlp.down_proj",
              "w3": "mlp.up_proj"}  # fmt: skip


def write_peft(path: str, adapters, cfg, base: str = "") -> str:
    """A Hugging Face PEFT adapter that peft loads onto the transformers LlamaForCausalLM of the
    base: torch's lora_A [r, in] and lora_B [out, r], with q/k output rows in Hugging Face's
    RoPE order (as weights/hf.py writes wq and wk)."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    tensors = {}
    for t in lora.targets(cfg):
        module = lora.TARGETS[t][0]
        a = np.asarray(adapters["layers"][module][f"{t}_a"], np.float32)  # [L, in..., r]
        b = np.asarray(adapters["layers"][module][f"{t}_b"], np.float32)  # [L, r, out...]
        for layer in range(cfg.n_layers):
            lora_a = a[layer].reshape(-1, cfg.lora_rank).T  # [r, in]
            lora_b = b[layer].reshape(cfg.lora_rank, -1).T  # [out, r]
            if t in ("q", "k"):
                lora_b = meta_to_hf_rows(lora_b, cfg.n_heads if t == "q" else cfg.kv_heads)
            key = f"base_model.model.model.layers.{layer}.{HF_MODULES[t]}"
            tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(lora_a)
            tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(lora_b)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "target_modules": sorted(HF_MODULES[t].split(".")[1] for t in lora.targets(cfg)),
        "use_rslora": False,
        "use_dora": False,
    }
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return path
