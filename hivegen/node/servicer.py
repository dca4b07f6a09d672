"""The gRPC face of a node: one Inference stream per session, plus Info for status and counters."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc
import torch

from hivegen import __version__
from hivegen.credits.attestation import StepClaim, chain_digest, sign_claim, step_input_digest, tensor_digest
from hivegen.credits.identity import Identity
from hivegen.node.errors import RequestError
from hivegen.node.sessions import Session, SessionManager
from hivegen.proto import node_pb2, node_pb2_grpc
from hivegen.proto.tensors import DTYPE_NAMES, serialize

logger = logging.getLogger(__name__)


class NodeServicer(node_pb2_grpc.NodeServicer):
    """Serves sessions; every step's answer is signed by the node's `identity` (the key its DHT records name)."""

    def __init__(
        self, sessions: SessionManager, node_id: str, model_name: str, num_blocks: int, identity: Identity
    ) -> None:
        self.sessions = sessions
        self.node_id = node_id
        self.model_name = model_name
        self.num_blocks = num_blocks
        self.identity = identity
        self.account = sessions.billing.account if sessions.billing is not None else ""

    def Inference(  # gRPC's method name
        self, request_iterator: Iterator[node_pb2.InferenceRequest], context: grpc.ServicerContext
    ) -> Iterator[node_pb2.InferenceResponse]:
        session: Session | None = None
        try:
            for request in request_iterator:
                kind = request.WhichOneof("kind")
                if kind == "open":
                    if session is not None:
                        raise RequestError(
                            grpc.StatusCode.FAILED_PRECONDITION,
                            f"this stream already serves session {session.session_id}; open one stream per session",
                        )
                    session = self.sessions.open(request.open)
                    logger.debug("opened session %s for blocks %d:%d", session.session_id, session.start, session.end)
                    yield node_pb2.InferenceResponse(
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
                elif kind == "step":
                    if session is None:
                        raise RequestError(
                            grpc.StatusCode.NOT_FOUND,
                            f"unknown session {request.step.session_id or '(empty)'}: send `open` first on this stream",
                        )
                    hidden, seconds = self.sessions.step(session, request.step)
                    yield node_pb2.InferenceResponse(result=self._signed_result(session, request.step, hidden, seconds))
                elif kind == "settle":
                    if session is None:
                        raise RequestError(grpc.StatusCode.NOT_FOUND, "settle before open: send `open` first")
                    seq = self.sessions.settle(session, request.settle)
                    yield node_pb2.InferenceResponse(settled=node_pb2.Settled(session_id=session.session_id, seq=seq))
                else:
                    raise RequestError(
                        grpc.StatusCode.INVALID_ARGUMENT, "empty InferenceRequest: set `open`, `step` or `settle`"
                    )
        except RequestError as exc:
            self.sessions.count_error()
            logger.info("refused a request: %s %s", exc.code.name, exc.message)
            if exc.metadata:
                context.set_trailing_metadata(exc.metadata)
            context.abort(exc.code, exc.message)
        except Exception as exc:  # a bug or a device error: this stream fails, the node keeps serving
            self.sessions.count_error()
            logger.exception("internal error in an inference stream")
            context.abort(grpc.StatusCode.INTERNAL, f"internal error on the node: {type(exc).__name__}: {exc}")
        finally:
            if session is not None:
                self.sessions.close(session.session_id)

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

    def Info(self, request: node_pb2.InfoRequest, context: grpc.ServicerContext) -> node_pb2.NodeInfo:
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
            ),
            num_parameters=span.num_parameters,
            version=__version__,
            account=self.account,
            receipts_pending=billing.pending() if (billing := self.sessions.billing) is not None else 0,
        )
