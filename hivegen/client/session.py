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

from hivegen.client.payer import Payer
from hivegen.client.routing import Hop
from hivegen.client.swarm import SwarmView
from hivegen.credits.receipts import INSUFFICIENT_CREDITS, WORK_UNITS_PER_CREDIT
from hivegen.errors import InsufficientCredits, NoRouteError, RemoteError, SessionError
from hivegen.proto import ledger_pb2, node_pb2
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
) | {"BAD_PRICE"}  # a node that counts a block's parameters differently from the checkpoint
_CLOSE = object()
SETTLE_TIMEOUT = 10.0  # seconds to wait for a node to acknowledge the final receipt


@dataclass
class StepInputs:
    """What was sent to a hop in one step: enough to rebuild its cache on a replacement node."""

    hidden: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor


class SpanSession:
    """One bidirectional stream to one node, serving blocks [hop.start, hop.end) for a session.

    With a node that charges, every step carries the receipt for the work of the steps before it and
    `settle` sends the receipt for all of it; `work` counts parameter-tokens as the node does.
    """

    def __init__(
        self, swarm: SwarmView, hop: Hop, max_length: int, batch_size: int, timeout: float, payer: Payer | None = None
    ) -> None:
        self.hop = hop
        self.session_id = uuid.uuid4().hex
        self.timeout = timeout
        self.dtype = dtype_from_name(hop.dtype)
        self.history: list[StepInputs] = []
        self.payer = payer
        self.node_account = ""  # set by the node's answer; empty if it serves for free
        self.work = 0  # parameter-tokens this node has done in the session
        self.signed_work = 0  # the most work a receipt signed so far pays for
        self._signed_seq = 0
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
                client_account=payer.identity.account if payer else "",
                client_key=payer.identity.public_key_hex if payer else "",
            )
        )
        try:
            opened = self._exchange(request)
            if opened.WhichOneof("kind") != "opened":
                raise RemoteError(hop.address, "INTERNAL", "expected `opened` as the first answer")
            self.node_account = opened.opened.node_account
            if self.node_account:
                self._check_price(opened.opened.params_per_token)
        except BaseException:
            self.close()  # ends the stream and its reader thread
            raise

    @property
    def paid(self) -> bool:
        return bool(self.node_account) and self.payer is not None

    @property
    def credits(self) -> int:
        """Credits the receipts signed so far let this node collect."""
        return self.signed_work // WORK_UNITS_PER_CREDIT

    def step(self, inputs: StepInputs) -> tuple[torch.Tensor, float]:
        """Send one step; return the hop's output hidden states and the node's compute seconds."""
        step = node_pb2.Step(
            session_id=self.session_id,
            step_id=len(self.history),
            hidden_states=serialize(inputs.hidden.to(self.dtype)),
            position_ids=serialize(inputs.position_ids),
            attention_mask=serialize(inputs.attention_mask),
        )
        if self.paid and self.history:
            step.receipt.CopyFrom(self._receipt())
        response = self._exchange(node_pb2.InferenceRequest(step=step))
        self.history.append(inputs)
        if self.payer is not None:
            self.work += inputs.hidden.shape[0] * inputs.hidden.shape[1] * self._params_per_token
        return deserialize(response.result.hidden_states), response.result.compute_seconds

    def settle(self) -> None:
        """Pay for every step so far with one last receipt (on a node that charges); failures are logged."""
        if not self.paid or not self.history or self._signed_seq == len(self.history):
            return
        settle = node_pb2.Settle(session_id=self.session_id, receipt=self._receipt())
        try:
            answer = self._exchange(node_pb2.InferenceRequest(settle=settle), timeout=min(self.timeout, SETTLE_TIMEOUT))
            if answer.WhichOneof("kind") != "settled":
                raise RemoteError(self.hop.address, "INTERNAL", "expected `settled` in answer to `settle`")
        except RemoteError as exc:
            logger.warning("could not settle session %s with %s: %s", self.session_id, self.hop.address, exc)

    def close(self) -> None:
        self._requests.put(_CLOSE)
        self._call.cancel()

    @property
    def _params_per_token(self) -> int:
        assert self.payer is not None
        return self.payer.params_per_token(self.hop.start, self.hop.end)

    def _check_price(self, node_params: int) -> None:
        if node_params != self._params_per_token:
            raise RemoteError(
                self.hop.address,
                "BAD_PRICE",
                f"the node counts {node_params} parameters per token for blocks {self.hop.start}:{self.hop.end}; "
                f"the checkpoint has {self._params_per_token}",
            )

    def _receipt(self) -> ledger_pb2.Receipt:
        assert self.payer is not None
        self._signed_seq = len(self.history)
        self.signed_work = self.work
        return self.payer.receipt(self.session_id, self.node_account, self._signed_seq, self.work)

    def _exchange(self, request: node_pb2.InferenceRequest, timeout: float | None = None) -> node_pb2.InferenceResponse:
        self._requests.put(request)
        timeout = self.timeout if timeout is None else timeout
        try:
            item = self._responses.get(timeout=timeout)
        except queue.Empty:
            self._call.cancel()
            raise RemoteError(self.hop.address, "DEADLINE_EXCEEDED", f"no answer within {timeout:.0f} s") from None
        if isinstance(item, grpc.RpcError):
            code = item.code() if hasattr(item, "code") else grpc.StatusCode.UNKNOWN
            details = item.details() if hasattr(item, "details") else str(item)
            _raise_insufficient(item, self.hop.address)
            raise RemoteError(self.hop.address, code.name, details)
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


def _raise_insufficient(error: grpc.RpcError, address: str) -> None:
    """Turn a node's insufficient-credits refusal into InsufficientCredits."""
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    meta = {key: value for key, value in trailing or ()}
    if meta.get("hivegen-error") != INSUFFICIENT_CREDITS:
        return
    try:
        balance, needed = int(meta["hivegen-balance"]), int(meta["hivegen-needed"])
    except (KeyError, ValueError):
        return
    raise InsufficientCredits(
        meta.get("hivegen-account", "?"), balance, needed, what=f"a session on node {address} may cost up to"
    )


@dataclass
class StepTiming:
    """Per-step measurements the client keeps (and a store can record later)."""

    seconds: float
    node_seconds: list[float] = field(default_factory=list)


class InferenceSession:
    """Runs every block of the model for one generation, re-routing around nodes that fail."""

    def __init__(
        self,
        swarm: SwarmView,
        max_length: int,
        batch_size: int,
        timeout: float = 60.0,
        max_failovers: int = 3,
        payer: Payer | None = None,
    ) -> None:
        self.swarm = swarm
        self.payer = payer
        self.dropped: list[SpanSession] = []  # sessions on nodes that failed (they may still be owed)
        self.max_length = max_length
        self.batch_size = batch_size
        self.timeout = timeout
        self.max_failovers = max_failovers
        self.failed_nodes: set[str] = set()
        self.failures: list[RemoteError] = []  # why each failed node was dropped
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

    @property
    def charges(self) -> dict[str, int]:
        """Credits the receipts signed in this session let each node account collect."""
        owed: dict[str, int] = {}
        for span in [*self.dropped, *self.spans]:
            if span.node_account:
                owed[span.node_account] = owed.get(span.node_account, 0) + span.credits
        return owed

    def close(self) -> None:
        """Settle with every node that charges, then end the streams."""
        if not self._closed:
            self._closed = True
            for span in self.spans:
                span.settle()
                span.close()

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_chain(self, start: int, end: int) -> list[SpanSession]:
        """Open sessions on a route for blocks [start, end); a node that refuses or fails is routed around."""
        needed_tokens = self.max_length * self.batch_size
        while True:
            try:
                route = self.swarm.route(start, end, exclude=self.failed_nodes, needed_tokens=needed_tokens)
            except NoRouteError as exc:
                if not self.failures:
                    raise
                raise NoRouteError(exc.model_key, exc.missing_blocks, [str(f) for f in self.failures]) from exc
            opened: list[SpanSession] = []
            try:
                for hop in route:
                    opened.append(
                        SpanSession(self.swarm, hop, self.max_length, self.batch_size, self.timeout, self.payer)
                    )
            except RemoteError as exc:
                for span in opened:
                    span.close()
                if not self._may_retry(exc):
                    raise
                self.failed_nodes.add(route[len(opened)].node_id)
                self.failures.append(exc)
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
        self.failures.append(error)
        logger.warning(
            "node %s failed (%s); re-routing blocks %d:%d", failed.hop.address, error, failed.hop.start, failed.hop.end
        )
        failed.close()
        self.dropped.append(failed)
        replacement = self._open_chain(failed.hop.start, failed.hop.end)
        for past in failed.history:
            hidden = past.hidden
            for span in replacement:
                hidden, _ = span.step(StepInputs(hidden, past.position_ids, past.attention_mask))
        self.spans[index : index + 1] = replacement
