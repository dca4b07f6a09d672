"""Tiny random checkpoints of real architectures, for tests and benchmarks (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

# Small but structurally faithful: grouped-query attention, several heads, and for the
# sliding-window architectures a window shorter than the prompts the tests use.
_COMMON: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "tie_word_embeddings": False,
}

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama"},
    "mistral": {"model_type": "mistral", "sliding_window": 6},
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": True},
    "qwen3": {"model_type": "qwen3", "head_dim": 16},
    "gemma3": {
        "model_type": "gemma3_text",
        "head_dim": 16,
        "sliding_window": 6,
        "layer_types": None,  # filled per layer count: sliding, sliding, full, ...
        "query_pre_attn_scalar": 16,
        "final_logit_softcapping": 30.0,
    },
}


def make_tiny_checkpoint(arch: str, path: str | Path, num_layers: int = 6, seed: int = 0, **overrides: Any) -> Path:
    """Write a random `arch` checkpoint with `num_layers` blocks to `path` (safetensors + config).

    `overrides` replace config values, e.g. hidden_size=1024, intermediate_size=4096 for blocks heavy
    enough that their work is worth whole credits.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    kwargs = {**_COMMON, **ARCHITECTURES[arch], "num_hidden_layers": num_layers, **overrides}
    model_type = kwargs.pop("model_type")
    if "layer_types" in kwargs:
        kwargs["layer_types"] = ["full_attention" if i % 3 == 2 else "sliding_attention" for i in range(num_layers)]
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves some norms at exactly 1/0; perturb every weight so a misplaced
    # tensor cannot go unnoticed in an exactness test.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    out = Path(path)
    model.save_pretrained(out)
    return out
