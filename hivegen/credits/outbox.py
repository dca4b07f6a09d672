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

from hivegen.credits.receipts import WORK_UNITS_PER_CREDIT, SignedReceipt

_SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS receipts (
    session_id TEXT PRIMARY KEY,
    client TEXT NOT NULL,
    seq INTEGER NOT NULL,
    work INTEGER NOT NULL,
    receipt TEXT NOT NULL,
    submitted_seq INTEGER NOT NULL DEFAULT 0,
    applied_work INTEGER NOT NULL DEFAULT 0,
    outcome TEXT NOT NULL DEFAULT '',
    answered_at REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS receipts_client ON receipts (client);
COMMIT;
"""

# Outboxes of earlier versions counted whole credits: rename the columns and restate them in work units.
_MIGRATE_FROM_CREDITS = f"""
BEGIN IMMEDIATE;
ALTER TABLE receipts RENAME COLUMN credits TO work;
ALTER TABLE receipts RENAME COLUMN applied_credits TO applied_work;
UPDATE receipts SET work = json_extract(receipt, '$.work'),
    applied_work = CASE WHEN outcome = 'applied' AND submitted_seq >= seq THEN json_extract(receipt, '$.work')
                        ELSE applied_work * {WORK_UNITS_PER_CREDIT} END;
COMMIT;
"""

APPLIED = "applied"
INSUFFICIENT = "insufficient"
DEFERRED = "deferred"  # the ledger found no announced node of ours (e.g. the record expired): retried later
REJECTED = "rejected"
_RETRIED = (INSUFFICIENT, DEFERRED)


@dataclass(frozen=True)
class Answer:
    """What the ledger said about one submitted receipt."""

    session_id: str
    seq: int
    work: int  # the submitted receipt's work units (settled if it was applied)
    outcome: str  # APPLIED, INSUFFICIENT or DEFERRED (retried later) or REJECTED (never retried)
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
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(receipts)")}
            if "credits" in columns:
                self._db.executescript(_MIGRATE_FROM_CREDITS)
            self._db.executescript(_SCHEMA)
        except BaseException:
            self._db.close()
            raise

    def keep(self, signed: SignedReceipt) -> None:
        """Record `signed` as its session's latest receipt unless a later one is already kept."""
        r = signed.receipt
        with self._lock:
            self._db.execute(
                "INSERT INTO receipts (session_id, client, seq, work, receipt) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (session_id) DO UPDATE SET seq = excluded.seq, work = excluded.work, "
                "receipt = excluded.receipt WHERE excluded.seq > receipts.seq",
                (r.session_id, r.client, r.seq, r.work, json.dumps(signed.to_dict(), sort_keys=True)),
            )

    def latest(self, session_id: str) -> SignedReceipt | None:
        """The receipt kept for `session_id`, if any."""
        with self._lock:
            row = self._db.execute("SELECT receipt FROM receipts WHERE session_id = ?", (session_id,)).fetchone()
        return SignedReceipt.from_dict(json.loads(row[0])) if row else None

    def due(self, limit: int = 500, retry_after: float = 60.0, deferred_after: float = 5.0) -> list[SignedReceipt]:
        """Receipts the ledger has not answered yet, plus unaffordable ones last tried over `retry_after` s ago
        and deferred ones (our node was not yet announced) over `deferred_after` s ago."""
        now = time.time()
        with self._lock:
            rows = self._db.execute(
                "SELECT receipt FROM receipts WHERE seq > submitted_seq OR (outcome = ? AND answered_at < ?) "
                "OR (outcome = ? AND answered_at < ?) ORDER BY rowid LIMIT ?",
                (INSUFFICIENT, now - retry_after, DEFERRED, now - deferred_after, limit),
            ).fetchall()
        return [SignedReceipt.from_dict(json.loads(row[0])) for row in rows]

    def record(self, answers: list[Answer]) -> None:
        """Store the ledger's answers; an applied receipt settles its work."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for a in answers:
                    self._db.execute(
                        "UPDATE receipts SET submitted_seq = ?, outcome = ?, answered_at = ?, "
                        "applied_work = CASE WHEN ? THEN MAX(applied_work, ?) ELSE applied_work END "
                        "WHERE session_id = ? AND submitted_seq <= ?",
                        (a.seq, a.outcome, now, a.outcome == APPLIED, a.work, a.session_id, a.seq),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def pending_count(self) -> int:
        """Receipts not yet applied by the ledger (waiting, refused for want of credits, or deferred)."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM receipts WHERE seq > submitted_seq OR outcome IN (?, ?)", _RETRIED
            ).fetchone()
        return int(row[0])

    def unsettled_work(self, client: str) -> int:
        """Work units `client` owes this node by receipts the ledger has not applied (rejected ones excluded)."""
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(work - applied_work), 0) FROM receipts WHERE client = ? AND outcome != ?",
                (client, REJECTED),
            ).fetchone()
        return int(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
