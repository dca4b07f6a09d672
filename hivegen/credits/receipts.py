"""Work receipts: a client's signed, cumulative statement of the work one node did for it in one session.

Work is counted in parameter-tokens: tokens processed x parameters of the span that processed them, so a
block of a 70B model earns more than a block of a 135M one. SmolLM2-135M has 30 blocks of 3,540,096
parameters (106,202,880 in all), so one token through every block is 106,202,880 parameter-tokens, about
1.06 credits. The ledger moves exactly the work receipted, in these units: nothing is rounded away.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from hivegen.credits.identity import Identity, account_of, is_account, is_public_key, verify_signature
from hivegen.credits.units import WORK_UNITS_PER_CREDIT as WORK_UNITS_PER_CREDIT
from hivegen.errors import ForgedReceiptError
from hivegen.store.encoding import canonical_bytes

MAX_COUNTER = 2**62
"""Upper bound of seq and work, so both fit a SQLite INTEGER with room to spare."""

INSUFFICIENT_CREDITS = "insufficient-credits"
"""Value of a node's `hivegen-error` trailing metadata when it refuses a session for want of credits; the
`hivegen-account`, `hivegen-balance` and `hivegen-needed` keys carry the figures (work units)."""

GRANT_PROOF_NEEDED = "grant-proof-needed"
"""Value of `hivegen-error` when a new account must show a proof of work for its starter grant first; the
`hivegen-grant-units`, `hivegen-grant-bits` and `hivegen-grant-salt` keys carry the ledger's policy."""

MAX_ID_CHARS = 256
RECEIPT_KIND = "hivegen.receipt"
_LOWER_HEX = re.compile(r"[0-9a-f]*")
RECEIPT_VERSION = 1
_FIELDS = ("session_id", "client", "client_key", "node", "model_key", "seq", "work")


@dataclass(frozen=True)
class Receipt:
    """Cumulative work one node did for `client` in one session, as of step `seq`."""

    session_id: str  # the client's session id for this node's stream
    client: str  # the paying account; must equal account_of(client_key)
    client_key: str  # the client's raw Ed25519 public key, hex
    node: str  # the account being paid
    model_key: str  # which model the work was for
    seq: int  # 1 for the first step, +1 per step
    work: int  # parameter-tokens done so far in this session on this node; never decreases

    def payload(self) -> bytes:
        """The bytes the client signs: canonical JSON of the fields, tagged so no other message can match them."""
        return canonical_bytes({"kind": RECEIPT_KIND, "v": RECEIPT_VERSION, **asdict(self)})


@dataclass(frozen=True)
class SignedReceipt:
    """A receipt with the client's Ed25519 signature of its payload (hex)."""

    receipt: Receipt
    signature: str

    def to_dict(self) -> dict[str, Any]:
        """A flat JSON-ready dict: the receipt's fields plus "signature"."""
        return {**asdict(self.receipt), "signature": self.signature}

    @classmethod
    def from_dict(cls, data: Any) -> SignedReceipt:
        """Parse `to_dict` output; wrong keys or field types raise ForgedReceiptError("malformed")."""
        if not isinstance(data, dict):
            raise ForgedReceiptError("malformed", f"a receipt must be a dict, not {type(data).__name__}")
        expected = {*_FIELDS, "signature"}
        if set(data) != expected:
            raise ForgedReceiptError("malformed", f"receipt keys must be {sorted(expected)}, got {sorted(data)}")
        signed = cls(Receipt(**{name: data[name] for name in _FIELDS}), data["signature"])
        _check_fields(signed)
        return signed


def sign_receipt(identity: Identity, receipt: Receipt) -> SignedReceipt:
    """Sign `receipt` as its client; the identity must be that client and the fields well formed."""
    if receipt.client != identity.account or receipt.client_key != identity.public_key_hex:
        raise ValueError(f"receipt is for client {receipt.client}, not for this identity ({identity.account})")
    problem = _field_problem(receipt)
    if problem:
        raise ValueError(f"refusing to sign a malformed receipt: {problem}")
    return SignedReceipt(receipt, identity.sign(receipt.payload()).hex())


def verify_receipt(signed: SignedReceipt) -> None:
    """Check fields, that the key owns the client account, and the signature; raise ForgedReceiptError if not."""
    _check_fields(signed)
    receipt = signed.receipt
    if account_of(receipt.client_key) != receipt.client:
        raise ForgedReceiptError("wrong-signer", f"key {receipt.client_key[:16]}... does not own {receipt.client}")
    if not verify_signature(receipt.client_key, bytes.fromhex(signed.signature), receipt.payload()):
        raise ForgedReceiptError(
            "bad-signature", f"signature does not match receipt {receipt.session_id}#{receipt.seq}"
        )


def _check_fields(signed: SignedReceipt) -> None:
    if not isinstance(signed, SignedReceipt) or not isinstance(signed.receipt, Receipt):
        raise ForgedReceiptError("malformed", "not a SignedReceipt")
    problem = _field_problem(signed.receipt)
    sig = signed.signature
    if not problem and not (isinstance(sig, str) and len(sig) == 128 and _is_lower_hex(sig)):
        problem = "signature must be 128 lowercase hex characters"
    if problem:
        raise ForgedReceiptError("malformed", problem)


def _field_problem(r: Receipt) -> str | None:
    """What is wrong with the receipt's fields, or None."""
    for name in ("session_id", "model_key"):
        value = getattr(r, name)
        if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
            return f"{name} must be a non-empty string of at most {MAX_ID_CHARS} characters"
        if not value.isprintable() or not _is_utf8(value):
            return f"{name} must be printable UTF-8 text"
    for name in ("client", "node"):
        if not is_account(getattr(r, name)):
            return f"{name} must be an account ('hg' + 40 lowercase hex characters)"
    if not is_public_key(r.client_key):
        return "client_key must be 64 lowercase hex characters"
    for name, low in (("seq", 1), ("work", 0)):
        value = getattr(r, name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_COUNTER:
            return f"{name} must be an int from {low} to {MAX_COUNTER}"
    return None


def _is_lower_hex(s: str) -> bool:
    return _LOWER_HEX.fullmatch(s) is not None


def _is_utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
