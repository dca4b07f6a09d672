"""Inference sessions: hidden states streamed through a chain of nodes, each keeping its own KV cache.

A node that fails, hangs, or answers wrongly (SpanSession's checks) is dropped; its blocks are routed anew and
the inputs it was sent are replayed to the replacement, so tokens do not change. Fail-over is bounded by time,
not by a count: a swarm full of records that point nowhere costs a few fast failures, and the session keeps
going while honest nodes still cover every block.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hivegen.client.payer import Payer
from hivegen.client.routing import Hop
from hivegen.client.span import ProvenFault, SpanSession, StepInputs
from hivegen.client.swarm import SwarmView
from hivegen.errors import GrantProofNeeded, InsufficientCredits, NoRouteError, RemoteError, SessionError

logger = logging.getLogger(__name__)

# Every error a node answers with is that node's fault: it is dropped and its blocks are routed anew. An honest
# node refuses a well-formed request only when it is full or broken; a stranger may say anything. Only a refusal
# that every node serving the blocks repeats reaches the caller (in NoRouteError, or as InsufficientCredits).
FAILOVER_SECONDS = 60.0  # how long one step may keep routing around failed nodes before giving up
FaultHandler = Callable[["InferenceSession", SpanSession, ProvenFault], None]

__all__ = ["InferenceSession", "StepInputs", "StepTiming"]


@dataclass
class StepTiming:
    """Per-step measurements the client keeps (and a store can record later)."""

    seconds: float
    node_seconds: list[float] = field(default_factory=list)


class InferenceSession:
    """Runs every block of the model for one generation, re-routing around nodes that fail.

    `timeout` fixes every step's deadline (default: per node, from the client's measurements, at least 2 s);
    `failover_seconds` bounds the time one step spends routing around failures; `max_failovers`, if set, also
    bounds their number. With `attest`, every answer must carry the node's valid signature (needed to verify).
    """

    def __init__(
        self,
        swarm: SwarmView,
        max_length: int,
        batch_size: int,
        timeout: float | None = None,
        max_failovers: int | None = None,
        payer: Payer | None = None,
        failover_seconds: float = FAILOVER_SECONDS,
        attest: bool = True,
        on_fault: FaultHandler | None = None,
    ) -> None:
        self.swarm = swarm
        self.on_fault = on_fault  # called when a node signs a self-evidently wrong answer (ban and report it)
        self.payer = payer
        self.dropped: list[SpanSession] = []  # sessions on nodes that failed (they may still be owed)
        self.max_length = max_length
        self.batch_size = batch_size
        self.timeout = timeout
        self.max_failovers = max_failovers
        self.failover_seconds = failover_seconds
        self.attest = attest
        self.failed_spans: dict[str, tuple[int, int] | None] = {}  # node id -> the span it failed serving, if known
        self.failures: list[RemoteError] = []  # why each failed node was dropped
        self.refused_credits: InsufficientCredits | None = None  # the last node that would not serve us on credit
        self.spans: list[SpanSession] = []
        self.timings: list[StepTiming] = []
        self.unpaid: set[str] = set()  # node ids never to settle with (caught lying)
        self.checks: list[SpanSession] = []  # re-executions of hops on other nodes (verification); paid too
        self._closed = False
        self._failover_deadline = time.monotonic() + failover_seconds
        self.spans = self._open_chain(0, swarm.num_blocks, wait=True)

    @property
    def failed_nodes(self) -> set[str]:
        """The nodes that failed this session."""
        return set(self.failed_spans)

    @property
    def route(self) -> list[Hop]:
        return [s.hop for s in self.spans]

    @property
    def length(self) -> int:
        return sum(int(s.hidden.shape[1]) for s in self.spans[0].history) if self.spans else 0

    @property
    def all_spans(self) -> list[SpanSession]:
        """Every hop session of this generation, dropped ones included (their answers were used too)."""
        return [*self.dropped, *self.spans]

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
        self._failover_deadline = time.monotonic() + self.failover_seconds
        timing = StepTiming(seconds=0.0)
        index = 0
        while index < len(self.spans):
            inputs = StepInputs(hidden, position_ids, attention_mask)
            try:
                hidden, node_seconds = self.spans[index].step(inputs)
            except RemoteError as exc:
                self._blame(self.spans[index], exc)
                if not self._may_retry():
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
        """Work units the receipts signed in this session let each node account collect."""
        owed: dict[str, int] = {}
        for span in [*self.all_spans, *self.checks]:
            if span.node_account:
                owed[span.node_account] = owed.get(span.node_account, 0) + span.signed_work
        return owed

    def close(self) -> None:
        """Settle with every node that charges (except nodes caught lying), then end the streams."""
        if not self._closed:
            self._closed = True
            for span in self.spans:
                if span.hop.node_id not in self.unpaid and not self.swarm.bans.is_banned(span.hop.owner):
                    span.settle()
                span.close()

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open_span(self, hop: Hop, max_length: int | None = None) -> SpanSession:
        """A session on one hop with this session's settings (also used to re-execute a hop's inputs). A new
        account's first paid session solves the starter grant's proof of work, then opens again."""
        args = (self.swarm, hop, max_length or self.max_length, self.batch_size, self.timeout, self.payer)
        try:
            return SpanSession(*args, attest=self.attest)
        except GrantProofNeeded as need:
            if self.payer is None:
                raise
            self.payer.prove_grant(need)
            return SpanSession(*args, attest=self.attest)

    def _open_chain(self, start: int, end: int, wait: bool = False, healing: bool = False) -> list[SpanSession]:
        """Open sessions on a route for blocks [start, end); a node that refuses or fails is routed around."""
        needed_tokens = self.max_length * self.batch_size
        while True:
            try:
                route = self.swarm.route(
                    start, end, failed=self.failed_spans, needed_tokens=needed_tokens, wait=wait, healing=healing
                )
            except NoRouteError as exc:
                if self.refused_credits is not None:  # every node left wants credits we do not have
                    raise self.refused_credits from exc
                if not self.failures:
                    raise
                raise NoRouteError(exc.model_key, exc.missing_blocks, [str(f) for f in self.failures]) from exc
            opened: list[SpanSession] = []
            try:
                for hop in route:
                    opened.append(self.open_span(hop))
            except InsufficientCredits as exc:  # the client's balance, not the node's health: no cool-down
                for span in opened:
                    span.close()
                self.refused_credits = exc
                self.failed_spans[route[len(opened)].node_id] = None
                continue
            except RemoteError as exc:
                for span in opened:
                    span.close()
                self._blame(route[len(opened)], exc)
                if not self._may_retry():
                    raise
                logger.warning("cannot open a session on %s (%s); routing around it", exc.address, exc.code)
                continue
            except BaseException:
                for span in opened:
                    span.close()
                raise
            logger.debug("route %s", " -> ".join(f"{h.address}[{h.start}:{h.end}]" for h in route))
            return opened

    def _blame(self, culprit: Hop | SpanSession, error: RemoteError) -> None:
        """Count a failure against the node that produced it (routes avoid it for a while, here and after); a
        signed, self-evidently wrong answer also goes to `on_fault`."""
        hop = culprit.hop if isinstance(culprit, SpanSession) else culprit
        record = self.swarm.spans().get(hop.node_id)
        self.failed_spans[hop.node_id] = (record.start, record.end) if record is not None else None
        self.failures.append(error)
        self.swarm.health.failed(hop.node_id, f"{error.code}: {error.details}")
        if isinstance(error, ProvenFault) and isinstance(culprit, SpanSession) and self.on_fault is not None:
            self.on_fault(self, culprit, error)

    def _may_retry(self) -> bool:
        if time.monotonic() > self._failover_deadline:
            return False
        return self.max_failovers is None or len(self.failed_spans) <= self.max_failovers

    def _replace(self, index: int, error: RemoteError) -> None:
        """Drop the failed hop, route its blocks anew and replay its inputs so the new caches match."""
        failed = self.spans[index]
        logger.warning(
            "node %s failed (%s); re-routing blocks %d:%d", failed.hop.address, error, failed.hop.start, failed.hop.end
        )
        failed.close()
        self.dropped.append(failed)
        while True:
            replacement = self._open_chain(failed.hop.start, failed.hop.end, healing=True)
            try:
                for past in failed.history:
                    hidden = past.hidden
                    for span in replacement:
                        hidden, _ = span.step(StepInputs(hidden, past.position_ids, past.attention_mask))
            except RemoteError as exc:  # the replacement failed while catching up: route around it too
                bad = next((s for s in replacement if s.hop.address == exc.address), replacement[0])
                self._blame(bad, exc)
                for span in replacement:
                    span.close()
                self.dropped.extend(replacement)
                if not self._may_retry():
                    raise
                continue
            self.spans[index : index + 1] = replacement
            return
