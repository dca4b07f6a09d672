"""Choosing the next token: greedy, or sampling whose randomness is keyed by (seed, position).

Keying the generator by position means token k is drawn the same way whether the
generation ran uninterrupted or was resumed at k, which is what replays rely on.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from hivegen.errors import InvalidParameterError

MAX_SEED = (1 << 63) - 1  # seeds are stored and keyed as signed 64-bit integers
MAX_TEMPERATURE = 2.0  # as OpenAI's API: hotter is noise
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256  # characters per stop string


def check_sampling(
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    names: Mapping[str, str] | None = None,
) -> None:
    """The one check of generation parameters that every face (Python, CLI, HTTP API) calls before anything
    starts. Raises InvalidParameterError naming the parameter as the caller spells it (`names` maps
    "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop" to e.g. "max_tokens" or "--top-p").

    Temperature 0 (or None) means greedy; top_k, top_p and seed then do nothing but must still be valid."""
    name = {**{k: k for k in ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")}, **(names or {})}

    def number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool)
                                       or max_new_tokens < 1):  # fmt: skip
        raise InvalidParameterError(name["max_new_tokens"], f"must be an integer >= 1, not {max_new_tokens!r}")
    if temperature is not None and (
        not number(temperature) or not math.isfinite(temperature) or not 0 <= temperature <= MAX_TEMPERATURE
    ):
        raise InvalidParameterError(
            name["temperature"], f"must be a number in [0, {MAX_TEMPERATURE:g}] (0 is greedy), not {temperature!r}"
        )
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise InvalidParameterError(name["top_k"], f"must be an integer >= 1, not {top_k!r}")
    if top_p is not None and (not number(top_p) or not math.isfinite(top_p) or not 0 < top_p <= 1):
        raise InvalidParameterError(name["top_p"], f"must be a number in (0, 1], not {top_p!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED):
        raise InvalidParameterError(name["seed"], f"must be an integer in [0, 2**63 - 1], not {seed!r}")
    if isinstance(stop, str) or not all(isinstance(s, str) for s in stop):
        raise InvalidParameterError(name["stop"], "must be a list of strings")
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidParameterError(name["stop"], f"at most {MAX_STOP_STRINGS} stop strings, not {len(stop)}")
    for s in stop:
        if not s or len(s) > MAX_STOP_LENGTH:
            raise InvalidParameterError(name["stop"], f"each stop string must have 1 to {MAX_STOP_LENGTH} characters")


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
