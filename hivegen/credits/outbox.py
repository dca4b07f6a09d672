"""A node's receipt outbox: the latest verified receipt of every paid session, kept durably until the ledger
has applied it.

One SQLite file (WAL mode). A receipt is written before the step it pays for is served, and a kill -9 at
any moment leaves the last committed receipt of each session on disk, so a restarted node submits what it
earned. Only the latest receipt per session is kept: receipts are cumulative.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hivegen.credits.receipts import SignedReceipt

_SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS receipts (
    session_id TEXT PRIMARY KEY,
    client TEXT NOT NULL,
    seq INTEGER NOT NULL,
    credits INTEGER NOT NULL,
    receipt TEXT NOT NULL,
    submitted_seq INTEGER NOT NULL DEFAULT 0,
    applied_credits INTEGER NOT NULL DEFAULT 0,
    outcome TEXT NOT NULL DEFAULT '',
    answered_at REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS receipts_client ON receipts (client);
COMMIT;
"""

APPLIED = "applied"
INSUFFICIENT = "insufficient"
REJECTED = "rejected"


@dataclass(frozen=True)
class Answer:
    """What the ledger said about one submitted receipt."""

    session_id: str
    seq: int
    credits: int  # the submitted receipt's credits (settled if it was applied)
    outcome: str  # APPLIED, INSUFFICIENT (retried later) or REJECTED (never retried)
    detail: str = ""


class ReceiptOutbox:
    """Latest receipt per session, what the ledger has applied, and what is still owed."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA busy_timeout = 30000")
            if self.path != ":memory:":
                self._db.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode: a commit survives the process being killed (not a power cut), and costs
            # no fsync on the step's critical path.
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.executescript(_SCHEMA)
        except BaseException:
            self._db.close()
            raise

    def keep(self, signed: SignedReceipt) -> None:
        """Record `signed` as its session's latest receipt unless a later one is already kept."""
        r = signed.receipt
        with self._lock:
            self._db.execute(
                "INSERT INTO receipts (session_id, client, seq, credits, receipt) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (session_id) DO UPDATE SET seq = excluded.seq, credits = excluded.credits, "
                "receipt = excluded.receipt WHERE excluded.seq > receipts.seq",
                (r.session_id, r.client, r.seq, r.credits, json.dumps(signed.to_dict(), sort_keys=True)),
            )

    def latest(self, session_id: str) -> SignedReceipt | None:
        """The receipt kept for `session_id`, if any."""
        with self._lock:
            row = self._db.execute("SELECT receipt FROM receipts WHERE session_id = ?", (session_id,)).fetchone()
        return SignedReceipt.from_dict(json.loads(row[0])) if row else None

    def due(self, limit: int = 500, retry_after: float = 60.0) -> list[SignedReceipt]:
        """Receipts the ledger has not answered yet, plus unaffordable ones last tried over `retry_after` s ago."""
        with self._lock:
            rows = self._db.execute(
                "SELECT receipt FROM receipts WHERE seq > submitted_seq "
                "OR (outcome = ? AND answered_at < ?) ORDER BY rowid LIMIT ?",
                (INSUFFICIENT, time.time() - retry_after, limit),
            ).fetchall()
        return [SignedReceipt.from_dict(json.loads(row[0])) for row in rows]

    def record(self, answers: list[Answer]) -> None:
        """Store the ledger's answers; an applied receipt settles its credits."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for a in answers:
                    self._db.execute(
                        "UPDATE receipts SET submitted_seq = ?, outcome = ?, answered_at = ?, "
                        "applied_credits = CASE WHEN ? THEN MAX(applied_credits, ?) ELSE applied_credits END "
                        "WHERE session_id = ? AND submitted_seq <= ?",
                        (a.seq, a.outcome, now, a.outcome == APPLIED, a.credits, a.session_id, a.seq),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def pending_count(self) -> int:
        """Receipts not yet applied by the ledger (waiting, or refused for want of credits)."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM receipts WHERE seq > submitted_seq OR outcome = ?", (INSUFFICIENT,)
            ).fetchone()
        return int(row[0])

    def unsettled_credits(self, client: str) -> int:
        """Credits `client` owes this node by receipts the ledger has not applied (rejected ones excluded)."""
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(credits - applied_credits), 0) FROM receipts WHERE client = ? AND outcome != ?",
                (client, REJECTED),
            ).fetchone()
        return int(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
