"""A chain of spans in one process: what a swarm of nodes computes, without the swarm.

For checks that need no network (a GPU box without the swarm's packages, a quick sweep over
architectures): the nodes' `BlockSpan` code and the client's `ClientHead`, greedy.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hivegen.model.checkpoint import ModelCheckpoint
from hivegen.model.head import ClientHead, position_ids_from_mask
from hivegen.model.span import BlockSpan


@torch.inference_mode()
def generate_greedy(
    path: str | Path,
    spans: list[tuple[int, int]],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    attn_implementation: str | None = None,
) -> torch.Tensor:
    """[batch, prompt + new] token ids: `input_ids` (left-padded per `attention_mask`) continued greedily through
    `spans` (consecutive, covering every block), each with its own cache as a node keeps one."""
    checkpoint = ModelCheckpoint.open(path)
    chain = [BlockSpan(checkpoint, start, end, dtype, device, attn_implementation) for start, end in spans]
    head = ClientHead(checkpoint, dtype, device, attn_implementation)
    caches = [span.new_cache() for span in chain]
    mask = attention_mask.to(torch.int64)
    positions, step_ids, new = position_ids_from_mask(mask), input_ids, []
    for _ in range(max_new_tokens):

        def blocks(hidden: torch.Tensor, at: torch.Tensor = positions, padding: torch.Tensor = mask) -> torch.Tensor:
            for span, cache in zip(chain, caches, strict=True):
                hidden = span.forward(hidden, at, padding, cache)
            return hidden

        tokens = head.step(step_ids, positions, blocks).argmax(-1).cpu()
        new.append(tokens)
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype)], dim=1)
        step_ids = tokens[:, None]
    return torch.cat([input_ids.cpu(), torch.stack(new, dim=1)], dim=1)
