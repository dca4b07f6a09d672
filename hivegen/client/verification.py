"""How much node work a client re-executes (VerifyPolicy), and what the re-execution found, per hop and per
generation (HopCheck, VerificationReport): the records a generation keeps of how it was verified."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hivegen.credits.attestation import TOLERANCES, tolerance_for

DEFAULT_RATE = 0.25  # share of hops re-executed in full; the others get a spot check of a random prefix
PROBATION = 1  # generations through a node this client has never verified that are checked in full


@dataclass(frozen=True)
class VerifyPolicy:
    """How much node work a client re-executes, per hop of each generation.

    A share `rate` of hops is re-executed in full (0: none, 1: every hop of every generation); with `spot`, each
    other hop is spot-checked: its steps 0..s are re-executed for a random s, which costs one prefill of those
    positions and catches any node that lies from its first step on. A node that has passed fewer than
    `probation` checks with this client is re-executed in full.
    """

    rate: float = DEFAULT_RATE
    spot: bool = True
    probation: int = PROBATION
    tolerances: Mapping[str, float] = field(default_factory=lambda: dict(TOLERANCES))

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"verify rate must be in [0, 1], got {self.rate}")
        if self.probation < 0:
            raise ValueError(f"probation must be >= 0, got {self.probation}")

    @property
    def mode(self) -> str:
        if self.rate >= 1.0:
            return "all"
        return "off" if self.rate == 0.0 and not self.spot and self.probation == 0 else "sample"

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def tolerance(self, dtype: str) -> float:
        """The tolerance for `dtype` (never tighter than what honest runs need: the coordinator would refuse
        accusations made with it)."""
        return max(self.tolerances.get(dtype, 0.0), tolerance_for(dtype))

    @classmethod
    def parse(cls, value: VerifyPolicy | str | float | bool | None) -> VerifyPolicy:
        """None or "default": the default; "off"/False/0: nothing; "all"/True/1: every hop in full; a rate in
        (0, 1): that share of hops in full and spot checks of the others."""
        if isinstance(value, VerifyPolicy):
            return value
        if value is None or value == "default":
            return cls()
        if value is False or value == "off":
            return cls.off()
        if value is True or value == "all":
            return cls(rate=1.0)
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"verify must be 'off', 'default', 'all' or a rate in [0, 1], not {value!r}") from None
        rate = float(value)
        return cls.off() if rate == 0.0 else cls(rate=rate)

    @classmethod
    def off(cls) -> VerifyPolicy:
        return cls(rate=0.0, spot=False, probation=0)


@dataclass
class HopCheck:
    """The verification of one hop session: who served it, who re-ran it, and what came out."""

    node_id: str
    address: str
    start: int
    end: int
    steps: int
    positions: int
    # "match" (every step re-executed and matched), "partial" (a prefix of the steps matched), "lied",
    # "unverifiable" (no other node serves these blocks) or "skipped" (not sampled)
    result: str
    checked_steps: int = 0
    verified_by: list[str] = field(default_factory=list)
    max_error: float | None = None
    tolerance: float | None = None

    def to_record(self) -> dict[str, Any]:
        return {
            "node": self.node_id,
            "address": self.address,
            "blocks": [self.start, self.end],
            "steps": self.steps,
            "positions": self.positions,
            "result": self.result,
            "checked_steps": self.checked_steps,
            "verified_by": list(self.verified_by),
            "max_error": self.max_error,
            "tolerance": self.tolerance,
        }


@dataclass
class VerificationReport:
    """What verification found in one generation."""

    mode: str
    hops: list[HopCheck] = field(default_factory=list)
    liars: list[str] = field(default_factory=list)  # node ids proven wrong (banned)
    evidence: list[str] = field(default_factory=list)  # evidence digests, one per liar
    first_bad_step: int | None = None  # the first step whose tokens a liar's answer shaped

    @property
    def verified(self) -> bool:
        """Every hop was re-executed: each matched, or lied and the tokens its lies shaped were generated again
        (its answers before the first lie matched), so every token that stands rests on checked work."""
        return bool(self.hops) and all(h.result in ("match", "lied") for h in self.hops)

    def merge(self, other: VerificationReport) -> None:
        self.hops += other.hops
        self.liars += other.liars
        self.evidence += other.evidence

    def to_record(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "verified": self.verified,
            "hops": [h.to_record() for h in self.hops],
            "liars": list(self.liars),
            "evidence": list(self.evidence),
        }
