"""Inference sessions on a node: admission against the KV-cache pool, input validation, the step itself (run by
the batching scheduler, with other sessions' steps)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch
from transformers import DynamicCache

from hivegen.model.paged import (
    PAGE_SIZE,
    CacheFull,
    KVPool,
    PagedSupport,
    nominal_shapes,
    paged_support,
    slot_bytes,
)
from hivegen.model.span import BlockSpan
from hivegen.node.batching import Scheduler, Work
from hivegen.node.billing import Billing, PaidSession
from hivegen.node.defaults import DEFAULT_BATCH_WAIT, DEFAULT_MAX_ROWS, DEFAULT_PREFILL_CHUNK
from hivegen.node.errors import RequestError
from hivegen.proto import node_pb2
from hivegen.proto.tensors import DTYPE_NAMES, TensorDecodeError, deserialize

logger = logging.getLogger(__name__)

MAX_BATCH_SIZE = 64
MASK_DTYPES = (torch.int64, torch.int32, torch.bool)


@dataclass
class Counters:
    """Totals since the node started (served over the wire in NodeInfo)."""

    sessions_opened: int = 0
    steps: int = 0
    tokens_processed: int = 0
    errors: int = 0
    compute_seconds: float = 0.0


@dataclass
class Session:
    """One client's use of a sub-span of this node, with its own KV cache."""

    session_id: str
    start: int
    end: int
    max_length: int
    batch_size: int
    cache: DynamicCache | None  # the model's own cache, on a node without a pool
    slots: torch.Tensor | None  # [batch_size, max_length] slots in the node's pool
    mask: torch.Tensor  # [batch, length] padding mask of every position seen so far
    next_step: int = 0
    history_digest: str = ""  # chained digest of every step's inputs so far (signed in each answer)
    opened_at: float = field(default_factory=time.monotonic)
    paid: PaidSession | None = None  # set when the node charges credits
    abandoned: threading.Event = field(default_factory=threading.Event)  # its client left: run no more steps

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    @property
    def reserved_tokens(self) -> int:
        return self.batch_size * self.max_length


class SessionManager:
    """Opens and closes sessions within the node's cache budget and runs their steps through the scheduler.

    The budget is a pool of `cache_tokens` positions allocated at start (`hivegen.model.paged`); a session reserves
    its whole batch x max_length there when it opens. A model whose blocks cannot use the pool keeps the model's
    own cache per session, counted against the same budget, and runs its steps one at a time."""

    def __init__(
        self,
        span: BlockSpan,
        model_key: str,
        cache_tokens: int,
        billing: Billing | None = None,
        *,
        cache_bytes: int | None = None,
        pooled: bool = True,
        max_batch_rows: int = DEFAULT_MAX_ROWS,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        batch_wait: float | None = DEFAULT_BATCH_WAIT,
    ) -> None:
        self.span = span
        self.model_key = model_key
        self.billing = billing
        self.block_params = span.skeleton.block_parameters()  # every block of the model, by index
        self.counters = Counters()
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()  # guards _sessions and counters
        self.max_positions = int(getattr(span.config, "max_position_embeddings", 1 << 20))
        self.on_change: Callable[[], None] | None = None  # called when the free cache changes (re-announce it)
        self.on_step: Callable[[float], None] | None = None  # gets every step's compute seconds (metrics)
        self.support = paged_support(span) if pooled else PagedSupport(None, False, "the pool is turned off")
        if cache_bytes is not None:  # a budget in memory: as many positions as fit
            cache_tokens = cache_bytes // slot_bytes(self.support.shapes or nominal_shapes(span), span.dtype)
        self.pool = KVPool(self.support.shapes, cache_tokens, span.dtype, span.device) if self.support.shapes else None
        self.cache_tokens_total = self.pool.tokens_total if self.pool is not None else cache_tokens
        if not self.support.batching:
            logger.warning("steps of different sessions run one at a time: %s", self.support.reason)
        self.scheduler = Scheduler(span, self.pool, self.support.batching, max_batch_rows, prefill_chunk, batch_wait)

    @property
    def cache_bytes_total(self) -> int:
        """Memory of the pool (0 without one)."""
        return self.pool.bytes_total if self.pool is not None else 0

    @property
    def cache_tokens_free(self) -> int:
        if self.pool is not None:
            return self.pool.tokens_free
        with self._lock:
            return self.cache_tokens_total - sum(s.reserved_tokens for s in self._sessions.values())

    def stop(self) -> None:
        self.scheduler.stop()

    @property
    def active_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    def open(self, req: node_pb2.OpenSession) -> Session:
        if not req.session_id:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "open: session_id is empty")
        if req.model_key != self.model_key:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this node serves model {self.model_key}, not {req.model_key or '(empty)'}",
            )
        if not self.span.start <= req.start_block < req.end_block <= self.span.end:
            raise RequestError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"blocks {req.start_block}:{req.end_block} are not inside this node's span "
                f"{self.span.start}:{self.span.end}",
            )
        if not 1 <= req.batch_size <= MAX_BATCH_SIZE:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"batch_size must be in 1..{MAX_BATCH_SIZE}")
        if not 1 <= req.max_length <= self.max_positions:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"max_length must be in 1..{self.max_positions} (the model's limit)"
            )
        needed = req.batch_size * req.max_length
        paid = None
        if self.billing is not None:  # before any cache is reserved or work done
            ledger_open = req.ledger_open if req.HasField("ledger_open") else None
            paid = self.billing.admit(
                req.session_id, req.client_account, req.client_key, req.start_block, req.end_block, needed, ledger_open
            )
        if self.pool is not None:
            needed = KVPool.pages_for(req.batch_size, req.max_length) * PAGE_SIZE
        with self._lock:
            if req.session_id in self._sessions:
                raise RequestError(grpc.StatusCode.ALREADY_EXISTS, f"session {req.session_id} is already open")
            slots = None
            if self.pool is not None:
                try:
                    slots = self.pool.reserve(req.batch_size, req.max_length)
                except CacheFull:
                    raise self._full(needed, self.pool.tokens_free) from None
            else:
                free = self.cache_tokens_total - sum(s.reserved_tokens for s in self._sessions.values())
                if needed > free:
                    raise self._full(needed, free)
            session = Session(
                session_id=req.session_id,
                start=req.start_block,
                end=req.end_block,
                max_length=req.max_length,
                batch_size=req.batch_size,
                cache=self.span.new_cache() if self.pool is None else None,
                slots=slots,
                mask=torch.zeros((req.batch_size, 0), dtype=torch.int64),
                paid=paid,
            )
            self._sessions[req.session_id] = session
            self.counters.sessions_opened += 1
        self._changed()
        return session

    @staticmethod
    def _full(needed: int, free: int) -> RequestError:
        return RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"node is full: the session needs {needed} cache tokens (batch x max_length), {free} are free; "
            "retry later or use another node",
        )

    def close(self, session_id: str) -> None:
        """Forget the session and give its cache back (its step, if one is running, has finished: the servicer
        closes a session only once its work is done)."""
        with self._lock:
            closed = self._sessions.pop(session_id, None)
        if closed is None:
            return
        self.scheduler.forget(session_id)
        if closed.slots is not None and self.pool is not None:
            self.pool.release(closed.slots)
            closed.slots = None
        closed.cache = None
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def count_error(self) -> None:
        with self._lock:
            self.counters.errors += 1

    def step(self, session: Session, req: node_pb2.Step) -> tuple[torch.Tensor, float]:
        """Validate one step's inputs, run the session's blocks on them, return (hidden, seconds)."""
        if req.session_id != session.session_id:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"unknown session {req.session_id or '(empty)'}: this stream serves session {session.session_id}",
            )
        if req.step_id != session.next_step:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION, f"expected step {session.next_step}, got step {req.step_id}"
            )
        hidden, positions, mask = self._decode_inputs(session, req)
        new = hidden.shape[1]
        if session.length + new > session.max_length:
            raise RequestError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"positions {session.length}..{session.length + new - 1} exceed the session's "
                f"max_length {session.max_length}; open a session with a larger max_length",
            )
        if int(positions.min()) < 0 or int(positions.max()) >= session.max_length:
            raise RequestError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"position_ids must lie in 0..{session.max_length - 1} (the session's max_length)",
            )
        if session.paid is not None and self.billing is not None:
            receipt = req.receipt if req.HasField("receipt") else None
            self.billing.check_receipt(session.paid, receipt, req.step_id)
        full_mask = torch.cat([session.mask, mask.to(torch.int64)], dim=1)
        if session.slots is None and session.cache is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"session {session.session_id} is closed")
        work = Work(session.start, session.end, hidden, positions, full_mask, session.slots, session.cache,
                    abandoned=session.abandoned, session=session.session_id)  # fmt: skip
        out, seconds = self.scheduler.run(work)
        session.mask = full_mask
        session.next_step += 1
        if session.paid is not None:
            session.paid.served(new * session.batch_size)
        with self._lock:
            self.counters.steps += 1
            self.counters.tokens_processed += new * session.batch_size
            self.counters.compute_seconds += seconds
        if self.on_step is not None:
            self.on_step(seconds)
        return out, seconds

    def settle(self, session: Session, req: node_pb2.Settle) -> int:
        """Accept the session's final receipt; return the seq kept."""
        if req.session_id != session.session_id:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"unknown session {req.session_id or '(empty)'}: this stream serves session {session.session_id}",
            )
        if session.paid is None or self.billing is None:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, "this node serves for free: nothing to settle")
        if not req.HasField("receipt"):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "settle: the receipt is missing")
        return self.billing.settle(session.paid, req.receipt)

    def params_per_token(self, start: int, end: int) -> int:
        """Parameters of blocks [start, end): the work of one token through them."""
        return sum(self.block_params[start:end])

    def _decode_inputs(self, session: Session, req: node_pb2.Step) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        try:
            hidden = deserialize(req.hidden_states)
            positions = deserialize(req.position_ids)
            mask = deserialize(req.attention_mask)
        except TensorDecodeError as exc:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        expected_dtype = DTYPE_NAMES[self.span.dtype]
        if hidden.dtype != self.span.dtype:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"hidden_states dtype is {req.hidden_states.dtype}; this node runs {expected_dtype}",
            )
        batch = session.batch_size
        if (
            hidden.ndim != 3
            or hidden.shape[0] != batch
            or hidden.shape[1] < 1
            or hidden.shape[2] != self.span.hidden_size
        ):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"hidden_states shape {list(hidden.shape)} is wrong: expected [{batch}, new_tokens>=1, "
                f"{self.span.hidden_size}] (batch_size, new tokens, hidden size)",
            )
        if not bool(torch.isfinite(hidden).all()):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "hidden_states hold NaN or infinite values; a node never computes on them (it could be blamed for "
                "what they do to its output)",
            )
        new = hidden.shape[1]
        if positions.dtype != torch.int64 or list(positions.shape) != [batch, new]:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"position_ids must be int64 of shape [{batch}, {new}], got {req.position_ids.dtype} "
                f"{list(positions.shape)}",
            )
        if mask.dtype not in MASK_DTYPES or list(mask.shape) != [batch, new]:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"attention_mask must be int64/bool of shape [{batch}, {new}], got {req.attention_mask.dtype} "
                f"{list(mask.shape)}",
            )
        if bool(((mask != 0) & (mask != 1)).any()):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "attention_mask values must be 0 or 1")
        return hidden, positions, mask
