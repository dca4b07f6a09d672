"""A contiguous span of decoder blocks, run with a per-session KV cache (prefill and decode)."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from hivegen.errors import ModelLoadError
from hivegen.model.checkpoint import ModelCheckpoint
from hivegen.model.skeleton import DEFAULT_ATTN_IMPLEMENTATION, SLIDING_ATTENTION, ModelSkeleton


class BlockSpan:
    """Blocks [start, end) of a model; only their weights are ever loaded."""

    def __init__(
        self,
        checkpoint: ModelCheckpoint,
        start: int,
        end: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        attn_implementation: str = DEFAULT_ATTN_IMPLEMENTATION,
    ) -> None:
        if not 0 <= start < end <= checkpoint.num_blocks:
            raise ModelLoadError(
                f"blocks {start}:{end} are outside the model's 0:{checkpoint.num_blocks}; pass --blocks START:END "
                f"with 0 <= START < END <= {checkpoint.num_blocks}"
            )
        self.start, self.end = start, end
        self.dtype = dtype
        self.device = torch.device(device)
        self.skeleton = ModelSkeleton.build(checkpoint, attn_implementation)
        self.config = self.skeleton.config
        self.hidden_size = int(self.config.hidden_size)
        self.layers = [self.skeleton.layer(i) for i in range(start, end)]
        for layer in self.layers:
            self.skeleton.materialize(layer, dtype, self.device)
        self.skeleton.rotary_emb.to(self.device)
        self.layer_types = self.skeleton.layer_types[start:end]

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for layer in self.layers for p in layer.parameters())

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    def cached_length(self, cache: DynamicCache, start: int | None = None) -> int:
        return int(cache.get_seq_length(layer_idx=self.start if start is None else start))

    @staticmethod
    def _mask_layers(start: int, kinds: list[str]) -> dict[str, int]:
        """The first layer of each attention type in the blocks run: masks are keyed to it, since
        the session's cache only knows the lengths of layers this span has filled."""
        first: dict[str, int] = {}
        for offset, kind in enumerate(kinds):
            first.setdefault(kind, start + offset)
        return first

    @torch.inference_mode()
    def forward(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: DynamicCache,
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
        layers = self.layers[start - self.start : end - self.start]
        kinds = self.layer_types[start - self.start : end - self.start]
        hidden = hidden.to(device=self.device, dtype=self.dtype)
        position_ids = position_ids.to(self.device)
        # Like transformers' generate: an all-ones padding mask is dropped, so attention takes its
        # causal fast path and the results stay bit-identical to a local run.
        mask_2d = None if bool(attention_mask.all()) else attention_mask.to(self.device)
        masks: dict[str, object] = {}
        rotary: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for kind, layer_idx in self._mask_layers(start, kinds).items():
            make_mask = create_sliding_window_causal_mask if kind == SLIDING_ATTENTION else create_causal_mask
            masks[kind] = make_mask(
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=mask_2d,
                past_key_values=cache,
                position_ids=position_ids,
                layer_idx=layer_idx,
            )
            rotary[kind] = self.skeleton.rotary_embeddings(hidden, position_ids, kind)
        for layer, kind in zip(layers, kinds, strict=True):
            out = layer(
                hidden,
                attention_mask=masks[kind],
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                position_embeddings=rotary[kind],
            )
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden
