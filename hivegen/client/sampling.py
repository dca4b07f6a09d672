"""Choosing the next token: greedy, or sampling whose randomness is keyed by (seed, position).

Keying the generator by position means token k is drawn the same way whether the
generation ran uninterrupted or was resumed at k, which is what replays rely on.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import torch

from hivegen.client.params import MAX_SEED, check_sampling

__all__ = ["MAX_SEED", "SamplingParams", "check_sampling", "choose_next", "position_generator"]


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. `seed` makes sampling reproducible; greedy ignores it."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (got {self.temperature}); use do_sample=False for greedy")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (got {self.top_k})")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")

    def with_seed(self) -> SamplingParams:
        """A copy whose seed is drawn now if it was None, so the record can be reproduced."""
        if self.seed is not None or not self.do_sample:
            return self
        return SamplingParams(self.do_sample, self.temperature, self.top_k, self.top_p, secrets.randbits(63))


def position_generator(seed: int, position: int) -> torch.Generator:
    digest = hashlib.sha256(f"hivegen:{seed}:{position}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def choose_next(logits: torch.Tensor, params: SamplingParams, position: int) -> torch.Tensor:
    """The next token of each row of `logits` [batch, vocab]; `position` indexes the generated token."""
    if not params.do_sample:
        return logits.argmax(dim=-1)
    if params.seed is None:
        raise ValueError("sampling needs a seed; call SamplingParams.with_seed() first")
    scores = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - sorted_scores.softmax(dim=-1) >= params.top_p  # always keeps the top token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=position_generator(params.seed, position)).squeeze(-1)
