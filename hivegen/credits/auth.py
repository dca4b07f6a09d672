"""Signed ledger calls: proof that an account's owner made a call that changes or reveals the account, now.

The caller signs {method, account, public key, time, nonce, args} with the account's key; the ledger checks the
key owns the account, the signature, that the time is within MAX_SKEW_S of its clock, and that the nonce was
never used (it keeps nonces until they are too old to pass the time check anyway). A captured call therefore
cannot be replayed, nor its signature moved to another method, account or argument.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

from hivegen.credits.identity import Identity, account_of, is_account, is_public_key, verify_signature
from hivegen.proto import ledger_pb2
from hivegen.store.encoding import canonical_bytes

CALL_KIND = "hivegen.ledger-call"
CALL_VERSION = 1
MAX_SKEW_S = 300.0
"""How far a call's signing time may be from the ledger's clock, either way."""

_NONCE = re.compile(r"^[0-9a-f]{32}$")
_SIGNATURE = re.compile(r"^[0-9a-f]{128}$")


class CallRefused(Exception):
    """A ledger call's authentication failed; the message says what was wrong (sent as PERMISSION_DENIED)."""


def call_payload(method: str, auth: ledger_pb2.CallAuth, args: dict[str, Any]) -> bytes:
    """The bytes an account's key signs for one call of `method` with `args`."""
    return canonical_bytes(
        {
            "kind": CALL_KIND,
            "v": CALL_VERSION,
            "method": method,
            "account": auth.account,
            "public_key": auth.public_key,
            "at_ms": auth.at_ms,
            "nonce": auth.nonce,
            "args": args,
        }
    )


def sign_call(identity: Identity, method: str, args: dict[str, Any] | None = None) -> ledger_pb2.CallAuth:
    """A fresh CallAuth for one call of `method` on the identity's own account."""
    auth = ledger_pb2.CallAuth(
        account=identity.account,
        public_key=identity.public_key_hex,
        at_ms=int(time.time() * 1000),
        nonce=secrets.token_hex(16),
    )
    auth.signature = identity.sign(call_payload(method, auth, args or {})).hex()
    return auth


def check_call(method: str, auth: ledger_pb2.CallAuth, account: str, args: dict[str, Any], now: float) -> None:
    """Raise CallRefused unless `auth` is a well-formed, fresh signature by the owner of `account` over this call.

    The nonce is not checked here: the ledger records it atomically (Ledger.use_nonce).
    """
    if not auth.signature and not auth.public_key:
        raise CallRefused(f"{method} on {account or '(no account)'} must be signed by the account's key (auth missing)")
    if not is_account(account):
        raise CallRefused(f"{method}: {account[:64]!r} is not an account ('hg' + 40 lowercase hex characters)")
    if auth.account != account:
        raise CallRefused(f"{method}: the call is signed for {auth.account[:64] or '(empty)'}, not for {account}")
    if not is_public_key(auth.public_key):
        raise CallRefused(f"{method}: auth.public_key must be 64 lowercase hex characters")
    if account_of(auth.public_key) != account:
        raise CallRefused(f"{method}: key {auth.public_key[:16]}... does not own {account} (wrong key)")
    if not _NONCE.fullmatch(auth.nonce):
        raise CallRefused(f"{method}: auth.nonce must be 32 lowercase hex characters")
    if not _SIGNATURE.fullmatch(auth.signature):
        raise CallRefused(f"{method}: auth.signature must be 128 lowercase hex characters")
    skew = auth.at_ms / 1000 - now
    if abs(skew) > MAX_SKEW_S:
        raise CallRefused(
            f"{method}: the call was signed {abs(skew):.0f} s in the {'future' if skew > 0 else 'past'}; the ledger "
            f"accepts {MAX_SKEW_S:.0f} s either way (stale call, or a wrong clock)"
        )
    if not verify_signature(auth.public_key, bytes.fromhex(auth.signature), call_payload(method, auth, args)):
        raise CallRefused(f"{method}: the signature does not match this call (bad signature)")
