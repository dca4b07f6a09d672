"""An empty (meta-device) copy of a checkpoint's model, from which nodes and clients materialise only their parts.

Building the whole `AutoModelForCausalLM` without weights costs no memory and gives us the
model's own modules (decoder layers, rotary embedding, norms, heads) for any architecture,
so hivegen never carries per-model copies of transformers' code. Nothing here assumes a
family's attribute names: the blocks are found as the decoder's one list of layers.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from hivegen.errors import UnsupportedModelError
from hivegen.model.checkpoint import ModelCheckpoint

# Names a decoder gives its list of blocks, preferred in this order when it has several lists of that length.
_LAYER_LIST_NAMES = ("layers", "h", "blocks", "block", "layer")
# accelerate's init_empty_weights patches nn.Module.register_parameter for the whole process:
# while one thread builds a skeleton, another thread's assigned weights would land on meta.
BUILD_LOCK = threading.RLock()


@dataclass
class ModelSkeleton:
    """The meta-device model, its decoder stack and where the blocks live inside it."""

    checkpoint: ModelCheckpoint
    config: PretrainedConfig  # the decoder (text) config the model was built with
    causal_lm: PreTrainedModel
    base: nn.Module  # the decoder stack that owns the blocks
    layers: nn.ModuleList  # the blocks, in order
    layers_name: str  # qualified name of `layers` inside `causal_lm`, e.g. "model.layers" or "transformer.h"
    dtype: torch.dtype

    @classmethod
    def build(
        cls, checkpoint: ModelCheckpoint, attn_implementation: str | None = None, dtype: torch.dtype = torch.float32
    ) -> ModelSkeleton:
        """The model of `checkpoint`, without weights, with parameters of `dtype` and the attention
        implementation asked for (None: transformers' default for the class, sdpa where it supports it)."""
        config = copy.deepcopy(checkpoint.text_config)
        model_type = getattr(config, "model_type", "?")
        try:
            with BUILD_LOCK, init_empty_weights(include_buffers=False):
                causal_lm = AutoModelForCausalLM.from_config(
                    config, attn_implementation=attn_implementation, dtype=dtype
                )
        except (ValueError, KeyError, ImportError) as exc:
            if attn_implementation is not None and "attn" in str(exc).lower():
                raise UnsupportedModelError(
                    f"{checkpoint.path}: model_type {model_type!r} cannot use attention implementation "
                    f"{attn_implementation!r}: {str(exc).splitlines()[0]}"
                ) from exc
            raise UnsupportedModelError(
                f"{checkpoint.path}: transformers cannot build a causal LM for model_type {model_type!r}: {exc}"
            ) from exc
        causal_lm.eval()
        layers_name, layers = _find_layers(causal_lm, int(causal_lm.config.num_hidden_layers), model_type)
        base = causal_lm.get_submodule(layers_name.rpartition(".")[0])
        return cls(checkpoint, causal_lm.config, causal_lm, base, layers, layers_name, dtype)

    @property
    def model_type(self) -> str:
        return str(getattr(self.config, "model_type", "?"))

    @property
    def attn_implementation(self) -> str:
        """The attention implementation transformers settled on for this model."""
        return str(self.config._attn_implementation)

    def layer(self, index: int) -> nn.Module:
        """Decoder block `index` (0-based, over the whole model)."""
        return self.layers[index]  # type: ignore[no-any-return]

    def layer_name(self, index: int) -> str:
        """The qualified name of block `index` inside the causal LM, as its parameters are named."""
        return f"{self.layers_name}.{index}"

    def block_parameters(self) -> list[int]:
        """Parameters of every decoder block, counted on the skeleton (no weight is loaded): the price of a block."""
        return [sum(p.numel() for p in self.layer(i).parameters()) for i in range(len(self.layers))]

    def rotary(self) -> nn.Module | None:
        """The decoder's rotary embedding module, where it computes one for all its blocks."""
        named = getattr(self.base, "rotary_emb", None)
        if isinstance(named, nn.Module):
            return named
        found = [m for _, m in self.base.named_children() if type(m).__name__.endswith("RotaryEmbedding")]
        return found[0] if len(found) == 1 else None


def _find_layers(model: nn.Module, num_blocks: int, model_type: str) -> tuple[str, nn.ModuleList]:
    """The qualified name and the list of the model's `num_blocks` blocks, whatever the architecture calls it."""
    lists = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_blocks
    }
    # A decoder may hold other per-layer lists (projections, norms): its blocks are the list named like blocks,
    # nearest the top of the model.
    preferred = {n: m for n, m in lists.items() if n.rpartition(".")[2] in _LAYER_LIST_NAMES} or lists
    if preferred:
        top = min(n.count(".") for n in preferred)
        preferred = {n: m for n, m in preferred.items() if n.count(".") == top}
    if len(preferred) != 1:
        found = ", ".join(f"{n} ({len(m)})" for n, m in model.named_modules() if isinstance(m, nn.ModuleList))
        raise UnsupportedModelError(
            f"model_type {model_type!r} has no single list of its {num_blocks} blocks "
            f"(lists: {found[:300] or 'none'}); hivegen serves decoders whose blocks are one stack of layers"
        )
    return next(iter(preferred.items()))
