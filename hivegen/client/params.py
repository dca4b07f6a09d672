"""Checking generation parameters: one place, shared by every face (Python, CLI, HTTP API), and light enough
to import before anything heavy (no torch), so a bad flag is refused at once."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from hivegen.errors import InvalidParameterError

MAX_SEED = (1 << 63) - 1  # seeds are stored and keyed as signed 64-bit integers
MAX_TEMPERATURE = 2.0  # as OpenAI's API: hotter is noise
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256  # characters per stop string
CLI_NAMES = {
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "seed": "--seed",
    "stop": "--stop",
}  # the commands' flags, for their errors


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


def add_sampling_arguments(parser: Any, max_new_tokens: int) -> None:
    """The commands' sampling flags (named as CLI_NAMES), all checked by check_sampling(names=CLI_NAMES)."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                        help=f"the most tokens to generate (default {max_new_tokens})")  # fmt: skip
    parser.add_argument("--temperature", type=float,
                        help=f"sample at this temperature in (0, {MAX_TEMPERATURE:g}] (default: greedy)")  # fmt: skip
    parser.add_argument("--top-p", type=float, help="sample from the smallest set of tokens with this probability")
    parser.add_argument("--top-k", type=int, help="sample from the k most likely tokens only")
    parser.add_argument("--seed", type=int, help="make sampling reproducible (and replayable from the store)")
