"""The client's view of the swarm for one model: DHT look-ups, routes, and cached gRPC channels."""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Sequence

import grpc
import hivemind

from hivegen.client.routing import Hop, RoutingCosts, plan_route
from hivegen.dht import SpanRecord, fetch_spans, start_dht
from hivegen.errors import NoRouteError
from hivegen.proto import node_pb2, node_pb2_grpc
from hivegen.proto.options import grpc_options


class SwarmView:
    """Finds nodes serving `model_key` and hands out stubs to reach them."""

    def __init__(
        self,
        model_key: str,
        num_blocks: int,
        initial_peers: Sequence[str] = (),
        dht: hivemind.DHT | None = None,
        costs: RoutingCosts | None = None,
        allowed_nodes: Collection[str] | None = None,
        route_wait: float = 0.0,
        spans_ttl: float = 5.0,
    ) -> None:
        self.model_key = model_key
        self.num_blocks = num_blocks
        self.costs = costs or RoutingCosts()
        self.allowed_nodes = set(allowed_nodes) if allowed_nodes is not None else None
        self.route_wait = route_wait  # seconds to keep looking when blocks are missing (nodes starting up)
        self._own_dht = dht is None
        self.dht = dht if dht is not None else start_dht(list(initial_peers) or None, client_mode=True)
        self.spans_ttl = spans_ttl  # reuse a DHT look-up this long: it costs tens of ms per generation
        self._cached: tuple[float, dict[str, SpanRecord]] | None = None
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def spans(self, fresh: bool = False) -> dict[str, SpanRecord]:
        """Online spans of the model (node id -> record), from a recent look-up unless `fresh`."""
        now = time.monotonic()
        if fresh or self._cached is None or now - self._cached[0] > self.spans_ttl:
            self._cached = (now, fetch_spans(self.dht, self.model_key, self.num_blocks))
        found = self._cached[1]
        if self.allowed_nodes is not None:
            found = {k: v for k, v in found.items() if k in self.allowed_nodes or v.address in self.allowed_nodes}
        return found

    def route(self, start: int, end: int, exclude: Collection[str] = (), needed_tokens: int = 0) -> list[Hop]:
        """The cheapest chain for blocks [start, end), waiting up to route_wait seconds for coverage."""
        deadline = time.monotonic() + self.route_wait
        fresh = bool(exclude)  # re-routing after a failure: look again
        while True:
            try:
                return plan_route(
                    self.spans(fresh),
                    self.model_key,
                    start,
                    end,
                    needed_tokens=needed_tokens,
                    exclude=exclude,
                    costs=self.costs,
                )
            except NoRouteError:
                if not fresh:  # the cached view may be stale: look once more before waiting
                    fresh = True
                    continue
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    def channel(self, address: str) -> grpc.Channel:
        with self._lock:
            if address not in self._channels:
                self._channels[address] = grpc.insecure_channel(address, options=grpc_options())
            return self._channels[address]

    def stub(self, address: str) -> node_pb2_grpc.NodeStub:
        return node_pb2_grpc.NodeStub(self.channel(address))

    def node_info(self, address: str, timeout: float = 10.0) -> node_pb2.NodeInfo:
        return self.stub(address).Info(node_pb2.InfoRequest(), timeout=timeout)

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
        if self._own_dht:
            self.dht.shutdown()
