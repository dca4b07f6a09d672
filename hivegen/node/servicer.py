"""The gRPC face of a node (grpc.aio): one Inference stream per session, plus Info for status and counters.

A stream costs no thread while it waits: handlers are coroutines, and only blocking work (opening a session,
which may ask the ledger; a step; settling) runs on bounded thread pools. A stream must open its session within
`open_timeout` and say something at least every `idle_timeout` after that, or the node closes it and frees its
cache; each client (its account on a paid node, else its address) may hold only so many sessions and tokens.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import torch

from hivegen import __version__
from hivegen.credits.attestation import StepClaim, chain_digest, sign_claim, step_input_digest, tensor_digest
from hivegen.credits.identity import Identity
from hivegen.node.errors import RequestError
from hivegen.node.limits import ClientQuotas, Network, client_of
from hivegen.node.sessions import Session, SessionManager
from hivegen.proto import node_pb2, node_pb2_grpc
from hivegen.proto.tensors import DTYPE_NAMES, serialize

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class StreamLimits:
    """How long a stream may stay silent, and who the per-client limits spare."""

    open_timeout: float = 10.0  # seconds from a stream's start to its `open`
    idle_timeout: float = 60.0  # seconds an open session may go without a message before it is closed
    unlimited: tuple[Network, ...] = ()  # peers in these networks are not counted by the per-client limits


@dataclass
class _Stream:
    """What one Inference stream holds."""

    peer: str  # context.peer(), e.g. "ipv4:10.0.0.5:54321"
    session: Session | None = None
    client: str | None = None  # whom the session counts against (None: no per-client limit applies)
    busy: asyncio.Future[Any] | None = None  # blocking work still running for this stream, if any
    released: bool = False


class NodeServicer(node_pb2_grpc.NodeServicer):
    """Serves sessions; every step's answer is signed by the node's `identity` (the key its DHT records name).

    `step_workers` threads validate, queue and sign steps (the scheduler's one thread runs the forwards, batching
    steps of different sessions); `admission_workers`
    threads open sessions (which may wait on the ledger) and settle them, so a slow ledger never stalls steps."""

    def __init__(
        self,
        sessions: SessionManager,
        node_id: str,
        model_name: str,
        num_blocks: int,
        identity: Identity,
        quotas: ClientQuotas | None = None,
        limits: StreamLimits | None = None,
        step_workers: int = 64,
        admission_workers: int = 8,
    ) -> None:
        self.sessions = sessions
        self.node_id = node_id
        self.model_name = model_name
        self.num_blocks = num_blocks
        self.identity = identity
        self.account = sessions.billing.account if sessions.billing is not None else ""
        self.quotas = quotas if quotas is not None else ClientQuotas(1 << 30, 1 << 62)
        self.limits = limits if limits is not None else StreamLimits()
        self.draining = ""  # set while the node moves to other blocks: why new sessions are refused
        self._steps: Executor = ThreadPoolExecutor(step_workers, thread_name_prefix="hivegen-step")
        self._admission: Executor = ThreadPoolExecutor(admission_workers, thread_name_prefix="hivegen-open")

    def close(self) -> None:
        """Stop the thread pools (work already running finishes on its own)."""
        self._steps.shutdown(wait=False, cancel_futures=True)
        self._admission.shutdown(wait=False, cancel_futures=True)

    async def Inference(  # gRPC's method name
        self, request_iterator: AsyncIterator[node_pb2.InferenceRequest], context: grpc.aio.ServicerContext
    ) -> None:
        stream = _Stream(context.peer())
        try:
            await self._serve(stream, context)
        except RequestError as exc:
            self.sessions.count_error()
            logger.info("refused a request: %s %s", exc.code.name, exc.message)
            if exc.metadata:  # machine-readable details (e.g. the balance behind insufficient credits)
                context.set_trailing_metadata(exc.metadata)
            await context.abort(exc.code, exc.message, exc.metadata)
        except Exception as exc:  # a bug or a device error: this stream fails, the node keeps serving
            if context.cancelled() or context.done():  # the client ended the stream (cancelled, went away): normal
                logger.debug("stream ended by its client: %s", exc)
                return
            self.sessions.count_error()
            logger.exception("internal error in an inference stream")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error on the node: {type(exc).__name__}: {exc}")
        finally:
            self._release_when_done(stream)

    async def _serve(self, stream: _Stream, context: grpc.aio.ServicerContext) -> None:
        while (request := await self._read(stream, context)) is not None:
            kind = request.WhichOneof("kind")
            if kind == "open":
                if stream.session is not None:
                    raise RequestError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"this stream already serves session {stream.session.session_id}; open one stream per session",
                    )
                session = await self._work(stream, self._admission, self._open, stream, request.open)
                logger.debug("opened session %s for blocks %d:%d", session.session_id, session.start, session.end)
                await context.write(
                    node_pb2.InferenceResponse(
                        opened=node_pb2.SessionOpened(
                            session_id=session.session_id,
                            start_block=session.start,
                            end_block=session.end,
                            dtype=DTYPE_NAMES[self.sessions.span.dtype],
                            node_account=self.account,
                            params_per_token=self.sessions.params_per_token(session.start, session.end),
                            node_key=self.identity.public_key_hex,
                        )
                    )
                )
            elif kind == "step":
                if stream.session is None:
                    raise RequestError(
                        grpc.StatusCode.NOT_FOUND,
                        f"unknown session {request.step.session_id or '(empty)'}: send `open` first on this stream",
                    )
                result = await self._work(stream, self._steps, self._step, stream.session, request.step)
                await context.write(node_pb2.InferenceResponse(result=result))
            elif kind == "settle":
                if stream.session is None:
                    raise RequestError(grpc.StatusCode.NOT_FOUND, "settle before open: send `open` first")
                session = stream.session
                seq = await self._work(stream, self._admission, self.sessions.settle, session, request.settle)
                await context.write(
                    node_pb2.InferenceResponse(settled=node_pb2.Settled(session_id=session.session_id, seq=seq))
                )
            else:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT, "empty InferenceRequest: set `open`, `step` or `settle`"
                )

    async def _read(self, stream: _Stream, context: grpc.aio.ServicerContext) -> node_pb2.InferenceRequest | None:
        """The stream's next request (None once the client half-closed it), within the open or idle timeout."""
        if stream.session is None:
            timeout = self.limits.open_timeout
            expired = (
                f"no `open` within {timeout:g} s of the stream starting: this node closes streams that do not open "
                "a session in time (--open-timeout); send `open` as the first message"
            )
        else:
            timeout = self.limits.idle_timeout
            expired = (
                f"session {stream.session.session_id} was idle for {timeout:g} s: this node closed it and freed its "
                "cache (--session-idle-timeout); open a new session (and replay its inputs) to go on"
            )
        try:
            async with asyncio.timeout(timeout):
                request = await context.read()
        except TimeoutError:
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, expired) from None
        return None if request is grpc.aio.EOF else request

    async def _work(self, stream: _Stream, pool: Executor, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking `fn(*args)` on `pool`. If the stream is cancelled meanwhile, the work still finishes
        (a thread cannot be stopped) and the stream's session is released only after it."""
        future = asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        stream.busy = future
        result = await asyncio.shield(future)
        stream.busy = None
        return result

    def _open(self, stream: _Stream, req: node_pb2.OpenSession) -> Session:
        """(worker thread) Admit the session within the per-client limits, then keep it on `stream`."""
        if self.draining:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, self.draining)
        paid = self.sessions.billing is not None
        unlimited = self.limits.unlimited
        claimed = client_of(stream.peer, req.client_account if paid else "", unlimited)
        if claimed is not None:  # a cheap refusal before any ledger call; counted below, once the account is proven
            self.quotas.check(claimed, req.batch_size * req.max_length)
        session = self.sessions.open(req)
        client = client_of(stream.peer, session.paid.client if session.paid is not None else "", unlimited)
        if client is not None:
            try:
                self.quotas.acquire(client, session.reserved_tokens)
            except RequestError:
                self.sessions.close(session.session_id)
                raise
        stream.session, stream.client = session, client
        return session

    def _step(self, session: Session, step: node_pb2.Step) -> node_pb2.StepResult:
        """(worker thread) Run the step and sign its answer."""
        hidden, seconds = self.sessions.step(session, step)
        return self._signed_result(session, step, hidden, seconds)

    def _release_when_done(self, stream: _Stream) -> None:
        busy = stream.busy
        if busy is not None and not busy.done():
            if stream.session is not None:  # a step not yet run is dropped, so the cache comes back sooner
                stream.session.abandoned.set()
            busy.add_done_callback(lambda done: self._release_after(stream, done))
        else:
            self._release(stream)

    def _release_after(self, stream: _Stream, done: asyncio.Future[Any]) -> None:
        """Release once the work the stream left behind has finished; its outcome (a result nobody reads, or
        `Abandoned`) is consumed so asyncio does not report it as never retrieved."""
        if not done.cancelled():
            done.exception()
        self._release(stream)

    def _release(self, stream: _Stream) -> None:
        """Close the stream's session: its cache and its client's share are free again."""
        if stream.session is None or stream.released:
            return
        stream.released = True
        self.sessions.close(stream.session.session_id)
        if stream.client is not None:
            self.quotas.release(stream.client, stream.session.reserved_tokens)

    def _signed_result(
        self, session: Session, step: node_pb2.Step, hidden: torch.Tensor, seconds: float
    ) -> node_pb2.StepResult:
        """The step's answer with the node's signature over (session, step, blocks, input, history and output
        digests)."""
        output = serialize(hidden)
        input_digest = step_input_digest(step)
        session.history_digest = chain_digest(session.history_digest, input_digest)
        claim = StepClaim(
            model_key=self.sessions.model_key,
            session_id=session.session_id,
            step=step.step_id,
            start=session.start,
            end=session.end,
            input_digest=input_digest,
            output_digest=tensor_digest(output),
            history_digest=session.history_digest,
        )
        return node_pb2.StepResult(
            session_id=session.session_id,
            step_id=step.step_id,
            hidden_states=output,
            compute_seconds=seconds,
            signature=sign_claim(self.identity, claim),
        )

    async def Info(self, request: node_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> node_pb2.NodeInfo:
        """Answered on the event loop itself, from counters: it never waits for a thread or a stream."""
        span = self.sessions.span
        c = self.sessions.counters
        return node_pb2.NodeInfo(
            node_id=self.node_id,
            model_key=self.sessions.model_key,
            model_name=self.model_name,
            start_block=span.start,
            end_block=span.end,
            num_blocks=self.num_blocks,
            dtype=DTYPE_NAMES[span.dtype],
            hidden_size=span.hidden_size,
            cache_tokens_total=self.sessions.cache_tokens_total,
            cache_tokens_free=self.sessions.cache_tokens_free,
            active_sessions=self.sessions.active_sessions,
            counters=node_pb2.NodeCounters(
                sessions_opened=c.sessions_opened,
                steps=c.steps,
                tokens_processed=c.tokens_processed,
                errors=c.errors,
                compute_seconds=c.compute_seconds,
                forwards=self.sessions.scheduler.stats.forwards,
                batched_steps=self.sessions.scheduler.stats.batched_steps,
                max_batch_rows=self.sessions.scheduler.stats.max_rows,
            ),
            num_parameters=span.num_parameters,
            version=__version__,
            account=self.account,
            receipts_pending=billing.pending() if (billing := self.sessions.billing) is not None else 0,
            cache_bytes_total=self.sessions.cache_bytes_total,
            batching=self.sessions.scheduler.batching,
        )
