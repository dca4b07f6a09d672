"""Work units and credits: the ledger counts parameter-tokens exactly; people read credits with decimals."""

from __future__ import annotations

WORK_UNITS_PER_CREDIT = 100_000_000
"""One credit is 10^8 parameter-tokens of work: about one token through all of SmolLM2-135M's blocks."""


def format_credits(units: int) -> str:
    """`units` as credits with every decimal that matters: 10^8 -> "1", 53_101_440 -> "0.5310144"."""
    sign = "-" if units < 0 else ""
    whole, frac = divmod(abs(int(units)), WORK_UNITS_PER_CREDIT)
    text = f"{whole:,}"
    if frac:
        text += "." + f"{frac:08d}".rstrip("0")
    return sign + text


def credits_value(units: int) -> float:
    """`units` as a number of credits (for JSON; exact up to 2^53 units)."""
    return int(units) / WORK_UNITS_PER_CREDIT
