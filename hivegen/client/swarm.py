"""The client's view of the swarm for one model: DHT look-ups, routes, node health, bans, and gRPC channels."""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Collection, Mapping, Sequence

import grpc
import hivemind

from hivegen.client.bans import BanList
from hivegen.client.health import HealthBook
from hivegen.client.routing import Hop, RoutingCosts, claimed_block_seconds, plan_route, slowdowns
from hivegen.dht import SpanRecord, fetch_spans, start_dht
from hivegen.errors import NoRouteError
from hivegen.proto import node_pb2, node_pb2_grpc
from hivegen.proto.options import grpc_options

# Witness routes: one more hop always costs more than any node's draw, so a single node is preferred.
WITNESS_COSTS = RoutingCosts(hop_seconds=1000.0, low_cache_seconds=0.0)


EMPTY_SWARM_WAIT = 2.0  # seconds to keep looking when no node of the model is announced at all


class SwarmView:
    """Finds nodes serving `model_key` and hands out stubs to reach them.

    Banned node keys (`bans`) are invisible; nodes that failed recently are left out of routes for a while
    (`health`), and routes use the step times measured here rather than what records claim.
    """

    def __init__(
        self,
        model_key: str,
        num_blocks: int,
        initial_peers: Sequence[str] = (),
        hidden_size: int = 0,
        dht: hivemind.DHT | None = None,
        costs: RoutingCosts | None = None,
        allowed_nodes: Collection[str] | None = None,
        route_wait: float = 0.0,
        heal_wait: float = 0.0,
        spans_ttl: float = 5.0,
        bans: BanList | None = None,
    ) -> None:
        self.model_key = model_key
        self.num_blocks = num_blocks
        self.hidden_size = hidden_size  # width of the hidden states every node must return
        self.bans = bans if bans is not None else BanList(None)
        self.health = HealthBook()
        self.costs = costs or RoutingCosts()
        self.allowed_nodes = set(allowed_nodes) if allowed_nodes is not None else None
        self.route_wait = route_wait  # seconds to keep looking when blocks are missing (nodes starting up)
        self.heal_wait = heal_wait  # ... and after a failure left blocks without a node (one may move there)
        self._own_dht = dht is None
        self.dht = dht if dht is not None else start_dht(list(initial_peers) or None, client_mode=True)
        self.spans_ttl = spans_ttl  # reuse a DHT look-up this long: it costs tens of ms per generation
        self._cached: tuple[float, dict[str, SpanRecord]] | None = None
        self._channels: dict[tuple[str, int], grpc.Channel] = {}
        self._lock = threading.Lock()
        self._rng = random.Random()  # the routes' spread over equal replicas

    def spans(self, fresh: bool = False) -> dict[str, SpanRecord]:
        """Online spans of the model (node id -> record), from a recent look-up unless `fresh`."""
        now = time.monotonic()
        if fresh or self._cached is None or now - self._cached[0] > self.spans_ttl:
            self._cached = (now, fetch_spans(self.dht, self.model_key, self.num_blocks))
        banned = self.bans.owners()
        found = {k: v for k, v in self._cached[1].items() if v.owner not in banned}
        if self.allowed_nodes is not None:
            found = {k: v for k, v in found.items() if k in self.allowed_nodes or v.address in self.allowed_nodes}
        return found

    def route(
        self,
        start: int,
        end: int,
        exclude: Collection[str] = (),
        needed_tokens: int = 0,
        wait: bool = True,
        healing: bool = False,
        failed: Mapping[str, tuple[int, int] | None] | None = None,
    ) -> list[Hop]:
        """The cheapest chain for blocks [start, end) avoiding `exclude`, nodes cooling down after a failure, and
        nodes of `failed` (node id -> the span they failed serving) unless they serve another span now (a node
        that moved is another server: it may heal the gap it left).

        With `wait`, keeps looking up to route_wait seconds while blocks are missing (nodes starting up); a
        re-route after a failure (`healing`) waits heal_wait seconds for them (by default none: a dead node's
        blocks with no replacement are reported at once).
        """
        began = time.monotonic()
        deadline = began + (self.heal_wait if healing else self.route_wait if wait else 0.0)
        fresh = bool(exclude or failed)  # re-routing after a failure: look again
        while True:
            spans = self.spans(fresh)
            avoid = set(exclude) | self.health.excluded() | _still_failing(failed or {}, spans)
            try:
                return plan_route(
                    spans,
                    self.model_key,
                    start,
                    end,
                    needed_tokens=needed_tokens,
                    exclude=avoid,
                    costs=self.costs,
                    measured=self.health.measured(),
                    slowdown=slowdowns(spans, self.health.open_sessions(), self.costs, self._rng),
                )
            except NoRouteError:
                if not fresh:  # the cached view may be stale: look once more before waiting
                    fresh = True
                    continue
                # Nodes of the model that are starting may fill the gaps: wait for them. With no node of the model
                # at all there is nothing to wait for but a record on its way: answer within EMPTY_SWARM_WAIT.
                anyone = bool(self._cached and self._cached[1])
                if time.monotonic() >= (deadline if anyone else min(deadline, began + EMPTY_SWARM_WAIT)):
                    raise
                time.sleep(0.5)

    def witness_route(
        self, start: int, end: int, dtype: str, avoid_owners: Collection[str], trusted: Collection[str],
        rng: random.Random,
    ) -> list[Hop] | None:  # fmt: skip
        """A chain of nodes, owned by none of `avoid_owners`, that can re-run blocks [start, end) in `dtype`; None
        if there is none. Fewest hops first; among those, nodes this client found honest (`trusted`) before
        others, and otherwise at random: never by what records claim, which a liar would game to be picked."""
        avoid = self.health.excluded()
        usable = {
            node: s for node, s in self.spans().items()
            if s.dtype == dtype and s.owner not in avoid_owners and node not in avoid
        }  # fmt: skip
        draw = {node: (0.0 if node in trusted else 0.5) + 0.5 * rng.random() for node in usable}
        try:
            route = plan_route(usable, self.model_key, start, end, costs=WITNESS_COSTS, measured=draw)
        except NoRouteError:
            return None
        measured = self.health.measured()  # deadlines come from what is known of the nodes, not from the draw
        return [
            dataclasses.replace(h, block_seconds=measured.get(h.node_id, claimed_block_seconds(usable[h.node_id])))
            for h in route
        ]

    def channel(self, address: str, receive_limit: int | None = None) -> grpc.Channel:
        """A shared channel to `address` that refuses answers larger than `receive_limit` bytes (rounded up to a
        power of two, so sessions of similar size share a channel)."""
        limit = 0 if receive_limit is None else 1 << max(0, receive_limit - 1).bit_length()
        with self._lock:
            if (address, limit) not in self._channels:
                options = grpc_options()
                if limit:
                    options = [o for o in options if o[0] != "grpc.max_receive_message_length"]
                    options.append(("grpc.max_receive_message_length", limit))
                self._channels[address, limit] = grpc.insecure_channel(address, options=options)
            return self._channels[address, limit]

    def stub(self, address: str, receive_limit: int | None = None) -> node_pb2_grpc.NodeStub:
        return node_pb2_grpc.NodeStub(self.channel(address, receive_limit))

    def node_info(self, address: str, timeout: float = 10.0) -> node_pb2.NodeInfo:
        return self.stub(address).Info(node_pb2.InfoRequest(), timeout=timeout)

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
        if self._own_dht:
            self.dht.shutdown()


def _still_failing(failed: Mapping[str, tuple[int, int] | None], spans: Mapping[str, SpanRecord]) -> set[str]:
    """The failed nodes to keep out: all but those that announce another span than the one they failed at."""
    return {
        node for node, at in failed.items()
        if at is None or node not in spans or (spans[node].start, spans[node].end) == at
    }  # fmt: skip
