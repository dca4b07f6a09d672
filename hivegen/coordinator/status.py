"""The coordinator's HTTP face: `/status` (models, blocks, who serves them, coverage, throughput, reported nodes)
and `/leaderboard` (top contributors), as JSON; `/evidence/<digest>` (a report's raw evidence bytes)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import hivemind

from hivegen.credits.ledger import Ledger
from hivegen.dht import fetch_models, fetch_spans, missing_blocks

if TYPE_CHECKING:
    from hivegen.coordinator.report_store import ReportStore

logger = logging.getLogger(__name__)


def swarm_status(dht: hivemind.DHT, reports: ReportStore | None = None) -> dict[str, Any]:
    """Every registered model with its nodes, the blocks nobody serves, and a throughput estimate; and the nodes
    reported for wrong answers (see hivegen.coordinator.reports)."""
    models = []
    for model_key, info in sorted(fetch_models(dht).items()):
        spans = fetch_spans(dht, model_key, info.num_blocks)
        missing = missing_blocks(spans.values(), info.num_blocks)
        nodes = [
            {
                "node_id": s.node_id,
                "address": s.address,
                "blocks": [s.start, s.end],
                "throughput": s.throughput,
                "cache_tokens_free": s.cache_tokens_free,
                "dtype": s.dtype,
                "version": s.version,
            }
            for s in sorted(spans.values(), key=lambda s: (s.start, s.end))
        ]
        # The slowest block bounds a chain's steps per second: per block, the best node's rate.
        per_block = [
            max((s.throughput * (s.end - s.start) for s in spans.values() if s.start <= b < s.end), default=0.0)
            for b in range(info.num_blocks)
        ]
        models.append(
            {
                "model_key": model_key,
                "name": info.name,
                "num_blocks": info.num_blocks,
                "nodes": nodes,
                "missing_blocks": missing,
                "covered": not missing,
                "steps_per_second_bound": min(per_block) if per_block and not missing else 0.0,
            }
        )
    return {"models": models, "reported_nodes": reports.reported_nodes() if reports is not None else []}


def leaderboard(ledger: Ledger, limit: int = 20) -> dict[str, Any]:
    return {"top": [{"account": account, "earned": earned} for account, earned in ledger.top(limit)]}


BytesRoute = Callable[[str], bytes | None]
"""A prefix route: given the rest of the path, the bytes to send; None for 404, ValueError for 400."""


class StatusServer:
    """A small threaded HTTP server; routes are functions returning JSON-able dicts, byte routes serve files."""

    def __init__(
        self,
        host: str,
        port: int,
        routes: dict[str, Callable[[], dict[str, Any]]],
        byte_routes: dict[str, BytesRoute] | None = None,
    ) -> None:
        routes_, byte_routes_ = routes, byte_routes or {}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                for prefix, byte_route in byte_routes_.items():
                    if path.startswith(prefix):
                        self._send_bytes(byte_route, path[len(prefix) :])
                        return
                route = routes_.get(path.rstrip("/") or "/")
                if route is None:
                    self._send(404, {"error": f"unknown path {self.path}; try {sorted(routes_)}"})
                    return
                try:
                    self._send(200, route())
                except Exception as exc:  # a status page must not take the coordinator down
                    logger.exception("status route %s failed", self.path)
                    self._send(500, {"error": f"{type(exc).__name__}: {exc}"})

            def _send_bytes(self, route: BytesRoute, name: str) -> None:
                try:
                    data = route(name)
                except ValueError as exc:
                    self._send(400, {"error": str(exc)})
                    return
                except Exception as exc:
                    logger.exception("byte route %s failed", self.path)
                    self._send(500, {"error": f"{type(exc).__name__}: {exc}"})
                    return
                if data is None:
                    self._send(404, {"error": f"nothing at {self.path}"})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body, indent=2).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("http: " + format, *args)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.address = f"{host}:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="hivegen-status", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
