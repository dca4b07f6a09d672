"""Where the coordinator keeps the reports it accepted (SQLite in WAL mode, evidence files named by digest), and
the gRPC service in front of them. The checks themselves are in hivegen.coordinator.reports.

Bounds on what a stranger can make the coordinator keep: at most 20 stored reports per (reporter, node key); at
most 100,000 stored reports in all; at most 1 GiB of evidence files in all (CoordinatorConfig.evidence_budget).
Past a bound new reports are refused with RESOURCE_EXHAUSTED; duplicates (same reporter, same evidence) are
acknowledged without storing anything.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from hivegen.coordinator.reports import CheckedReport, ReportRejected, check_report
from hivegen.credits.identity import account_of
from hivegen.errors import HivegenError
from hivegen.proto import reports_pb2, reports_pb2_grpc
from hivegen.store.encoding import is_ref

logger = logging.getLogger(__name__)

REPORTS_PER_REPORTER_AND_NODE = 20
MAX_REPORTS = 100_000
DEFAULT_EVIDENCE_BUDGET = 1024**3
REPORTS_FILE = "reports.sqlite"
EVIDENCE_DIR = "evidence"

_SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS evidence (digest TEXT PRIMARY KEY, size INTEGER NOT NULL, stored_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS reports (
    row INTEGER PRIMARY KEY,
    node_key TEXT NOT NULL,
    node_id TEXT NOT NULL,
    node_address TEXT NOT NULL,
    model_key TEXT NOT NULL,
    reporter TEXT NOT NULL,
    evidence_digest TEXT NOT NULL REFERENCES evidence (digest),
    error REAL NOT NULL,
    tolerance REAL NOT NULL,
    at REAL NOT NULL,
    received_at REAL NOT NULL,
    UNIQUE (reporter, evidence_digest)
);
CREATE INDEX IF NOT EXISTS reports_by_node ON reports (node_key, reporter);
COMMIT;
"""


class ReportStore:
    """Accepted reports in SQLite (WAL) and their evidence as files named by digest, within the module's bounds."""

    def __init__(
        self,
        data: Path,
        evidence_budget: int = DEFAULT_EVIDENCE_BUDGET,
        per_reporter_and_node: int = REPORTS_PER_REPORTER_AND_NODE,
        max_reports: int = MAX_REPORTS,
    ) -> None:
        self.evidence_dir = data / EVIDENCE_DIR
        self.evidence_dir.mkdir(parents=True, exist_ok=True)
        self.evidence_budget = evidence_budget
        self.per_reporter_and_node = per_reporter_and_node
        self.max_reports = max_reports
        self._lock = threading.Lock()
        self._db = sqlite3.connect(data / REPORTS_FILE, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.executescript(_SCHEMA)

    def add(self, report: CheckedReport, now: Callable[[], float] = time.time) -> int:
        """Keep `report` (a duplicate changes nothing); return how many distinct reporters its node key has.

        Raises ReportRejected("too-many-reports" or "storage-full") past a bound, storing nothing.
        """
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                self._insert(db, report, now())
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return self._reporters(report.node_key)

    def _insert(self, db: sqlite3.Connection, r: CheckedReport, received_at: float) -> None:
        duplicate = "SELECT 1 FROM reports WHERE reporter = ? AND evidence_digest = ?"
        if db.execute(duplicate, (r.reporter, r.digest)).fetchone():
            return
        mine = db.execute("SELECT COUNT(*) FROM reports WHERE node_key = ? AND reporter = ?", (r.node_key, r.reporter))
        if mine.fetchone()[0] >= self.per_reporter_and_node:
            raise ReportRejected(
                "too-many-reports",
                f"{r.reporter} already has {self.per_reporter_and_node} reports of node key {r.node_key[:16]}... "
                "stored; one is enough for anyone to check",
            )
        if db.execute("SELECT COUNT(*) FROM reports").fetchone()[0] >= self.max_reports:
            raise ReportRejected("storage-full", f"the coordinator keeps at most {self.max_reports} reports")
        if not db.execute("SELECT 1 FROM evidence WHERE digest = ?", (r.digest,)).fetchone():
            used = db.execute("SELECT COALESCE(SUM(size), 0) FROM evidence").fetchone()[0]
            if used + len(r.evidence) > self.evidence_budget:
                raise ReportRejected(
                    "storage-full", f"the coordinator's evidence budget of {self.evidence_budget} bytes is spent"
                )
            self._write_evidence(r.digest, r.evidence)
            db.execute("INSERT INTO evidence VALUES (?, ?, ?)", (r.digest, len(r.evidence), received_at))
        db.execute(
            "INSERT INTO reports (node_key, node_id, node_address, model_key, reporter, evidence_digest, error, "
            "tolerance, at, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (r.node_key, r.node_id, r.node_address, r.model_key, r.reporter, r.digest, r.error, r.tolerance, r.at,
             received_at),
        )  # fmt: skip

    def _write_evidence(self, digest: str, data: bytes) -> None:
        """Write `<digest>.pb` so a reader sees either nothing or the whole file (write, fsync, rename)."""
        tmp = self.evidence_dir / f".{digest}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.evidence_dir / f"{digest}.pb")
        finally:
            tmp.unlink(missing_ok=True)

    def _reporters(self, node_key: str) -> int:
        query = "SELECT COUNT(DISTINCT reporter) FROM reports WHERE node_key = ?"
        return int(self._db.execute(query, (node_key,)).fetchone()[0])

    def evidence(self, digest: str) -> bytes | None:
        """The evidence bytes stored under `digest`, or None; ValueError if `digest` is not 64 lowercase hex."""
        if not is_ref(digest):
            raise ValueError(f"{digest[:80]!r} is not an evidence digest (64 lowercase hex characters)")
        with self._lock:
            known = self._db.execute("SELECT 1 FROM evidence WHERE digest = ?", (digest,)).fetchone()
        if not known:
            return None
        data = (self.evidence_dir / f"{digest}.pb").read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise HivegenError(f"evidence file {digest}.pb is corrupt: its SHA-256 differs from its name")
        return data

    def reported_nodes(self) -> list[dict[str, Any]]:
        """Per reported node key: its account, ids, addresses, models, distinct reporters, reports, evidence
        digests and last report time; most reporters first, then most reports."""
        query = "SELECT node_key, node_id, node_address, model_key, reporter, evidence_digest, received_at FROM reports"
        with self._lock:
            rows = self._db.execute(query + " ORDER BY row").fetchall()
        nodes: dict[str, dict[str, Any]] = {}
        for node_key, node_id, address, model_key, reporter, digest, received_at in rows:
            n = nodes.setdefault(
                node_key,
                {"node_key": node_key, "account": account_of(node_key), "node_ids": set(), "addresses": set(),
                 "models": set(), "reporters": set(), "reports": 0, "evidence": [], "last_report_at": 0.0},
            )  # fmt: skip
            n["node_ids"].add(node_id)
            n["addresses"].add(address)
            n["models"].add(model_key)
            n["reporters"].add(reporter)
            n["reports"] += 1
            if digest not in n["evidence"]:
                n["evidence"].append(digest)
            n["last_report_at"] = max(n["last_report_at"], received_at)
        listed = [
            {
                **n,
                **{k: sorted(n[k] - {""}) for k in ("node_ids", "addresses", "models")},
                "reporters": len(n["reporters"]),
            }
            for n in nodes.values()
        ]
        return sorted(listed, key=lambda n: (-n["reporters"], -n["reports"], -n["last_report_at"], n["node_key"]))

    def close(self) -> None:
        with self._lock:
            self._db.close()


class ReportsServicer(reports_pb2_grpc.ReportsServicer):
    """ReportNode checks and keeps a report; ListReports lists the reported nodes."""

    def __init__(self, store: ReportStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    def ReportNode(self, request: reports_pb2.Report, context: grpc.ServicerContext) -> reports_pb2.ReportAck:
        try:
            checked = check_report(request, self.clock())
            reporters = self.store.add(checked, self.clock)
        except ReportRejected as exc:
            logger.info("refused a report from %s: %s", request.reporter[:42], exc)
            context.set_trailing_metadata((("hivegen-error", "report-rejected"), ("hivegen-reason", exc.reason)))
            context.abort(exc.status, str(exc))
        except Exception as exc:  # a bug or a full disk: this call fails, the coordinator keeps serving
            logger.exception("internal error while keeping a report")
            context.abort(grpc.StatusCode.INTERNAL, f"internal error on the coordinator: {type(exc).__name__}: {exc}")
        logger.info(
            "report %s: node %s (%s) off by %.3g on %s; %d reporters",
            checked.digest[:12], checked.node_id, checked.node_address, checked.error, checked.model_key, reporters,
        )  # fmt: skip
        return reports_pb2.ReportAck(evidence_digest=checked.digest, reporters=reporters)

    def ListReports(
        self, request: reports_pb2.ReportsRequest, context: grpc.ServicerContext
    ) -> reports_pb2.ReportsResponse:
        return reports_pb2.ReportsResponse(nodes=[reports_pb2.ReportedNode(**n) for n in self.store.reported_nodes()])
