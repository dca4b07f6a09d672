"""Choose a chain of nodes that covers every block with the lowest estimated time per token.

A node's speed is what the client measured of it (HealthBook.measured) once it has used it; until then, the
throughput its DHT record claims. A claim is a stranger's word: it only decides which unmeasured node to try.
"""

from __future__ import annotations

import heapq
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


def claimed_block_seconds(span: SpanRecord) -> float:
    """Seconds per block per decode step that the record's claimed throughput implies."""
    return 1.0 / (max(span.throughput, 1e-9) * (span.end - span.start))


def step_seconds(
    span: SpanRecord, start: int, end: int, needed_tokens: int, costs: RoutingCosts, measured: float | None = None
) -> float:
    """Estimated seconds for `span`'s node to run blocks [start, end) for one decode step; `measured` (seconds
    per block, from the client's own timing of the node) wins over the record's claim."""
    per_block = claimed_block_seconds(span) if measured is None else measured
    penalty = costs.low_cache_seconds if span.cache_tokens_free < needed_tokens else 0.0
    return costs.hop_seconds + (end - start) * per_block + penalty


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
) -> list[Hop]:
    """Cheapest chain covering blocks [start, end): a shortest path over block boundaries, where each
    node may serve any sub-range of its span. Raises NoRouteError naming the blocks nobody serves."""
    costs = costs or RoutingCosts()
    measured = measured or {}
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
                total = cost + step_seconds(span, boundary, stop, needed_tokens, costs, measured.get(span.node_id))
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
