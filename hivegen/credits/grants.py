"""Starter grants: what a new account receives once, and the proof of work that makes it cost something.

Without a price, anyone could create accounts by the thousand and pay their grants into one (a ring of fresh
keys laundering free money). A grant therefore asks for a hashcash-style proof bound to one ledger and one key:
a number `proof` such that sha256(GRANT_PROOF_TAG | salt | public key | proof) starts with `bits` zero bits.
Finding one takes 2^bits hashes on average; checking it takes one. `DEFAULT_PROOF_BITS` costs about ten seconds
of one CPU core in Python (benchmarks/ledger.py measures it), so every granted credit costs its holder work.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

GRANT_PROOF_TAG = b"hivegen.grant-proof.v1|"
DEFAULT_PROOF_BITS = 23
"""2^23 = 8.4 million hashes: about 10 s of one core of the reference machine (see the README)."""
MAX_PROOF_BITS = 40
DEFAULT_STARTER_GRANT = 100
"""Credits a new account receives by default: about a hundred tokens through every block of SmolLM2-135M."""


@dataclass(frozen=True)
class GrantPolicy:
    """The ledger operator's choice: `grant_units` per new account (0: none) for a proof of `bits` bits."""

    grant_units: int
    bits: int
    salt: str  # the ledger's random id, so a proof is good at one ledger only

    def __post_init__(self) -> None:
        if isinstance(self.grant_units, bool) or not isinstance(self.grant_units, int) or self.grant_units < 0:
            raise ValueError(f"grant_units must be an int >= 0, not {self.grant_units!r}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 0 <= self.bits <= MAX_PROOF_BITS:
            raise ValueError(f"the grant's proof of work must be 0..{MAX_PROOF_BITS} bits, not {self.bits!r}")


def _prefix(salt: str, public_key: str) -> bytes:
    return GRANT_PROOF_TAG + salt.encode() + b"|" + public_key.encode() + b"|"


def _zero_bits(digest: bytes, bits: int) -> bool:
    return int.from_bytes(digest[:8], "big") >> (64 - bits) == 0 if bits else True


def check_proof(salt: str, public_key: str, proof: int, bits: int) -> bool:
    """Whether `proof` is a proof of `bits` bits for `public_key` at the ledger named by `salt`."""
    if not 0 < proof < 2**64:  # 0 stands for "no proof" on the wire
        return False
    return _zero_bits(hashlib.sha256(_prefix(salt, public_key) + proof.to_bytes(8, "big")).digest(), bits)


class ProofTimeout(Exception):
    """solve_proof gave up before finding a proof."""


def solve_proof(salt: str, public_key: str, bits: int, timeout: float = 600.0) -> int:
    """The smallest proof (>= 1) of `bits` bits for `public_key` at this ledger; ProofTimeout after `timeout` s."""
    base = hashlib.sha256(_prefix(salt, public_key))
    deadline = time.monotonic() + timeout
    for batch in range(1, 2**64, 65536):  # from 1: 0 stands for "no proof" on the wire
        for proof in range(batch, batch + 65536):
            h = base.copy()
            h.update(proof.to_bytes(8, "big"))
            if _zero_bits(h.digest(), bits):
                return proof
        if time.monotonic() > deadline:
            raise ProofTimeout(f"no {bits}-bit proof of work found in {timeout:.0f} s ({batch + 65536:,} tried)")
    raise ProofTimeout(f"no {bits}-bit proof of work exists for this key")
