"""A contiguous span of decoder blocks, run with a per-session KV cache (prefill and decode)."""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache

from hivegen.errors import ModelLoadError
from hivegen.model.blocks import MASKS, block_calls, check_positions, resolve_layer_types
from hivegen.model.checkpoint import ModelCheckpoint
from hivegen.model.loading import in_modules, load_weights
from hivegen.model.skeleton import ModelSkeleton


class BlockSpan:
    """Blocks [start, end) of a model; only their weights are ever loaded."""

    def __init__(
        self,
        checkpoint: ModelCheckpoint,
        start: int,
        end: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        attn_implementation: str | None = None,
    ) -> None:
        if not 0 <= start < end <= checkpoint.num_blocks:
            raise ModelLoadError(
                f"blocks {start}:{end} are outside the model's 0:{checkpoint.num_blocks}; pass --blocks START:END "
                f"with 0 <= START < END <= {checkpoint.num_blocks}"
            )
        self.start, self.end = start, end
        self.dtype = dtype
        self.device = torch.device(device)
        self.skeleton = ModelSkeleton.build(checkpoint, attn_implementation, dtype)
        self.config = self.skeleton.config
        self.hidden_size = int(self.config.hidden_size)
        # Refuse what cannot be served before reading a single weight.
        self.layer_types = resolve_layer_types(self.config)[start:end]
        self.layers = [self.skeleton.layer(i) for i in range(start, end)]
        self.calls = block_calls(self.layers, self.config)
        check_positions(self.skeleton.causal_lm, self.config)  # no client could drive these blocks
        load_weights(self.skeleton, in_modules([self.skeleton.layer_name(i) for i in range(start, end)]), self.device)
        self.rotary = self.skeleton.rotary()
        if self.rotary is not None:
            self.rotary.to(self.device)
        self._rotary_by_type = self.rotary is not None and _accepts(self.rotary.forward, "layer_type")

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for layer in self.layers for p in layer.parameters())

    @property
    def attn_implementation(self) -> str:
        return self.skeleton.attn_implementation

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    def cached_length(self, cache: Cache, start: int | None = None) -> int:
        return int(cache.get_seq_length(layer_idx=self.start if start is None else start))

    @staticmethod
    def _mask_layers(start: int, kinds: list[str]) -> dict[str, int]:
        """The first layer of each attention type in the blocks run: masks are keyed to it, since
        the session's cache only knows the lengths of layers this span has filled."""
        first: dict[str, int] = {}
        for offset, kind in enumerate(kinds):
            first.setdefault(kind, start + offset)
        return first

    def _position_embeddings(
        self, hidden: torch.Tensor, position_ids: torch.Tensor, kind: str
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos/sin for `position_ids`, from the model's own rotary module (Gemma 3 keys it by layer type)."""
        if self.rotary is None:
            return None
        if self._rotary_by_type:
            return self.rotary(hidden, position_ids, kind)  # type: ignore[no-any-return]
        return self.rotary(hidden, position_ids)  # type: ignore[no-any-return]

    @torch.inference_mode()
    def forward(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Cache,
        start: int | None = None,
        end: int | None = None,
    ) -> torch.Tensor:
        """Run blocks [start, end) (default: the whole span) on `hidden` [batch, new, hidden_size].

        `attention_mask` is the 2-D padding mask [batch, past + new] of the whole session so
        far; `position_ids` [batch, new] are the new tokens' positions.
        """
        start = self.start if start is None else start
        end = self.end if end is None else end
        if not self.start <= start < end <= self.end:
            raise ValueError(f"blocks {start}:{end} are not inside this span {self.start}:{self.end}")
        window = slice(start - self.start, end - self.start)
        layers, kinds, calls = self.layers[window], self.layer_types[window], self.calls[window]
        hidden = hidden.to(device=self.device, dtype=self.dtype)
        position_ids = position_ids.to(self.device)
        past = self.cached_length(cache, start)
        cache_position = torch.arange(past, past + hidden.shape[1], device=self.device)
        # Like transformers' generate: an all-ones padding mask is dropped, so attention takes its
        # causal fast path and the results stay bit-identical to a local run.
        mask_2d = None if bool(attention_mask.all()) else attention_mask.to(self.device)
        masks: dict[str, object] = {}
        rotary: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
        for kind, layer_idx in self._mask_layers(start, kinds).items():
            masks[kind] = MASKS[kind](
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=mask_2d,
                past_key_values=cache,
                position_ids=position_ids,
                layer_idx=layer_idx,
            )
            rotary[kind] = self._position_embeddings(hidden, position_ids, kind)
        for layer, kind, call in zip(layers, kinds, calls, strict=True):
            out = layer(hidden, **call.kwargs(masks[kind], position_ids, cache, rotary[kind], cache_position))
            hidden = out[0] if isinstance(out, tuple | list) else out
        return hidden


def _accepts(fn: object, arg: str) -> bool:
    try:
        return arg in inspect.signature(fn).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
