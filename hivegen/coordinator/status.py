"""The coordinator's HTTP face: `/status` (models, blocks, who serves them, coverage, throughput, reported nodes)
and `/leaderboard` (top contributors), as JSON; `/evidence/<digest>` (a report's raw evidence bytes).

Everything shown comes from strangers: the DHT's records are bounded when read (hivegen.dht.models, .records), the
answer is bounded here (models, nodes, reported nodes; every DHT lookup has a timeout and the whole answer a
deadline), and JSON is escaped so that a browser opening it never sees markup.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import hivemind

from hivegen.credits.identity import account_of
from hivegen.credits.ledger import Ledger
from hivegen.credits.units import credits_value
from hivegen.dht import ModelInfo, SpanRecord, fetch_models, fetch_spans

if TYPE_CHECKING:
    from hivegen.coordinator.report_store import ReportStore

logger = logging.getLogger(__name__)

MAX_STATUS_MODELS = 64  # models /status looks up and lists (by model key); the rest are counted in models_total
MAX_STATUS_NODES = 256  # nodes listed per model; coverage and the throughput bound still count every node
MAX_STATUS_REPORTED_NODES = 256  # reported nodes listed (most reporters first)
STATUS_DEADLINE_S = 10.0  # one /status answer spends at most this long waiting on the DHT
LOOKUP_TIMEOUT_S = 5.0  # one DHT lookup (the registry, or one model's blocks); a late model is listed with an error
REQUEST_WAIT_S = 3.0  # an HTTP request waits at most this long for a fresh answer...
STALE_LIMIT_S = 300.0  # ...then gets the last one if it is at most this old (with an Age header), else 503
MAX_ERROR_CHARS = 500  # error texts sent over HTTP are cut to this length


def swarm_status(
    dht: hivemind.DHT,
    reports: ReportStore | None = None,
    deadline_s: float = STATUS_DEADLINE_S,
    lookup_timeout_s: float = LOOKUP_TIMEOUT_S,
) -> dict[str, Any]:
    """Every registered model with its nodes, the blocks nobody serves, and a throughput estimate; and the nodes
    reported for wrong answers (see hivegen.coordinator.reports).

    Returns within about `deadline_s` seconds whatever the DHT holds: a model whose lookup fails or comes too late
    is listed with an "error" and no nodes; an unreadable registry gives no models and a top-level "error".
    """
    deadline = time.monotonic() + deadline_s
    answer: dict[str, Any] = {"models": []}
    try:
        registry = fetch_models(dht, timeout=min(lookup_timeout_s, deadline_s))
    except Exception as exc:  # a status page reports a broken DHT rather than failing
        logger.warning("status: could not read the model registry: %s", exc)
        registry = {}
        answer["error"] = _cut(f"could not read the model registry: {exc}")
    for _, info in sorted(registry.items())[:MAX_STATUS_MODELS]:
        answer["models"].append(_model_status(dht, info, min(lookup_timeout_s, deadline - time.monotonic())))
    answer["models_total"] = len(registry)
    answer["models_truncated"] = len(registry) > MAX_STATUS_MODELS
    reported = reports.reported_nodes() if reports is not None else []
    answer["reported_nodes"] = reported[:MAX_STATUS_REPORTED_NODES]
    answer["reported_nodes_truncated"] = len(reported) > MAX_STATUS_REPORTED_NODES
    return answer


def _model_status(dht: hivemind.DHT, info: ModelInfo, timeout: float) -> dict[str, Any]:
    """One model's entry of /status, looked up within `timeout` seconds; on failure the same shape plus "error"."""
    spans: list[SpanRecord] = []
    error = None
    if timeout <= 0:
        error = "not looked up: the status deadline had passed"
    else:
        try:
            spans = sorted(
                fetch_spans(dht, info.model_key, info.num_blocks, timeout=timeout).values(),
                key=lambda s: (s.start, s.end, s.node_id),
            )
        except Exception as exc:  # one broken or slow model must not take the others down
            logger.warning("status: could not look up the nodes of %.80r: %s", info.model_key, exc)
            error = _cut(f"could not look up its nodes: {exc}")
    missing, bound = _coverage(spans, info.num_blocks)
    entry: dict[str, Any] = {
        "model_key": info.model_key,
        "name": info.name,
        "num_blocks": info.num_blocks,
        "nodes": [
            {
                "node_id": s.node_id,
                "account": account_of(s.owner),
                "address": s.address,
                "blocks": [s.start, s.end],
                "throughput": s.throughput,
                "active_sessions": s.active_sessions,
                "cache_tokens_free": s.cache_tokens_free,
                "cache_tokens_total": s.cache_tokens_total,
                "dtype": s.dtype,
                "version": s.version,
                "updated_at": s.updated_at,
            }
            for s in spans[:MAX_STATUS_NODES]
        ],
        "nodes_total": len(spans),
        "nodes_truncated": len(spans) > MAX_STATUS_NODES,
        "missing_blocks": missing,
        "covered": not missing,
        "steps_per_second_bound": bound,
    }
    if error is not None:
        entry["error"] = error
    return entry


def _coverage(spans: list[SpanRecord], num_blocks: int) -> tuple[list[int], float]:
    """The blocks no span covers, and the slowest block's best rate (0.0 unless every block is covered).

    The slowest block bounds a chain's steps per second: per block, the best node's rate. One sweep over the
    blocks with a heap of the spans covering the current block, so many nodes cost n log n, not n x blocks.
    """
    by_start = sorted(spans, key=lambda s: s.start)
    covering: list[tuple[float, int]] = []  # (-rate, end) of the spans started so far
    missing: list[int] = []
    slowest, next_span = math.inf, 0
    for block in range(num_blocks):
        while next_span < len(by_start) and by_start[next_span].start <= block:
            span = by_start[next_span]
            heapq.heappush(covering, (-span.throughput * (span.end - span.start), span.end))
            next_span += 1
        while covering and covering[0][1] <= block:
            heapq.heappop(covering)
        if covering:
            slowest = min(slowest, -covering[0][0])
        else:
            missing.append(block)
    return missing, (slowest if num_blocks > 0 and not missing else 0.0)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def leaderboard(ledger: Ledger, limit: int = 20) -> dict[str, Any]:
    """The accounts that earned most: credits (with decimals) and the exact work units."""
    return {
        "top": [
            {"account": account, "earned": credits_value(units), "earned_units": units}
            for account, units in ledger.top(limit)
        ]
    }


BytesRoute = Callable[[str], bytes | None]
"""A prefix route: given the rest of the path, the bytes to send; None for 404, ValueError for 400."""
JsonRoute = Callable[[], dict[str, Any]]

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",  # a browser never guesses HTML out of JSON or evidence bytes
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",  # and runs nothing from them
}


def json_bytes(body: object) -> bytes:
    """JSON a browser cannot mistake for markup: "<", ">" and "&" only occur inside strings, and are escaped there
    (ensure_ascii escapes every other non-ASCII character, U+2028 and U+2029 included). Still valid JSON."""
    text = json.dumps(body, indent=2)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode("ascii")


class RouteTimeout(Exception):
    """No answer within the request's wait and none recent enough to serve instead (503)."""


class RouteFailed(Exception):
    """The route's computation raised (500); the message names what went wrong."""


@dataclass
class _Run:
    """One computation of a route, shared by every request that arrives while it runs."""

    done: threading.Event = field(default_factory=threading.Event)
    value: dict[str, Any] | None = None
    error: str | None = None


class BoundedRoute:
    """A JSON route computed off the request threads, one computation at a time.

    A request joins the computation running now (or starts one) and waits at most `wait_s` seconds for it; if it
    is late, the request gets the last answer when that is at most `stale_s` seconds old, with its age, else
    RouteTimeout. A flood of requests costs one computation at a time, and a slow DHT delays how fresh the page
    is, never the answer.
    """

    def __init__(self, compute: JsonRoute, name: str, wait_s: float = REQUEST_WAIT_S, stale_s: float = STALE_LIMIT_S):
        self.compute = compute
        self.name = name
        self.wait_s = wait_s
        self.stale_s = stale_s
        self._lock = threading.Lock()
        self._running: _Run | None = None
        self._last: tuple[float, dict[str, Any]] | None = None  # (when its computation started, answer)

    def __call__(self) -> tuple[dict[str, Any], float | None]:
        """The answer and, when it is an earlier one served because the current computation is late, its age."""
        with self._lock:
            run = self._running
            if run is None:
                run = self._running = _Run()
                worker = threading.Thread(target=self._compute, args=(run,), name=f"status{self.name}", daemon=True)
                worker.start()
        if run.done.wait(self.wait_s):
            if run.error is not None:
                raise RouteFailed(run.error)
            assert run.value is not None
            return run.value, None
        with self._lock:
            last = self._last
        if last is not None and time.monotonic() - last[0] <= self.stale_s:
            return last[1], time.monotonic() - last[0]
        raise RouteTimeout(f"{self.name} is taking longer than {self.wait_s:g} s; try again in a few seconds")

    def _compute(self, run: _Run) -> None:
        started = time.monotonic()
        try:
            run.value = self.compute()
        except Exception as exc:  # handed to every request waiting for this run
            logger.exception("status route %s failed", self.name)
            run.error = _cut(f"{type(exc).__name__}: {exc}")
        with self._lock:
            if run.value is not None:
                self._last = (started, run.value)
            self._running = None
        run.done.set()


@dataclass(frozen=True)
class Page:
    """A text answer (HTML, Prometheus metrics) and the headers it is served with."""

    text: str
    content_type: str
    csp: str = SECURITY_HEADERS["Content-Security-Policy"]


PageRoute = Callable[[], Page]


class StatusServer:
    """A small threaded HTTP server; routes are functions returning JSON-able dicts, page routes return a Page
    (each run as a BoundedRoute), byte routes serve files. Every response carries SECURITY_HEADERS; errors are
    JSON."""

    def __init__(
        self,
        host: str,
        port: int,
        routes: dict[str, JsonRoute],
        byte_routes: dict[str, BytesRoute] | None = None,
        wait_s: float = REQUEST_WAIT_S,
        stale_s: float = STALE_LIMIT_S,
        pages: dict[str, PageRoute] | None = None,
    ) -> None:
        routes_ = {path: BoundedRoute(route, path, wait_s, stale_s) for path, route in routes.items()}
        for path, page in (pages or {}).items():
            routes_[path] = BoundedRoute(lambda page=page: {"page": page()}, path, wait_s, stale_s)  # type: ignore[misc]
        byte_routes_ = byte_routes or {}

        class Handler(BaseHTTPRequestHandler):
            timeout = 30  # seconds a connection may sit idle or trickle; a stranger cannot hold a thread forever

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                for prefix, byte_route in byte_routes_.items():
                    if path.startswith(prefix):
                        self._send_bytes(byte_route, path[len(prefix) :])
                        return
                route = routes_.get(path.rstrip("/") or "/")
                if route is None:
                    self._send(404, {"error": f"unknown path {self.path[:200]}; try {sorted(routes_)}"})
                    return
                try:
                    body, age = route()
                except RouteTimeout as exc:
                    self._send(503, {"error": str(exc)}, {"Retry-After": "5"})
                except Exception as exc:  # a status page must not take the coordinator down
                    self._send(500, {"error": _cut(str(exc) if isinstance(exc, RouteFailed) else repr(exc))})
                else:
                    headers = {"Age": str(int(age))} if age is not None else {}
                    if isinstance(body.get("page"), Page):
                        self._send_page(body["page"], headers)
                    else:
                        self._send(200, body, headers)

            def _send_page(self, page: Page, headers: dict[str, str]) -> None:
                data = page.text.encode()
                self.send_response(200)
                self.send_header("Content-Type", page.content_type)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                for name, value in headers.items():
                    self.send_header(name, value)
                self._csp = page.csp
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _send_bytes(self, route: BytesRoute, name: str) -> None:
                try:
                    data = route(name)
                except ValueError as exc:
                    self._send(400, {"error": _cut(str(exc))})
                    return
                except Exception as exc:
                    logger.exception("byte route %.200s failed", self.path)
                    self._send(500, {"error": _cut(f"{type(exc).__name__}: {exc}")})
                    return
                if data is None:
                    self._send(404, {"error": f"nothing at {self.path[:200]}"})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Disposition", "attachment")  # stranger-supplied bytes: save, never show
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _send(self, code: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json_bytes(body)
                self.send_response(code)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
                """Malformed requests and unsupported methods: JSON with the same headers, not an HTML page."""
                self.close_connection = True
                reason = message or self.responses.get(code, ("error",))[0]
                self._send(code, {"error": _cut(reason)}, {"Connection": "close"})

            def end_headers(self) -> None:
                csp = getattr(self, "_csp", "") or SECURITY_HEADERS["Content-Security-Policy"]
                self._csp = ""
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("Content-Security-Policy", csp)
                super().end_headers()

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
