"""What a client has learnt about nodes by using them: measured step times, recent failures, step deadlines.

A DHT record's claimed throughput is only a hint, written by a stranger. Once the client has timed a node's
steps it routes and sets deadlines on its own measurements; a node that failed is left alone for a cool-down
that doubles with every failure, so a record pointing at a dead or silent address costs one attempt, not one per
generation.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

MIN_STEP_TIMEOUT = 2.0  # seconds: no step deadline is shorter, however fast a node claims or seems to be
MAX_STEP_TIMEOUT = 120.0  # seconds: nor longer, however slow it claims to be (a prefill of many thousand tokens)
MAX_CLAIMED_BLOCK_SECONDS = 0.5  # a claim of a slower block is not believed (a 70B block decodes in ~50 ms on CPU)
TIMEOUT_FACTOR = 10.0  # a step may take this many times its expected duration before the node is abandoned
COOLDOWN_SECONDS = 10.0  # a node's first failure keeps it out of routes this long; each further one doubles it
MAX_COOLDOWN_SECONDS = 600.0
EWMA_WEIGHT = 0.3  # weight of the newest measurement


@dataclass
class NodeHealth:
    """One node as this client has seen it."""

    block_seconds: float | None = None  # measured wall seconds per block of a decode step (EWMA)
    steps: int = 0
    failures: int = 0  # consecutive failures; a success resets it
    excluded_until: float = 0.0  # time.monotonic() before which routes leave the node out
    last_error: str = ""


class HealthBook:
    """Thread-safe per-node measurements shared by every session of one client."""

    def __init__(self) -> None:
        self._nodes: dict[str, NodeHealth] = {}
        self._open: dict[str, int] = {}  # node id -> sessions this client has open on it now
        self._lock = threading.Lock()

    def opened(self, node_id: str) -> None:
        """A session on the node opened (its load, as this client knows it before any record says so)."""
        with self._lock:
            self._open[node_id] = self._open.get(node_id, 0) + 1

    def closed(self, node_id: str) -> None:
        with self._lock:
            left = self._open.get(node_id, 0) - 1
            if left > 0:
                self._open[node_id] = left
            else:
                self._open.pop(node_id, None)

    def open_sessions(self) -> dict[str, int]:
        """node id -> sessions this client has open on it."""
        with self._lock:
            return dict(self._open)

    def observe(self, node_id: str, seconds: float, blocks: int, positions: int) -> None:
        """Record a successful step of `positions` new positions through `blocks` blocks taking `seconds` (wall).

        Only decode steps (one position) feed the estimate: a prefill's cost per position is far lower, and
        expecting a decode step to be that fast would make deadlines and routes wrong.
        """
        per = seconds / max(1, blocks)
        with self._lock:
            node = self._nodes.setdefault(node_id, NodeHealth())
            if positions == 1:
                node.block_seconds = per if node.block_seconds is None else (
                    EWMA_WEIGHT * per + (1 - EWMA_WEIGHT) * node.block_seconds
                )  # fmt: skip
            node.steps += 1
            node.failures = 0

    def failed(self, node_id: str, error: str) -> None:
        """Record a failure: the node stays out of routes for a cool-down that doubles with each failure in a row."""
        with self._lock:
            node = self._nodes.setdefault(node_id, NodeHealth())
            node.failures += 1
            cooldown = min(MAX_COOLDOWN_SECONDS, COOLDOWN_SECONDS * 2 ** (node.failures - 1))
            node.excluded_until = time.monotonic() + cooldown
            node.last_error = error

    def excluded(self) -> set[str]:
        """Nodes still cooling down after a failure."""
        now = time.monotonic()
        with self._lock:
            return {node_id for node_id, node in self._nodes.items() if node.excluded_until > now}

    def measured(self) -> dict[str, float]:
        """node id -> measured seconds per block per position, for nodes this client has timed."""
        with self._lock:
            return {node_id: n.block_seconds for node_id, n in self._nodes.items() if n.block_seconds is not None}

    def get(self, node_id: str) -> NodeHealth | None:
        with self._lock:
            node = self._nodes.get(node_id)
            return None if node is None else NodeHealth(**vars(node))

    def step_timeout(self, node_id: str, claimed_block_seconds: float, blocks: int, positions: int) -> float:
        """The deadline for a step: TIMEOUT_FACTOR times its expected duration, within [MIN_STEP_TIMEOUT,
        MAX_STEP_TIMEOUT].

        The expectation comes from this client's own measurements of the node, else from the node's claimed
        throughput, believed only up to MAX_CLAIMED_BLOCK_SECONDS: a node that claims to be fast only earns
        itself a short deadline, and one that claims to be slow cannot buy itself a long one.
        """
        with self._lock:
            node = self._nodes.get(node_id)
            per = node.block_seconds if node is not None and node.block_seconds is not None else None
        per = min(claimed_block_seconds, MAX_CLAIMED_BLOCK_SECONDS) if per is None else per
        expected = TIMEOUT_FACTOR * per * max(1, blocks) * max(1, positions)
        return min(MAX_STEP_TIMEOUT, max(MIN_STEP_TIMEOUT, expected))
