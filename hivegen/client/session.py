"""Inference sessions: hidden states streamed through a chain of nodes, each keeping its own KV cache."""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import torch

from hivegen.client.routing import Hop
from hivegen.client.swarm import SwarmView
from hivegen.errors import RemoteError, SessionError
from hivegen.proto import node_pb2
from hivegen.proto.tensors import deserialize, dtype_from_name, serialize

logger = logging.getLogger(__name__)

# Errors after which a node is dropped and its blocks re-routed; others (bad input) are raised.
RETRIABLE_CODES = frozenset(
    code.name
    for code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.RESOURCE_EXHAUSTED,  # node full
    )
)
_CLOSE = object()


@dataclass
class StepInputs:
    """What was sent to a hop in one step: enough to rebuild its cache on a replacement node."""

    hidden: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor


class SpanSession:
    """One bidirectional stream to one node, serving blocks [hop.start, hop.end) for a session."""

    def __init__(self, swarm: SwarmView, hop: Hop, max_length: int, batch_size: int, timeout: float) -> None:
        self.hop = hop
        self.session_id = uuid.uuid4().hex
        self.timeout = timeout
        self.dtype = dtype_from_name(hop.dtype)
        self.history: list[StepInputs] = []
        self._requests: queue.Queue[object] = queue.Queue()
        self._responses: queue.Queue[object] = queue.Queue()
        self._call = swarm.stub(hop.address).Inference(self._request_iter())
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"hivegen-read-{hop.address}")
        self._reader.start()
        request = node_pb2.InferenceRequest(
            open=node_pb2.OpenSession(
                session_id=self.session_id,
                model_key=swarm.model_key,
                start_block=hop.start,
                end_block=hop.end,
                max_length=max_length,
                batch_size=batch_size,
            )
        )
        try:
            opened = self._exchange(request)
            if opened.WhichOneof("kind") != "opened":
                raise RemoteError(hop.address, "INTERNAL", "expected `opened` as the first answer")
        except BaseException:
            self.close()  # ends the stream and its reader thread
            raise

    def step(self, inputs: StepInputs) -> tuple[torch.Tensor, float]:
        """Send one step; return the hop's output hidden states and the node's compute seconds."""
        request = node_pb2.InferenceRequest(
            step=node_pb2.Step(
                session_id=self.session_id,
                step_id=len(self.history),
                hidden_states=serialize(inputs.hidden.to(self.dtype)),
                position_ids=serialize(inputs.position_ids),
                attention_mask=serialize(inputs.attention_mask),
            )
        )
        response = self._exchange(request)
        self.history.append(inputs)
        return deserialize(response.result.hidden_states), response.result.compute_seconds

    def close(self) -> None:
        self._requests.put(_CLOSE)
        self._call.cancel()

    def _exchange(self, request: node_pb2.InferenceRequest) -> node_pb2.InferenceResponse:
        self._requests.put(request)
        try:
            item = self._responses.get(timeout=self.timeout)
        except queue.Empty:
            self._call.cancel()
            raise RemoteError(self.hop.address, "DEADLINE_EXCEEDED", f"no answer within {self.timeout:.0f} s") from None
        if isinstance(item, grpc.RpcError):
            code = item.code() if hasattr(item, "code") else grpc.StatusCode.UNKNOWN
            raise RemoteError(self.hop.address, code.name, item.details() if hasattr(item, "details") else str(item))
        assert isinstance(item, node_pb2.InferenceResponse)
        return item

    def _request_iter(self) -> Iterator[node_pb2.InferenceRequest]:
        while (item := self._requests.get()) is not _CLOSE:
            yield item  # type: ignore[misc]

    def _read(self) -> None:
        try:
            for response in self._call:
                self._responses.put(response)
            self._responses.put(grpc.RpcError("stream closed by the node"))
        except grpc.RpcError as exc:
            self._responses.put(exc)


@dataclass
class StepTiming:
    """Per-step measurements the client keeps (and a store can record later)."""

    seconds: float
    node_seconds: list[float] = field(default_factory=list)


class InferenceSession:
    """Runs every block of the model for one generation, re-routing around nodes that fail."""

    def __init__(
        self, swarm: SwarmView, max_length: int, batch_size: int, timeout: float = 60.0, max_failovers: int = 3
    ) -> None:
        self.swarm = swarm
        self.max_length = max_length
        self.batch_size = batch_size
        self.timeout = timeout
        self.max_failovers = max_failovers
        self.failed_nodes: set[str] = set()
        self.spans: list[SpanSession] = []
        self.timings: list[StepTiming] = []
        self._closed = False
        self.spans = self._open_chain(0, swarm.num_blocks)

    @property
    def route(self) -> list[Hop]:
        return [s.hop for s in self.spans]

    @property
    def length(self) -> int:
        return sum(int(s.hidden.shape[1]) for s in self.spans[0].history) if self.spans else 0

    def step(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run [batch, new, hidden] through every block; `attention_mask` covers the new positions only."""
        if self._closed:
            raise SessionError("this inference session is closed")
        if hidden.shape[0] != self.batch_size:
            raise SessionError(f"session was opened for batch size {self.batch_size}, got {hidden.shape[0]}")
        if self.length + hidden.shape[1] > self.max_length:
            raise SessionError(
                f"session holds {self.length} positions; {hidden.shape[1]} more exceed its max_length {self.max_length}"
            )
        began = time.perf_counter()
        timing = StepTiming(seconds=0.0)
        index = 0
        while index < len(self.spans):
            inputs = StepInputs(hidden, position_ids, attention_mask)
            try:
                hidden, node_seconds = self.spans[index].step(inputs)
            except RemoteError as exc:
                if not self._may_retry(exc):
                    raise
                self._replace(index, exc)
                continue
            timing.node_seconds.append(node_seconds)
            index += 1
        timing.seconds = time.perf_counter() - began
        self.timings.append(timing)
        return hidden

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for span in self.spans:
                span.close()

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_chain(self, start: int, end: int) -> list[SpanSession]:
        """Open sessions on a route for blocks [start, end); a node that refuses or fails is routed around."""
        needed_tokens = self.max_length * self.batch_size
        while True:
            route = self.swarm.route(start, end, exclude=self.failed_nodes, needed_tokens=needed_tokens)
            opened: list[SpanSession] = []
            try:
                for hop in route:
                    opened.append(SpanSession(self.swarm, hop, self.max_length, self.batch_size, self.timeout))
            except RemoteError as exc:
                for span in opened:
                    span.close()
                if not self._may_retry(exc):
                    raise
                self.failed_nodes.add(route[len(opened)].node_id)
                logger.warning("cannot open a session on %s (%s); routing around it", exc.address, exc.code)
                continue
            except BaseException:
                for span in opened:
                    span.close()
                raise
            logger.debug("route %s", " -> ".join(f"{h.address}[{h.start}:{h.end}]" for h in route))
            return opened

    def _may_retry(self, error: RemoteError) -> bool:
        return error.code in RETRIABLE_CODES and len(self.failed_nodes) < self.max_failovers

    def _replace(self, index: int, error: RemoteError) -> None:
        """Drop the failed hop, route its blocks anew and replay its inputs so the new caches match."""
        failed = self.spans[index]
        self.failed_nodes.add(failed.hop.node_id)
        logger.warning(
            "node %s failed (%s); re-routing blocks %d:%d", failed.hop.address, error, failed.hop.start, failed.hop.end
        )
        failed.close()
        replacement = self._open_chain(failed.hop.start, failed.hop.end)
        for past in failed.history:
            hidden = past.hidden
            for span in replacement:
                hidden, _ = span.step(StepInputs(hidden, past.position_ids, past.attention_mask))
        self.spans[index : index + 1] = replacement
