"""The credit ledger: applies signed work receipts as zero-sum transfers from clients to nodes, in SQLite.

Amounts are work units (parameter-tokens; WORK_UNITS_PER_CREDIT make a credit), kept as exact integers so no
session is too small to be charged. Credits enter only as starter grants, at most one per key and each paid
for with a proof of work (hivegen.credits.grants).

Every write is one `BEGIN IMMEDIATE` transaction, so several threads (one connection behind a lock) and several
processes (WAL mode, busy timeout) can share one file without losing or double-counting a receipt.
"""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from hivegen.credits import journal
from hivegen.credits.auth import MAX_SKEW_S, CallRefused
from hivegen.credits.grants import DEFAULT_STARTER_GRANT, GrantPolicy, check_proof
from hivegen.credits.identity import account_of, is_account
from hivegen.credits.journal import MINT, JournalEntry
from hivegen.credits.receipts import WORK_UNITS_PER_CREDIT, Receipt, SignedReceipt, verify_receipt
from hivegen.errors import CreditsError, ForgedReceiptError, GrantProofNeeded, InsufficientCredits

BUSY_TIMEOUT_S = 30.0
AMOUNTS = "work-units"
"""The meta table's `amounts`: ledgers of earlier hivegen versions counted whole credits and have no meta table."""

_SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS accounts (
    account TEXT PRIMARY KEY,
    public_key TEXT,
    balance INTEGER NOT NULL CHECK (balance >= 0),
    granted INTEGER NOT NULL CHECK (granted >= 0),
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT NOT NULL,
    node TEXT NOT NULL,
    client TEXT NOT NULL,
    client_key TEXT NOT NULL,
    model_key TEXT NOT NULL,
    applied_work INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    PRIMARY KEY (session_id, node)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nonces (nonce TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS nonces_at ON nonces (at);
CREATE TABLE IF NOT EXISTS journal (
    row INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    src TEXT NOT NULL,
    dst TEXT NOT NULL,
    amount INTEGER NOT NULL,
    session_id TEXT,
    seq INTEGER,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS journal_src ON journal (src);
CREATE INDEX IF NOT EXISTS journal_dst ON journal (dst);
CREATE TRIGGER IF NOT EXISTS journal_no_update BEFORE UPDATE ON journal
    BEGIN SELECT RAISE(ABORT, 'the credit journal is append-only'); END;
CREATE TRIGGER IF NOT EXISTS journal_no_delete BEFORE DELETE ON journal
    BEGIN SELECT RAISE(ABORT, 'the credit journal is append-only'); END;
COMMIT;
"""


class LedgerFormatError(CreditsError):
    """The ledger file was written by an incompatible version of hivegen."""


class Ledger:
    """Balances, per-session applied work and the transfer journal of one SQLite file (or ":memory:").

    `starter_grant` credits go once to each new key that shows a proof of work of `grant_proof_bits` bits
    (0 bits: none needed; a grant of 0: credits are only earned by serving).
    """

    def __init__(self, path: str | Path, starter_grant: int = DEFAULT_STARTER_GRANT, grant_proof_bits: int = 0) -> None:
        if isinstance(starter_grant, bool) or not isinstance(starter_grant, int) or starter_grant < 0:
            raise ValueError(f"starter_grant must be a non-negative int, not {starter_grant!r}")
        self.path = str(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            self._enable_wal()
            self._db.execute("PRAGMA synchronous = FULL")
            self._check_format()
            self._db.executescript(_SCHEMA)
            salt = self._meta()
        except BaseException:
            self._db.close()
            raise
        self.grant_policy = GrantPolicy(starter_grant * WORK_UNITS_PER_CREDIT, grant_proof_bits, salt)

    def open_account(self, account: str, public_key: str, proof: int | None = None) -> int:
        """Open `account` (owned by `public_key`) if new and return its balance in work units.

        The starter grant is paid once per account, for a valid proof of work (when the policy asks for one). A
        call without a valid proof on an account that has nothing raises GrantProofNeeded and creates nothing;
        one on an account that holds credits (earned by serving) just returns the balance.
        """
        if not is_account(account):
            raise ValueError(f"{account!r} is not an account ('hg' + 40 lowercase hex characters)")
        if account_of(public_key) != account:
            raise ValueError(f"public key {public_key[:16]}... does not belong to account {account}")
        policy = self.grant_policy
        with self._write() as db:
            row = db.execute("SELECT balance, granted FROM accounts WHERE account = ?", (account,)).fetchone()
            balance, granted = (int(row[0]), int(row[1])) if row else (0, 0)
            if granted or not policy.grant_units:
                return self._ensure(db, account, public_key)
            proven = not policy.bits or (proof is not None and check_proof(policy.salt, public_key, proof, policy.bits))
            if not proven:
                if balance:
                    return self._ensure(db, account, public_key)
                raise GrantProofNeeded(account, policy.grant_units, policy.bits, policy.salt, proof is not None)
            self._ensure(db, account, public_key)
            db.execute(
                "UPDATE accounts SET balance = balance + ?, granted = granted + ? WHERE account = ?",
                (policy.grant_units, policy.grant_units, account),
            )
            journal.append(db, "grant", MINT, account, policy.grant_units, None, None)
            return balance + policy.grant_units

    def use_nonce(self, nonce: str, now: float) -> None:
        """Record a signed call's nonce; CallRefused if it was used before (a replayed call)."""
        with self._write() as db:
            db.execute("DELETE FROM nonces WHERE at < ?", (now - 2 * MAX_SKEW_S,))
            if db.execute("INSERT OR IGNORE INTO nonces (nonce, at) VALUES (?, ?)", (nonce, now)).rowcount == 0:
                raise CallRefused(f"nonce {nonce} was already used: a replayed call")

    def balance(self, account: str) -> int:
        """The account's work units; 0 for an account the ledger has never seen (it is not created)."""
        with self._lock:
            row = self._db.execute("SELECT balance FROM accounts WHERE account = ?", (account,)).fetchone()
        return int(row[0]) if row else 0

    def has_account(self, account: str) -> bool:
        """Whether the ledger has created `account` (received a grant or a payment)."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM accounts WHERE account = ?", (account,)).fetchone() is not None

    def apply_receipt(self, signed: SignedReceipt) -> int:
        """Pay the node what the receipt adds over what was already applied for its session; return the units.

        Duplicate and stale receipts change nothing and return 0. Forged ones raise ForgedReceiptError, and one
        the client cannot afford raises InsufficientCredits; neither moves any credit.
        """
        verify_receipt(signed)
        with self._write() as db:
            outcome = self._apply(db, signed.receipt)
        if isinstance(outcome, InsufficientCredits):
            raise outcome  # raised after commit: the accounts it created keep their grants
        return outcome

    def history(self, account: str | None = None, limit: int = 50) -> list[JournalEntry]:
        """The newest journal entries first, optionally only those from or to `account`."""
        with self._lock:
            return journal.entries(self._db, account, limit)

    def top(self, limit: int = 10) -> list[tuple[str, int]]:
        """Accounts by work units earned from others (transfers received), highest first."""
        query = (
            "SELECT dst, SUM(amount) AS earned FROM journal WHERE kind = 'transfer' AND src != dst "
            "GROUP BY dst ORDER BY earned DESC, dst LIMIT ?"
        )
        with self._lock:
            return [(str(account), int(earned)) for account, earned in self._db.execute(query, (limit,))]

    def totals(self) -> tuple[int, int]:
        """(sum of balances, sum of grants) in units: equal, since transfers only move credits."""
        with self._lock:
            row = self._db.execute("SELECT COALESCE(SUM(balance), 0), COALESCE(SUM(granted), 0) FROM accounts")
            balances, grants = row.fetchone()
        return int(balances), int(grants)

    def verify_journal(self) -> tuple[int, str]:
        """Recheck the hash chain and the replayed balances; return (rows, head hash); raise JournalError naming
        the first bad row."""
        with self._lock:
            self._db.execute("BEGIN")  # one snapshot, even while other processes write
            try:
                return journal.verify(self._db)
            finally:
                self._db.execute("ROLLBACK")

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _apply(self, db: sqlite3.Connection, r: Receipt) -> int | InsufficientCredits:
        """The body of apply_receipt, inside its transaction."""
        row = db.execute(
            "SELECT client, client_key, model_key, applied_work, last_seq FROM sessions "
            "WHERE session_id = ? AND node = ?",
            (r.session_id, r.node),
        ).fetchone()
        applied_work = 0
        if row is not None:
            client, client_key, model_key, applied_work, last_seq = row
            if (client, client_key) != (r.client, r.client_key):
                raise ForgedReceiptError("session-owner", f"session {r.session_id} on {r.node} belongs to {client}")
            if model_key != r.model_key:
                raise ForgedReceiptError("malformed", f"session {r.session_id} is for {model_key}, not {r.model_key}")
            if r.seq <= last_seq:
                return 0
            if r.work < applied_work:
                raise ForgedReceiptError(
                    "malformed", f"receipt #{r.seq} claims work {r.work}, less than the {applied_work} applied"
                )
        delta = r.work - applied_work
        self._ensure(db, r.client, r.client_key)
        self._ensure(db, r.node, None)
        balance = int(db.execute("SELECT balance FROM accounts WHERE account = ?", (r.client,)).fetchone()[0])
        if balance < delta:
            return InsufficientCredits(r.client, balance, delta)
        if delta:
            db.execute("UPDATE accounts SET balance = balance - ? WHERE account = ?", (delta, r.client))
            db.execute("UPDATE accounts SET balance = balance + ? WHERE account = ?", (delta, r.node))
            journal.append(db, "transfer", r.client, r.node, delta, r.session_id, r.seq)
        db.execute(
            "INSERT INTO sessions (session_id, node, client, client_key, model_key, applied_work, last_seq) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (session_id, node) DO UPDATE SET "
            "applied_work = excluded.applied_work, last_seq = excluded.last_seq",
            (r.session_id, r.node, r.client, r.client_key, r.model_key, r.work, r.seq),
        )
        return delta

    def _ensure(self, db: sqlite3.Connection, account: str, public_key: str | None) -> int:
        """Create `account` empty if it is new (inside an open write transaction); return its balance."""
        row = db.execute("SELECT balance, public_key FROM accounts WHERE account = ?", (account,)).fetchone()
        if row is not None:
            if public_key is not None and row[1] is None:
                db.execute("UPDATE accounts SET public_key = ? WHERE account = ?", (public_key, account))
            return int(row[0])
        db.execute(
            "INSERT INTO accounts (account, public_key, balance, granted, created_at) VALUES (?, ?, 0, 0, ?)",
            (account, public_key, time.time()),
        )
        return 0

    def _check_format(self) -> None:
        """Refuse a ledger written in whole credits by an earlier hivegen (its journal cannot be rewritten)."""
        tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "accounts" not in tables or "meta" in tables:
            return
        if self._db.execute("SELECT 1 FROM journal LIMIT 1").fetchone() is None:
            self._db.executescript("BEGIN IMMEDIATE; DROP TABLE sessions; COMMIT;")  # empty: adopt it
            return
        raise LedgerFormatError(
            f"{self.path} was written by an earlier hivegen that counted whole credits; its hash-chained journal "
            "cannot be converted to work units. Keep it as a record and start this coordinator with a new --data "
            "directory"
        )

    def _meta(self) -> str:
        """Mark the file as counting work units; return the ledger's id (the salt of its grant proofs)."""
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('amounts', ?)", (AMOUNTS,))
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('ledger_id', ?)", (secrets.token_hex(16),))
            values = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if values["amounts"] != AMOUNTS:
            raise LedgerFormatError(f"{self.path} counts amounts in {values['amounts']!r}, not {AMOUNTS!r}")
        return str(values["ledger_id"])

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: committed if the block returns, rolled back if it raises."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _enable_wal(self) -> None:
        """Switch a file database to WAL; retried because the switch can meet another process's lock."""
        if self.path == ":memory:" or self.path.startswith("file::memory:"):
            return
        for attempt in range(50):
            try:
                mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 49:
                    raise
                time.sleep(0.1)
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"could not switch {self.path} to WAL (journal_mode is {mode})")
