"""An empty (meta-device) copy of a checkpoint's model, from which nodes and clients materialise only their parts.

Building the whole `AutoModelForCausalLM` without weights costs no memory and gives us the
model's own modules (decoder layers, rotary embedding, norms, heads) for any architecture,
so hivegen never carries per-model copies of transformers' code.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from hivegen.errors import UnsupportedModelError
from hivegen.model.checkpoint import ModelCheckpoint

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
SUPPORTED_LAYER_TYPES = (FULL_ATTENTION, SLIDING_ATTENTION)
DEFAULT_ATTN_IMPLEMENTATION = "sdpa"
# accelerate's init_empty_weights patches nn.Module.register_parameter for the whole process:
# while one thread builds a skeleton, another thread's assigned weights would land on meta.
_BUILD_LOCK = threading.RLock()


@dataclass
class ModelSkeleton:
    """The meta-device model plus the names of its parts inside the checkpoint."""

    checkpoint: ModelCheckpoint
    config: PretrainedConfig  # the decoder (text) config the layers were built with
    causal_lm: PreTrainedModel
    base: nn.Module  # the decoder stack: has .layers, .norm, .rotary_emb
    layer_types: list[str]
    module_names: dict[int, str]  # id(module) -> qualified name, for mapping to checkpoint keys

    @classmethod
    def build(
        cls, checkpoint: ModelCheckpoint, attn_implementation: str = DEFAULT_ATTN_IMPLEMENTATION
    ) -> ModelSkeleton:
        config = checkpoint.text_config
        # Bare layers use eager attention without a causal mask unless this is set explicitly.
        config._attn_implementation = attn_implementation
        try:
            with _BUILD_LOCK, init_empty_weights(include_buffers=False):
                causal_lm = AutoModelForCausalLM.from_config(config)
        except (ValueError, KeyError) as exc:
            raise UnsupportedModelError(
                f"{checkpoint.path}: transformers cannot build a causal LM for model_type "
                f"{getattr(config, 'model_type', '?')!r}: {exc}"
            ) from exc
        causal_lm.eval()
        base = causal_lm.get_decoder()
        for attr in ("layers", "norm", "rotary_emb"):
            if not hasattr(base, attr):
                raise UnsupportedModelError(
                    f"{type(base).__name__} has no `{attr}`: hivegen drives decoder stacks with "
                    "`layers`, `norm` and `rotary_emb` (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, ...)"
                )
        layer_types = resolve_layer_types(config)
        names = {id(module): name for name, module in causal_lm.named_modules()}
        return cls(checkpoint, config, causal_lm, base, layer_types, names)

    @property
    def norm(self) -> nn.Module:
        """The final norm of the decoder stack."""
        return self.base.get_submodule("norm")

    @property
    def rotary_emb(self) -> nn.Module:
        """The decoder stack's rotary embedding module."""
        return self.base.get_submodule("rotary_emb")

    def layer(self, index: int) -> nn.Module:
        """Decoder block `index` (0-based, over the whole model)."""
        return self.base.get_submodule(f"layers.{index}")

    def block_parameters(self) -> list[int]:
        """Parameters of every decoder block, counted on the skeleton (no weight is loaded): the price of a block."""
        return [sum(p.numel() for p in self.layer(i).parameters()) for i in range(self.checkpoint.num_blocks)]

    def param_names(self, module: nn.Module) -> dict[str, str]:
        """Map each parameter of `module` (local name) to its full checkpoint key."""
        prefix = self.module_names[id(module)]
        return {local: f"{prefix}.{local}" if prefix else local for local, _ in module.named_parameters()}

    def materialize(self, module: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        """Fill `module`'s meta parameters from the checkpoint (only the shards that hold them)."""
        names = self.param_names(module)
        tensors = self.checkpoint.load_tensors(list(names.values()), dtype=dtype)
        state = {local: tensors[key].to(device) for local, key in names.items()}
        with _BUILD_LOCK:
            module.load_state_dict(state, strict=False, assign=True)
        _check_materialized(module, self.module_names[id(module)])
        module.to(device)

    def tie(self, module: nn.Module, source: nn.Module) -> None:
        """Share `source`'s weight with `module` (tied input and output embeddings)."""
        with _BUILD_LOCK:
            module.weight = source.weight

    def rotary_embeddings(
        self, hidden: torch.Tensor, position_ids: torch.Tensor, layer_type: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for `position_ids`, from the model's own rotary module (Gemma 3 keys it by layer type)."""
        rotary = self.rotary_emb
        if _accepts(rotary.forward, "layer_type"):
            return rotary(hidden, position_ids, layer_type)  # type: ignore[no-any-return]
        return rotary(hidden, position_ids)  # type: ignore[no-any-return]


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
        raise UnsupportedModelError(f"layer types {unknown} are not supported; hivegen runs {SUPPORTED_LAYER_TYPES}")
    return types


def _check_materialized(module: nn.Module, prefix: str) -> None:
    left = [name for name, p in module.named_parameters() if p.is_meta]
    if left:
        raise UnsupportedModelError(f"checkpoint has no weights for {prefix}: {left[:5]}")


def _accepts(fn: object, arg: str) -> bool:
    try:
        return arg in inspect.signature(fn).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
