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
_TOP2: dict[str, Any] = {"num_experts_per_tok": 2}

ARCHITECTURES: list[TinyArchitecture] = [
    _arch("llama", "Llama 2/3, SmolLM2", "grouped-query attention, RoPE, RMSNorm"),
    _arch("mistral", "Mistral 7B", "a sliding window (6 tokens) on every layer", sliding_window=6),
    _arch("qwen2", "Qwen2, Qwen2.5", "q/k/v biases, tied embeddings", tie_word_embeddings=True),
    _arch("qwen3", "Qwen3", "q/k norms, a head size apart from the hidden size", head_dim=16),
    _arch("gemma", "Gemma", "scaled embeddings, tied embeddings", head_dim=16, tie_word_embeddings=True),
    _arch(
        "gemma2",
        "Gemma 2",
        "eager attention (no SDPA), attention and final logit soft-capping, sliding and full layers",
        _SWA,
        head_dim=16,
        sliding_window=6,
        query_pre_attn_scalar=16,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
    ),
    _arch(
        "gemma3",
        "Gemma 3",
        "sliding and full layers with their own RoPE, scaled embeddings, final logit soft-capping",
        _SWA,
        model_type="gemma3_text",
        head_dim=16,
        sliding_window=6,
        query_pre_attn_scalar=16,
        final_logit_softcapping=30.0,
    ),
    _arch(
        "phi",
        "Phi-1, Phi-2",
        "partial rotary, parallel attention and MLP, `final_layernorm`",
        partial_rotary_factor=0.5,
    ),
    _arch("phi3", "Phi-3, Phi-4", "fused qkv and gate/up projections, a sliding window", sliding_window=6),
    _arch("starcoder2", "StarCoder2", "LayerNorm with biases, a sliding window", sliding_window=6, use_bias=True),
    _arch(
        "cohere",
        "Command R",
        "parallel blocks, q/k norms, logit scaling, tied embeddings",
        logit_scale=0.5,
        use_qk_norm=True,
        tie_word_embeddings=True,
    ),
    _arch(
        "granite",
        "Granite 3",
        "embedding, residual and attention multipliers, logit scaling",
        embedding_multiplier=3.0,
        logits_scaling=4.0,
        residual_multiplier=0.5,
        attention_multiplier=0.2,
    ),
    _arch(
        "nemotron", "Nemotron", "LayerNorm1P, partial rotary, squared-ReLU MLP", partial_rotary_factor=0.5, head_dim=16
    ),
    _arch("smollm3", "SmolLM3", "layers without RoPE (NoPE) among rotary ones", no_rope_layers=[1, 1, 0, 1]),
    _arch(
        "gpt_neox",
        "Pythia, GPT-NeoX",
        "`layer_past`, `embed_in`/`final_layer_norm` names, partial rotary, parallel residual",
        rotary_pct=0.5,
        use_parallel_residual=True,
    ),
    _arch("gpt2", "GPT-2", "learned absolute positions, `h`/`ln_f` names, fused qkv (Conv1D)"),
    _arch(
        "opt",
        "OPT",
        "learned positions with an offset, `decoder.final_layer_norm`, embedding projections in and out",
        ffn_dim=128,
        word_embed_proj_dim=32,
    ),
    _arch(
        "falcon",
        "Falcon",
        "a block input (`alibi`) it does not use, `h`/`ln_f`, new decoder architecture, biases",
        new_decoder_architecture=True,
        num_kv_heads=2,
        bias=True,
    ),
    _arch("gptj", "GPT-J", "eager attention, rotary inside attention, blocks returning tuples", rotary_dim=8),
    _arch("gpt_bigcode", "StarCoder (1), SantaCoder", "multi-query attention", multi_query=True),
    _arch("xglm", "XGLM", "sinusoidal positions outside the blocks, eager attention", ffn_dim=128),
    _arch(
        "mixtral",
        "Mixtral",
        "mixture of experts (4 experts, top 2) fused on load, a sliding window",
        num_local_experts=4,
        sliding_window=6,
        **_TOP2,
    ),
    _arch(
        "qwen2_moe",
        "Qwen1.5-MoE, Qwen2-MoE",
        "mixture of experts (4, top 2) with a gated shared expert",
        num_experts=4,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        **_TOP2,
    ),
    _arch(
        "qwen3_moe",
        "Qwen3-MoE",
        "mixture of experts (4, top 2), a dense first layer",
        num_experts=4,
        moe_intermediate_size=32,
        head_dim=16,
        mlp_only_layers=[0],
        **_TOP2,
    ),
    _arch(
        "deepseek_v3",
        "DeepSeek-V3, R1, Kimi K2",
        "multi-head latent attention, mixture of experts (4, top 2, grouped routing) with a shared expert after "
        "a dense layer",
        n_routed_experts=4,
        n_shared_experts=1,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        head_dim=8,
        n_group=2,
        topk_group=1,
        num_key_value_heads=4,
        **_TOP2,
    ),
    _arch("olmoe", "OLMoE", "mixture of experts (4, top 2), q/k norms", num_experts=4, **_TOP2),
    _arch("phimoe", "Phi-3.5-MoE", "mixture of experts (4, top 2), sparse-mixer routing", num_local_experts=4, **_TOP2),
    _arch(
        "glm4_moe",
        "GLM-4.5",
        "mixture of experts (4, top 2) with a shared expert after a dense layer, q/k norms",
        n_routed_experts=4,
        n_shared_experts=1,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        head_dim=16,
        use_qk_norm=True,
        **_TOP2,
    ),
    _arch(
        "gpt_oss",
        "gpt-oss",
        "mixture of experts (4, top 2), attention sinks, eager attention, sliding and full layers",
        _SWA,
        num_local_experts=4,
        head_dim=16,
        sliding_window=6,
        max_position_embeddings=131072,  # what its YaRN scaling was made for
        **_TOP2,
    ),
    _arch(
        "llama4",
        "Llama 4",
        "chunked attention, layers without RoPE, mixture of experts (4, top 1) every other layer",
        model_type="llama4_text",
        num_local_experts=4,
        num_experts_per_tok=1,
        head_dim=16,
        interleave_moe_layer_step=2,
        intermediate_size_mlp=128,
        attention_chunk_size=4,
        no_rope_layers=[1, 1, 1, 0],
    ),
]

# Exact through the nodes' and the client's code over 3 spans in one process, without the wire
# (tests/test_model_support.py): cheaper than a cluster each, for the families that add no new wiring.
IN_PROCESS: list[TinyArchitecture] = [
    _arch("stablelm", "StableLM 2", "partial rotary, qkv biases", partial_rotary_factor=0.25, use_qkv_bias=True),
    _arch("olmo2", "OLMo 2", "norms after attention and MLP, q/k norms"),
    _arch("exaone4", "EXAONE 4", "sliding and full layers, norms after attention", _SWA, sliding_window=6, head_dim=16),
    _arch("biogpt", "BioGPT", "scaled embeddings and learned positions", scale_embedding=True),
    _arch(
        "granitemoe",
        "Granite 3 MoE",
        "mixture of experts (4, top 2) with Granite's multipliers",
        num_local_experts=4,
        embedding_multiplier=3.0,
        logits_scaling=4.0,
        **_TOP2,
    ),
    _arch("olmo", "OLMo", "non-parametric LayerNorm, clipped qkv", clip_qkv=8.0),
    _arch("olmo3", "OLMo 3", "sliding and full layers, norms after attention", _SWA, sliding_window=6),
    _arch(
        "cohere2",
        "Command R7B, Command A",
        "sliding and full layers, logit scaling",
        _SWA,
        sliding_window=6,
        logit_scale=0.5,
        tie_word_embeddings=True,
    ),
    _arch(
        "glm4",
        "GLM-4",
        "partial rotary, norms after attention and MLP, qkv biases",
        head_dim=16,
        partial_rotary_factor=0.5,
        attention_bias=True,
    ),
    _arch(
        "persimmon",
        "Persimmon, Fuyu's decoder",
        "q/k LayerNorm, partial rotary",
        qk_layernorm=True,
        partial_rotary_factor=0.5,
    ),
    _arch(
        "codegen",
        "CodeGen",
        "eager attention, rotary inside attention, blocks returning tuples",
        rotary_dim=8,
        n_ctx=256,
    ),
    _arch("gpt_neox_japanese", "GPT-NeoX-Japanese", "eager attention, `layer_past`, partial rotary"),
    _arch("helium", "Helium", "a head size apart from the hidden size", head_dim=16),
    _arch("seed_oss", "Seed-OSS", "attention biases", head_dim=16, attention_bias=True),
    _arch("diffllama", "DiffLlama", "differential attention"),
    _arch("bitnet", "BitNet b1.58", "ternary-weight linear layers with sub-norms"),
    _arch(
        "vaultgemma",
        "VaultGemma",
        "eager attention, sliding and full layers, soft-capping",
        _SWA,
        head_dim=16,
        sliding_window=6,
        query_pre_attn_scalar=16,
        final_logit_softcapping=30.0,
    ),
    _arch(
        "deepseek_v2",
        "DeepSeek-V2",
        "multi-head latent attention, mixture of experts (4, top 2, group-limited)",
        n_routed_experts=4,
        n_shared_experts=1,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        head_dim=8,
        n_group=2,
        topk_group=1,
        topk_method="group_limited_greedy",
        num_key_value_heads=4,
        **_TOP2,
    ),
    _arch(
        "jetmoe",
        "JetMoE",
        "mixture of experts in attention and MLP (4, top 2)",
        num_local_experts=4,
        kv_channels=16,
        num_key_value_heads=4,
        **_TOP2,
    ),
    _arch("minimax_m2", "MiniMax-M2", "mixture of experts (4, top 2)", num_local_experts=4, head_dim=16, **_TOP2),
    _arch(
        "ernie4_5_moe",
        "ERNIE 4.5 MoE",
        "mixture of experts (4, top 2) after a dense layer",
        moe_num_experts=4,
        moe_k=2,
        moe_intermediate_size=32,
        head_dim=16,
        moe_layer_start_index=1,
    ),
]


def tiny_config(arch: str | TinyArchitecture | RefusedArchitecture, num_layers: int = 6, **overrides: Any) -> Any:
    """The tiny transformers config of `arch` with `num_layers` blocks."""
    by_name: dict[str, TinyArchitecture | RefusedArchitecture] = {a.name: a for a in [*ARCHITECTURES, *IN_PROCESS]}
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
        {"vocab_size_per_layer_input": 256, "hidden_size_per_layer_input": 16, "head_dim": 16},
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
    RefusedArchitecture(
        "trocr",
        "TrOCR's decoder",
        "its forward counts positions in its own cache, not from position ids",
        "position_ids",
    ),
    RefusedArchitecture("openai-gpt", "GPT (2018)", "its blocks take no KV cache", "take no cache"),
    RefusedArchitecture(
        "bert", "BERT, RoBERTa as LM heads", "bidirectional attention: an encoder, not a causal decoder", "both ways"
    ),
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
        f"{len(IN_PROCESS)} more ({sum(arch.moe for arch in IN_PROCESS)} mixtures of experts) are tested token for "
        "token through the same node and client code over 3 spans in one process, without the wire:",
        "",
        "| `model_type` | models | what its test exercises |",
        "|---|---|---|",
        *(f"| `{arch.type}` | {arch.family} | {arch.exercises} |" for arch in IN_PROCESS),
        "",
        "Refused, in one line naming the model type and the reason, by `hivegen models check` and by a node "
        "before it reads a weight:",
        "",
        *(f"- `{arch.type}` ({arch.family}): {arch.because}" for arch in REFUSED),
        README_END,
    ]
    return "\n".join(lines)
