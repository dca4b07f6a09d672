"""Tiny random checkpoints of real architectures, for tests and benchmarks (nothing is downloaded).

`ARCHITECTURES` is the list the exactness matrix runs (tests/test_architectures.py) and the
README's table of supported architectures is generated from (scripts/architectures.py): each
entry is the tiniest configuration that still exercises what its family does differently.
`REFUSED` lists architectures hivegen turns away, each with the reason it gives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

# Small but structurally faithful: grouped-query attention, several heads, untied embeddings unless an entry
# ties them. Sliding windows are shorter than the prompts the tests use.
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
DROP = "<drop>"  # an override that removes a common key the config does not take


@dataclass(frozen=True)
class TinyArchitecture:
    """One architecture of transformers' registry, configured tiny."""

    name: str  # the key tests use; the model_type unless one type is tried twice
    family: str  # models people know it by
    exercises: str  # what this configuration exercises beyond a plain Llama-like stack
    config: dict[str, Any] = field(default_factory=dict)  # overrides of the common tiny config
    layer_pattern: tuple[str, ...] = ()  # layer_types, repeated to the number of layers
    model_type: str = ""  # default: `name`

    @property
    def type(self) -> str:
        return self.model_type or self.name

    @property
    def moe(self) -> bool:
        return "experts" in self.exercises


def _arch(
    name: str, family: str, exercises: str, pattern: tuple[str, ...] = (), model_type: str = "", **config: Any
) -> TinyArchitecture:
    return TinyArchitecture(name, family, exercises, config, pattern, model_type)


_SWA = ("sliding_attention", "sliding_attention", "full_attention")

ARCHITECTURES: list[TinyArchitecture] = [
    _arch("llama", "Llama 2/3, SmolLM2", "grouped-query attention, RoPE, RMSNorm"),
    _arch("mistral", "Mistral 7B", "a sliding window (6) on every layer", sliding_window=6),
    _arch("qwen2", "Qwen2, Qwen2.5", "q/k/v biases, tied embeddings", tie_word_embeddings=True),
    _arch("qwen3", "Qwen3", "q/k norms, head_dim apart from hidden size", head_dim=16),
    _arch(
        "gemma3",
        "Gemma 3",
        "sliding and full layers with their own RoPE, scaled embeddings, logit soft-capping",
        _SWA,
        model_type="gemma3_text",
        head_dim=16,
        sliding_window=6,
        query_pre_attn_scalar=16,
        final_logit_softcapping=30.0,
    ),
    _arch("gpt2", "GPT-2", "learned absolute positions, `h`/`ln_f` names, fused qkv (Conv1D)"),
    _arch(
        "mixtral",
        "Mixtral",
        "mixture of experts (4 experts, top 2), fused on load",
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
]


def tiny_config(arch: str | TinyArchitecture | RefusedArchitecture, num_layers: int = 6, **overrides: Any) -> Any:
    """The tiny transformers config of `arch` with `num_layers` blocks."""
    by_name: dict[str, TinyArchitecture | RefusedArchitecture] = {a.name: a for a in ARCHITECTURES}
    by_name.update({a.name: a for a in REFUSED})
    entry = arch if isinstance(arch, TinyArchitecture | RefusedArchitecture) else by_name.get(arch)
    if entry is None:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {sorted(by_name)}")
    kwargs = {**_COMMON, **entry.config, "num_hidden_layers": num_layers, **overrides}
    if entry.layer_pattern:
        kwargs["layer_types"] = [entry.layer_pattern[i % len(entry.layer_pattern)] for i in range(num_layers)]
    return AutoConfig.for_model(entry.type, **{k: v for k, v in kwargs.items() if v is not DROP})


def make_tiny_checkpoint(
    arch: str | TinyArchitecture | RefusedArchitecture,
    path: str | Path,
    num_layers: int = 6,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Write a random `arch` checkpoint with `num_layers` blocks to `path` (safetensors + config), in the layout
    `save_pretrained` writes on disk (experts unfused, original key names).

    `overrides` replace config values, e.g. hidden_size=1024, intermediate_size=4096 for blocks heavy
    enough that their work is worth whole credits.
    """
    config = tiny_config(arch, num_layers, **overrides)
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


@dataclass(frozen=True)
class RefusedArchitecture:
    """An architecture hivegen turns away before reading a weight, and why."""

    name: str  # the model_type
    family: str
    because: str  # the reason, for the README
    says: str  # text the refusal contains (tests check it)
    config: dict[str, Any] = field(default_factory=dict)
    layer_pattern: tuple[str, ...] = ()

    @property
    def type(self) -> str:
        return self.name


REFUSED: list[RefusedArchitecture] = [
    RefusedArchitecture("bloom", "BLOOM", "its blocks take ALiBi biases computed outside them", "ALiBi"),
    RefusedArchitecture("mpt", "MPT", "its blocks take a position bias computed outside them", "`position_bias`"),
    RefusedArchitecture(
        "gemma4_text",
        "Gemma 4",
        "its blocks take per-layer inputs and key/value states shared between layers",
        "`per_layer_input`",
    ),
    RefusedArchitecture(
        "mamba", "Mamba", "state-space layers keep a recurrent state, not a KV cache", "linear_attention"
    ),
    RefusedArchitecture(
        "qwen3_next",
        "Qwen3-Next",
        "linear-attention layers beside full attention",
        "linear_attention",
        {"head_dim": 16},
    ),
    RefusedArchitecture("jamba", "Jamba", "Mamba layers beside attention", "linear_attention"),
    RefusedArchitecture("falcon_h1", "Falcon-H1", "attention and Mamba heads in every layer", "hybrid"),
    RefusedArchitecture("recurrent_gemma", "RecurrentGemma", "recurrent (RG-LRU) layers", "linear_attention"),
]

README_BEGIN = "<!-- architectures: generated by scripts/architectures.py from hivegen/model/tiny.py -->"
README_END = "<!-- end of architectures -->"


def readme_section() -> str:
    """The README's list of what runs and what is refused, from the lists the tests run."""
    moe = sum(arch.moe for arch in ARCHITECTURES)
    lines = [
        README_BEGIN,
        f"{len(ARCHITECTURES)} architectures ({moe} of them mixtures of experts) are tested over a 3-node chain, "
        "token for token against `transformers`:",
        "",
        "| `model_type` | models | what its test exercises |",
        "|---|---|---|",
        *(f"| `{arch.type}` | {arch.family} | {arch.exercises} |" for arch in ARCHITECTURES),
        "",
        "Refused, in one line naming the model type and the reason, by `hivegen models check` and by a node "
        "before it reads a weight:",
        "",
        *(f"- `{arch.type}` ({arch.family}): {arch.because}" for arch in REFUSED),
        README_END,
    ]
    return "\n".join(lines)
