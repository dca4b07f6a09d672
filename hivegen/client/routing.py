"""Choose a chain of nodes that covers every block with the lowest estimated time per token.

A node's speed is what the client measured of it (HealthBook.measured) once it has used it; until then, the
throughput its DHT record claims. A claim is a stranger's word: it only decides which unmeasured node to try.

A node's load slows each of its sessions down: the compute part of its cost grows with the sessions open on it
(what its record says, or what this client itself has open there, whichever is more), and every route draws a
small random spread, so clients that look at the same swarm at the same moment do not all pick the same replica.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from hivegen.dht import SpanRecord
from hivegen.errors import NoRouteError


@dataclass(frozen=True)
class Hop:
    """One link of a route: blocks [start, end) served by one node."""

    node_id: str  # "<peer id>@<owner key>"
    address: str
    start: int
    end: int
    dtype: str
    block_seconds: float = 0.0  # expected seconds per block per position (measured, else claimed)

    @property
    def owner(self) -> str:
        """The node's Ed25519 public key (hex): it signs the node's DHT records and answers."""
        return self.node_id.rpartition("@")[2]


@dataclass(frozen=True)
class RoutingCosts:
    """The estimates the router trades off (seconds per decode step)."""

    hop_seconds: float = 0.005  # network round trip + (de)serialisation per node in the chain
    low_cache_seconds: float = 1.0  # penalty for a node without room for the session's cache
    load_share: float = 0.5  # each session open on a node adds this share of its compute time to a new one's
    spread: float = 0.2  # a route sees each node's compute time up to this share slower, drawn at random


def claimed_block_seconds(span: SpanRecord) -> float:
    """Seconds per block per decode step that the record's claimed throughput implies."""
    return 1.0 / (max(span.throughput, 1e-9) * (span.end - span.start))


def step_seconds(
    span: SpanRecord,
    start: int,
    end: int,
    needed_tokens: int,
    costs: RoutingCosts,
    measured: float | None = None,
    slowdown: float = 1.0,
) -> float:
    """Estimated seconds for `span`'s node to run blocks [start, end) for one decode step; `measured` (seconds
    per block, from the client's own timing of the node) wins over the record's claim, and `slowdown` (its load,
    see `slowdowns`) multiplies the compute part."""
    per_block = claimed_block_seconds(span) if measured is None else measured
    penalty = costs.low_cache_seconds if span.cache_tokens_free < needed_tokens else 0.0
    return costs.hop_seconds + (end - start) * per_block * slowdown + penalty


def slowdowns(
    spans: Mapping[str, SpanRecord], own_sessions: Mapping[str, int], costs: RoutingCosts, rng: random.Random
) -> dict[str, float]:
    """node id -> the factor its compute time is expected to grow by for one more session: 1 + load_share per
    session open on it (its record's count, or this client's own `own_sessions` there when more: the record may
    not show them yet), times a random draw in [1, 1 + spread)."""
    return {
        node: (1.0 + costs.load_share * max(span.active_sessions, own_sessions.get(node, 0)))
        * (1.0 + costs.spread * rng.random())
        for node, span in spans.items()
    }


def plan_route(
    spans: Mapping[str, SpanRecord],
    model_key: str,
    start: int,
    end: int,
    *,
    needed_tokens: int = 0,
    exclude: Collection[str] = (),
    costs: RoutingCosts | None = None,
    measured: Mapping[str, float] | None = None,
    slowdown: Mapping[str, float] | None = None,
) -> list[Hop]:
    """Cheapest chain covering blocks [start, end): a shortest path over block boundaries, where each
    node may serve any sub-range of its span. Raises NoRouteError naming the blocks nobody serves."""
    costs = costs or RoutingCosts()
    measured = measured or {}
    slowdown = slowdown or {}
    usable = [s for node, s in spans.items() if node not in exclude and s.state == "online"]
    missing = [b for b in range(start, end) if not any(s.start <= b < s.end for s in usable)]
    if missing:
        raise NoRouteError(model_key, missing)
    best: dict[int, float] = {start: 0.0}
    came_from: dict[int, tuple[int, SpanRecord]] = {}
    queue: list[tuple[float, int]] = [(0.0, start)]
    while queue:
        cost, boundary = heapq.heappop(queue)
        if boundary == end:
            break
        if cost > best.get(boundary, float("inf")):
            continue
        for span in usable:
            if not span.start <= boundary < span.end:
                continue
            for stop in range(boundary + 1, min(span.end, end) + 1):
                total = cost + step_seconds(
                    span, boundary, stop, needed_tokens, costs, measured.get(span.node_id),
                    slowdown.get(span.node_id, 1.0),
                )  # fmt: skip
                if total < best.get(stop, float("inf")):
                    best[stop] = total
                    came_from[stop] = (boundary, span)
                    heapq.heappush(queue, (total, stop))
    route: list[Hop] = []
    boundary = end
    while boundary > start:
        previous, span = came_from[boundary]
        per_block = measured.get(span.node_id, claimed_block_seconds(span))
        route.append(Hop(span.node_id, span.address, previous, boundary, span.dtype, per_block))
        boundary = previous
    return route[::-1]
