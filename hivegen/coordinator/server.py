"""A coordinator: the swarm's DHT bootstrap peer, the credit ledger and node reports over gRPC, and an HTTP
status page."""

from __future__ import annotations

import logging
import os
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import hivemind

from hivegen.coordinator.ledger_service import LedgerServicer
from hivegen.coordinator.metrics import coordinator_metrics
from hivegen.coordinator.page import PAGE_CSP, render_page
from hivegen.coordinator.report_store import DEFAULT_EVIDENCE_BUDGET, ReportsServicer, ReportStore
from hivegen.coordinator.reports import MAX_EVIDENCE_BYTES
from hivegen.coordinator.serving import ServingAccounts
from hivegen.coordinator.status import Page, StatusServer, leaderboard, swarm_status
from hivegen.credits.grants import DEFAULT_PROOF_BITS, DEFAULT_STARTER_GRANT
from hivegen.credits.ledger import Ledger
from hivegen.dht import start_dht, visible_maddrs
from hivegen.files import write_json_atomic
from hivegen.proto import ledger_pb2_grpc, reports_pb2_grpc
from hivegen.proto.options import grpc_options

logger = logging.getLogger(__name__)
LEDGER_FILE = "ledger.sqlite"
MESSAGE_OVERHEAD_BYTES = 1 << 20  # a report's fields beside its evidence


@dataclass
class CoordinatorConfig:
    """Everything `hivegen coordinator serve` takes."""

    data: Path  # directory of the ledger and reports databases (SQLite, WAL mode) and of report evidence
    host: str = "127.0.0.1"  # address the services bind and announce
    port: int = 0  # ledger gRPC port (0: any free port)
    dht_port: int = 0  # DHT bootstrap port (0: any free port)
    http_port: int = 0  # status page port (0: any free port)
    starter_grant: int = DEFAULT_STARTER_GRANT  # credits a new account receives once (0: only serving earns)
    grant_proof_bits: int = DEFAULT_PROOF_BITS  # the proof of work a grant costs (2^bits hashes on average)
    ready_file: Path | None = None  # written as JSON once every service is up
    initial_peers: list[str] = field(default_factory=list)  # join an existing swarm instead of starting one
    evidence_budget: int = DEFAULT_EVIDENCE_BUDGET  # bytes of report evidence kept at most; then reports are refused


class Coordinator:
    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.dht: hivemind.DHT | None = None
        self.ledger: Ledger | None = None
        self.reports: ReportStore | None = None
        self.server: grpc.Server | None = None
        self.status: StatusServer | None = None
        self.address = ""
        self._stopped = threading.Event()

    def start(self) -> None:
        cfg = self.config
        # The DHT forks a process: start it before any gRPC object exists.
        self.dht = start_dht(cfg.initial_peers or None, host=cfg.host, port=cfg.dht_port)
        cfg.data.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(cfg.data / LEDGER_FILE, cfg.starter_grant, cfg.grant_proof_bits)
        # Ledger calls are small and reports at most MAX_EVIDENCE_BYTES: a stranger cannot make it read more.
        options = grpc_options(MAX_EVIDENCE_BYTES + MESSAGE_OVERHEAD_BYTES)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=options)
        self.reports = ReportStore(cfg.data, evidence_budget=cfg.evidence_budget)
        servicer = LedgerServicer(self.ledger, ServingAccounts(self.dht))  # receipts pay only announced nodes
        ledger_pb2_grpc.add_LedgerServicer_to_server(servicer, self.server)
        reports_pb2_grpc.add_ReportsServicer_to_server(ReportsServicer(self.reports), self.server)
        port = self.server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        if port == 0:
            raise OSError(f"cannot bind the ledger service on {cfg.host}:{cfg.port}; is the port taken?")
        self.server.start()
        self.address = f"{cfg.host}:{port}"
        dht, ledger, reports = self.dht, self.ledger, self.reports
        self.status = StatusServer(
            cfg.host,
            cfg.http_port,
            {"/status": lambda: swarm_status(dht, reports), "/leaderboard": lambda: leaderboard(ledger)},
            {"/evidence/": reports.evidence},
            pages={
                "/": lambda: Page(render_page(swarm_status(dht, reports), leaderboard(ledger)),
                                  "text/html; charset=utf-8", PAGE_CSP),
                "/metrics": lambda: coordinator_metrics(swarm_status(dht, reports), leaderboard(ledger)),
            },
        )  # fmt: skip
        self.status.start()
        servicer.status_url = self.status_url
        if cfg.ready_file is not None:
            write_json_atomic(cfg.ready_file, self.info())

    @property
    def status_url(self) -> str:
        return f"http://{self.status.address}" if self.status else ""

    def info(self) -> dict[str, object]:
        return {
            "pid": os.getpid(),
            "coordinator": self.address,
            "status_url": self.status_url,
            "initial_peers": visible_maddrs(self.dht) if self.dht else [],
        }

    def stop(self) -> None:
        """Stop serving; the databases are closed last so in-flight calls finish. Idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.status is not None:
            self.status.stop()
        if self.server is not None:
            self.server.stop(grace=2.0).wait(5.0)
        if self.ledger is not None:
            self.ledger.close()
        if self.reports is not None:
            self.reports.close()
        if self.dht is not None:
            self.dht.shutdown()
