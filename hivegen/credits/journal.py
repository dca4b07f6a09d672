"""The ledger's append-only journal: every grant and transfer, each row hash-chained to the one before it.

Altering, removing or reordering a past row breaks the chain from that row on, and replaying the rows must
reproduce every balance, so `verify` names the first row where the stored history stops adding up.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from hivegen.errors import JournalError
from hivegen.store.encoding import EncodingError, canonical_bytes

MINT = "mint"
"""The source of starter grants: credits enter the ledger only from here."""

GENESIS_HASH = "0" * 64
KINDS = ("grant", "transfer")
_COLUMNS = "row, at, kind, src, dst, amount, session_id, seq"


@dataclass(frozen=True)
class JournalEntry:
    """One journal row: `amount` work units moved from `src` to `dst` (a grant comes from MINT)."""

    row: int
    at: float  # unix time of the transaction
    kind: str  # 'grant' | 'transfer'
    src: str
    dst: str
    amount: int
    session_id: str | None  # the receipt's session (transfers only)
    seq: int | None  # the receipt's seq (transfers only)
    hash: str


def row_hash(prev_hash: str, fields: tuple[Any, ...]) -> str:
    """sha256(prev_hash + canonical JSON of the row's fields), as hex."""
    named = dict(zip(_COLUMNS.split(", "), fields, strict=True))
    return hashlib.sha256(prev_hash.encode() + canonical_bytes(named)).hexdigest()


def append(
    db: sqlite3.Connection, kind: str, src: str, dst: str, amount: int, session_id: str | None, seq: int | None
) -> None:
    """Add a row chained to the last one; call inside the write transaction that moves the credits."""
    last = db.execute("SELECT row, hash FROM journal ORDER BY row DESC LIMIT 1").fetchone()
    row, prev = (last[0] + 1, last[1]) if last else (1, GENESIS_HASH)
    fields = (row, time.time(), kind, src, dst, amount, session_id, seq)
    db.execute(
        f"INSERT INTO journal ({_COLUMNS}, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (*fields, prev, row_hash(prev, fields)),
    )


def entries(db: sqlite3.Connection, account: str | None, limit: int) -> list[JournalEntry]:
    """The newest `limit` rows, optionally only those moving credits from or to `account`."""
    where, args = ("WHERE src = ? OR dst = ?", (account, account)) if account is not None else ("", ())
    rows = db.execute(f"SELECT {_COLUMNS}, hash FROM journal {where} ORDER BY row DESC LIMIT ?", (*args, limit))
    return [JournalEntry(*row) for row in rows]


def verify(db: sqlite3.Connection) -> tuple[int, str]:
    """Check the chain from row 1 and that replaying it gives the stored balances, grants and sessions; return
    (rows, the last row's hash)."""
    balances: dict[str, int] = {}
    grants: dict[str, int] = {}
    paid: dict[tuple[str, str], int] = {}
    prev, expected = GENESIS_HASH, 1
    for *fields, prev_hash, stored in db.execute(f"SELECT {_COLUMNS}, prev_hash, hash FROM journal ORDER BY row"):
        row, _, kind, src, dst, amount, session_id, _ = fields
        if row != expected:
            raise JournalError(expected, f"row {expected} is missing (the next row is {row})")
        if prev_hash != prev:
            raise JournalError(row, "its prev_hash is not the hash of the row before it")
        try:
            ok = row_hash(prev, tuple(fields)) == stored
        except EncodingError:
            ok = False
        if not ok:
            raise JournalError(row, "its hash does not match its fields (the row was altered)")
        if kind not in KINDS or isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
            raise JournalError(row, f"kind {kind!r} / amount {amount!r} is not a grant or transfer of credits")
        if kind == "grant":
            if src != MINT:
                raise JournalError(row, f"a grant must come from {MINT!r}, not {src!r}")
            grants[dst] = grants.get(dst, 0) + amount
        else:
            if balances.get(src, 0) < amount:
                raise JournalError(row, f"{src} pays {amount} but has only {balances.get(src, 0)} at this point")
            balances[src] -= amount
            key = (str(session_id), dst)
            paid[key] = paid.get(key, 0) + amount
        balances[dst] = balances.get(dst, 0) + amount
        prev, expected = stored, expected + 1
    last = expected - 1
    _compare(last, "balance", balances, _table(db, "SELECT account, balance FROM accounts"))
    _compare(last, "granted", grants, _table(db, "SELECT account, granted FROM accounts"))
    sessions = {(s, n): w for s, n, w in db.execute("SELECT session_id, node, applied_work FROM sessions")}
    _compare(last, "applied_work", paid, sessions)
    return last, prev


def _table(db: sqlite3.Connection, query: str) -> dict[Any, int]:
    return {key: value for key, value in db.execute(query)}


def _compare(last: int, what: str, replayed: dict[Any, int], stored: dict[Any, int]) -> None:
    """Raise when the stored state is not what rows 1..last add up to: most likely row last+1 was removed."""
    for key in sorted(set(replayed) | set(stored), key=repr):
        want, have = replayed.get(key, 0), stored.get(key, 0)
        if want != have:
            raise JournalError(
                last + 1,
                f"replaying rows 1..{last} gives {what} {want} for {key} but {have} is stored: "
                f"row {last + 1} and later were removed, or the stored {what} was altered",
            )
