"""`hivegen node serve --metrics-port P`: the node's counters in Prometheus format (steps, tokens, sessions,
errors, a step-latency histogram, cache use), read from the session manager when scraped."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hivegen.node.sessions import SessionManager

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _SessionCollector(Collector):
    def __init__(self, sessions: SessionManager) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[Metric]:
        s = self.sessions
        c, batches = s.counters, s.scheduler.stats
        for name, doc, value in (
            ("steps", "Steps run (prefills and decode steps)", c.steps),
            ("tokens_processed", "Positions run through the span, over batch rows", c.tokens_processed),
            ("sessions_opened", "Sessions opened", c.sessions_opened),
            ("errors", "Requests refused with an error status", c.errors),
            ("compute_seconds", "Seconds spent running the span", c.compute_seconds),
            ("forwards", "Forward passes run (one may serve several sessions' steps)", batches.forwards),
            (
                "batched_steps",
                "Steps that shared their forward with another session's",
                s.scheduler.stats.batched_steps,
            ),
            ("batch_waits", "Forwards that waited for other sessions' due steps to batch them", batches.waits),
            ("batch_wait_seconds", "Seconds forwards waited for other sessions' due steps", batches.wait_seconds),
        ):
            yield CounterMetricFamily(f"hivegen_node_{name}", doc, value=value)
        free = s.cache_tokens_free
        for name, doc, value in (
            ("active_sessions", "Sessions open now", s.active_sessions),
            ("cache_tokens_total", "The KV-cache budget, in tokens", s.cache_tokens_total),
            ("cache_tokens_free", "Cache tokens not reserved by a session", free),
            ("cache_tokens_used", "Cache tokens reserved by open sessions", s.cache_tokens_total - free),
            ("cache_bytes_total", "Memory of the KV-cache pool", s.cache_bytes_total),
            ("max_batch_rows", "The most sequences one forward has run", batches.max_rows),
        ):
            yield GaugeMetricFamily(f"hivegen_node_{name}", doc, value=value)


class NodeMetrics:
    """A Prometheus endpoint for one node, on its own registry (never the process-global one)."""

    def __init__(self, sessions: SessionManager) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_SessionCollector(sessions))
        self.step_seconds = Histogram(
            "hivegen_node_step_seconds", "Seconds one step took on the span", buckets=STEP_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        sessions.on_step = self.step_seconds.observe
        self.batch_rows = Histogram(
            "hivegen_node_batch_rows", "Sequences run by one forward", buckets=BATCH_BUCKETS, registry=self.registry
        )
        sessions.scheduler.on_forward = lambda rows, _seconds: self.batch_rows.observe(rows)
        self._server: Any = None

    def start(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0: any free port); return the port."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
