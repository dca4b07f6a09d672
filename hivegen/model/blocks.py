"""How hivegen calls a model's decoder blocks, and the check that its blocks need nothing more.

A node runs its blocks the way the model's own forward does: for each kind of attention a mask
from transformers' masking utilities, the decoder's rotary embedding, the session's cache. Blocks
that need inputs computed elsewhere in the model (per-layer embeddings, state handed from layer
to layer, ALiBi biases) and layers that are not attention (state-space, linear attention,
convolutions) are refused before any weight is read, with the reason.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.masking_utils import (
    create_causal_mask,
    create_chunked_causal_mask,
    create_sliding_window_causal_mask,
)

from hivegen.errors import UnsupportedModelError

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
CHUNKED_ATTENTION = "chunked_attention"
MASKS: dict[str, Callable[..., Any]] = {
    FULL_ATTENTION: create_causal_mask,
    SLIDING_ATTENTION: create_sliding_window_causal_mask,
    CHUNKED_ATTENTION: create_chunked_causal_mask,
}
SUPPORTED_LAYER_TYPES = tuple(MASKS)
CACHE_ARGS = ("past_key_values", "layer_past")
# Block inputs hivegen computes the way the models' forwards do.
SUPPLIED_ARGS = frozenset({"attention_mask", "position_ids", "position_embeddings", "use_cache", "cache_position"})
# Block inputs a decoder-only forward leaves at their defaults (cross-attention, debugging outputs).
DEFAULTED_ARGS = frozenset(
    {
        "output_attentions",
        "output_router_logits",
        "encoder_hidden_states",
        "encoder_attention_mask",
        "head_mask",
        "layer_head_mask",
        "cross_attn_layer_head_mask",
    }
)


def resolve_layer_types(config: PretrainedConfig) -> list[str]:
    """The attention type of every layer, the way the model's own forward chooses its masks."""
    n = int(config.num_hidden_layers)
    types = getattr(config, "layer_types", None)
    if types is None:
        # Mistral / Phi-3 style: one sliding window for every layer when the config sets one.
        kind = SLIDING_ATTENTION if getattr(config, "sliding_window", None) is not None else FULL_ATTENTION
        types = [kind] * n
    types = list(types)[:n]
    unknown = sorted(set(types) - set(SUPPORTED_LAYER_TYPES))
    if unknown:
        raise UnsupportedModelError(
            f"model_type {getattr(config, 'model_type', '?')!r} has {', '.join(unknown)} layers; hivegen serves "
            f"layers of {', '.join(SUPPORTED_LAYER_TYPES)} (a node would have to keep those layers' other state)"
        )
    return types


@dataclass(frozen=True)
class BlockCall:
    """Which inputs one class of block takes, and under which names."""

    cache_arg: str  # "past_key_values" or "layer_past"
    passed: frozenset[str]  # the supplied inputs it takes
    alibi: bool  # it takes an `alibi` argument, to be given None (the model does not use ALiBi)

    @classmethod
    def of(cls, layer: nn.Module, config: PretrainedConfig) -> BlockCall:
        """How to call `layer`; UnsupportedModelError if it needs an input only its model's forward can make."""
        model_type = getattr(config, "model_type", "?")
        if any(getattr(module, "is_causal", None) is False for module in layer.modules()):
            raise UnsupportedModelError(
                f"model_type {model_type!r}: its blocks attend both ways (an encoder; `is_decoder` is off); "
                "hivegen serves causal decoders"
            )
        params = list(inspect.signature(layer.forward).parameters.values())[1:]  # after the hidden states
        names = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        var_kwargs = any(p.kind == p.VAR_KEYWORD for p in params)
        alibi = "alibi" in names
        if alibi and getattr(config, "alibi", True):
            raise UnsupportedModelError(
                f"model_type {model_type!r}: its blocks take ALiBi biases made outside them; hivegen cannot serve them"
            )
        foreign = sorted(names - SUPPLIED_ARGS - DEFAULTED_ARGS - set(CACHE_ARGS) - {"alibi"})
        if foreign:
            raise UnsupportedModelError(
                f"model_type {model_type!r}: its blocks ({type(layer).__name__}) take "
                f"{', '.join(f'`{n}`' for n in foreign)}, made outside the blocks; hivegen cannot serve them"
            )
        cache_arg = next((n for n in CACHE_ARGS if n in names), None)
        if cache_arg is None:
            raise UnsupportedModelError(
                f"model_type {model_type!r}: its blocks ({type(layer).__name__}) take no cache, so a node could not "
                "keep a session's past; hivegen serves blocks that take `past_key_values`"
            )
        passed = SUPPLIED_ARGS & names
        if var_kwargs:  # the models' forwards hand these to every block, through **kwargs where not named
            passed |= {"position_ids", "use_cache"}
        return cls(cache_arg, frozenset(passed), alibi)

    def kwargs(
        self,
        mask: Any,
        position_ids: torch.Tensor,
        cache: Any,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        cache_position: torch.Tensor,
    ) -> dict[str, Any]:
        given: dict[str, Any] = {
            "attention_mask": mask,
            "position_ids": position_ids,
            "use_cache": True,
            "cache_position": cache_position,
        }
        if position_embeddings is not None:
            given["position_embeddings"] = position_embeddings
        out = {name: value for name, value in given.items() if name in self.passed}
        out[self.cache_arg] = cache
        if self.alibi:
            out["alibi"] = None
        return out


def check_positions(causal_lm: nn.Module, config: PretrainedConfig) -> None:
    """A client runs the model's forward one step at a time with no cache of its own, handing it each token's
    position; a forward that takes no `position_ids` would count positions from its (empty) cache instead."""
    if "position_ids" not in inspect.signature(causal_lm.forward).parameters:
        raise UnsupportedModelError(
            f"model_type {getattr(config, 'model_type', '?')!r}: its forward takes no `position_ids` (it counts "
            "positions in its own cache), so a client cannot run it with its blocks elsewhere"
        )


def block_calls(layers: list[nn.Module], config: PretrainedConfig) -> list[BlockCall]:
    """The call of every block in `layers` (checked once per class of block)."""
    by_class: dict[type, BlockCall] = {}
    for layer in layers:
        if type(layer) not in by_class:
            by_class[type(layer)] = BlockCall.of(layer, config)
    return [by_class[type(layer)] for layer in layers]
