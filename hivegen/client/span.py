"""One hop of a route: a bidirectional stream to one node serving blocks [start, end) for one session.

Everything the node sends is checked before it is believed: the node must be the owner of the DHT record the
route came from, answer within a deadline, and answer each step with hidden states of exactly the shape and
dtype that step needs, finite where they count, signed by its key. Any failure is the answering node's fault:
a RemoteError with its own code (BAD_OUTPUT, BAD_SIGNATURE, BAD_IDENTITY, DEADLINE_EXCEEDED, ...), which
the inference session treats like a crash and routes around.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import torch

from hivegen.client.payer import Payer
from hivegen.client.routing import Hop
from hivegen.client.swarm import SwarmView
from hivegen.coordinator.client import grant_proof_needed
from hivegen.credits.attestation import StepClaim, chain_digest, step_input_digest, tensor_digest, verify_claim
from hivegen.credits.identity import account_of, is_public_key
from hivegen.credits.receipts import INSUFFICIENT_CREDITS
from hivegen.errors import InsufficientCredits, RemoteError
from hivegen.proto import ledger_pb2, node_pb2
from hivegen.proto.tensors import TensorDecodeError, deserialize, dtype_from_name, serialize

logger = logging.getLogger(__name__)

BAD_OUTPUT = "BAD_OUTPUT"  # an answer of the wrong kind, shape, dtype or size, or with NaN/inf
BAD_SIGNATURE = "BAD_SIGNATURE"  # an answer not signed by the key that owns the node's DHT record
BAD_IDENTITY = "BAD_IDENTITY"  # the node at the record's address is not the record's owner
BAD_PRICE = "BAD_PRICE"  # a node that counts a block's parameters differently from the checkpoint
OPEN_TIMEOUT = 2.0  # seconds for a node to accept a session: connect + first answer
SETTLE_TIMEOUT = 10.0  # seconds to wait for a node to acknowledge the final receipt
MIN_RECEIVE_BYTES = 1 << 20  # the smallest receive limit of a channel: room for any small session's answer
_CLOSE = object()


@dataclass
class StepInputs:
    """What was sent to a hop in one step: enough to rebuild its cache on a replacement node."""

    hidden: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor


@dataclass(frozen=True)
class Attestation:
    """A node's signed statement about one step (see hivegen.credits.attestation)."""

    input_digest: str
    output_digest: str
    history_digest: str
    signature: str


class ProvenFault(RemoteError):
    """A node signed an answer that is wrong on its face (wrong shape or dtype, NaN or infinities): its own
    signature proves it, so the client may ban and report it without asking anyone else."""

    def __init__(
        self, address: str, details: str, inputs: StepInputs, output: node_pb2.Tensor, attestation: Attestation
    ) -> None:
        super().__init__(address, BAD_OUTPUT, details)
        self.inputs = inputs
        self.output = output  # the wire tensor exactly as the node signed it
        self.attestation = attestation


class SpanSession:
    """One stream to one node for one session; keeps every step's inputs, outputs and signatures.

    With a node that charges, every step carries the receipt for the work of the steps before it and `settle`
    sends the receipt for all of it; `work` counts parameter-tokens as the node does. `timeout` fixes the step
    deadline; by default it is derived from the client's measurements of the node (SwarmView.health).
    """

    def __init__(
        self,
        swarm: SwarmView,
        hop: Hop,
        max_length: int,
        batch_size: int,
        timeout: float | None = None,
        payer: Payer | None = None,
        attest: bool = True,
        open_timeout: float = OPEN_TIMEOUT,
    ) -> None:
        self.swarm = swarm
        self.hop = hop
        self.session_id = uuid.uuid4().hex
        self.timeout = timeout
        self.batch_size = batch_size
        self.attest = attest  # check the node's signature on every answer
        self.dtype = dtype_from_name(hop.dtype)
        self.hidden_size = swarm.hidden_size
        self.history: list[StepInputs] = []
        self.outputs: list[torch.Tensor] = []
        self.attestations: list[Attestation] = []
        self.payer = payer
        self.node_account = ""  # set by the node's answer; empty if it serves for free
        self.work = 0  # parameter-tokens this node has done in the session
        self.signed_work = 0  # the most work a receipt signed so far pays for
        self._signed_seq = 0
        self._closed = threading.Event()
        self._counted = False
        self._requests: queue.Queue[object] = queue.Queue()
        self._responses: queue.Queue[object] = queue.Queue(maxsize=4)  # a node cannot flood the client
        element = torch.empty((), dtype=self.dtype).element_size()
        receive_limit = max(MIN_RECEIVE_BYTES, 2 * batch_size * max_length * self.hidden_size * element)
        self._call = swarm.stub(hop.address, receive_limit).Inference(self._request_iter())
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
                ledger_open=payer.open_request() if payer else None,
            )
        )
        try:
            self._check_opened(self._exchange(request, open_timeout))
        except BaseException:
            self.close()  # ends the stream and its reader thread
            raise
        self._counted = True  # one of the node's sessions, as routes count its load, until closed
        swarm.health.opened(hop.node_id)

    @property
    def paid(self) -> bool:
        return bool(self.node_account) and self.payer is not None

    @property
    def blocks(self) -> int:
        return self.hop.end - self.hop.start

    def step(self, inputs: StepInputs) -> tuple[torch.Tensor, float]:
        """Send one step; return the hop's checked output hidden states and the node's compute seconds."""
        step = node_pb2.Step(
            session_id=self.session_id,
            step_id=len(self.history),
            hidden_states=serialize(inputs.hidden.to(self.dtype)),
            position_ids=serialize(inputs.position_ids),
            attention_mask=serialize(inputs.attention_mask),
        )
        if self.paid and self.history:
            step.receipt.CopyFrom(self._receipt())
        positions = int(inputs.hidden.shape[1])
        timeout = self.timeout
        if timeout is None:
            timeout = self.swarm.health.step_timeout(self.hop.node_id, self.hop.block_seconds, self.blocks, positions)
        began = time.perf_counter()
        response = self._exchange(node_pb2.InferenceRequest(step=step), timeout)
        output = self._check_result(response, step, inputs)
        self.swarm.health.observe(self.hop.node_id, time.perf_counter() - began, self.blocks, positions)
        self.history.append(inputs)
        self.outputs.append(output)  # as the node signed it
        if self.payer is not None:
            self.work += inputs.hidden.shape[0] * positions * self._params_per_token
        # Padding positions are never used, but NaN there would spread through the next hop's attention
        # (0 x NaN is NaN): forward zeros instead.
        return torch.nan_to_num(output, nan=0.0, posinf=0.0, neginf=0.0), response.result.compute_seconds

    def settle(self) -> None:
        """Pay for every step so far with one last receipt (on a node that charges); failures are logged."""
        if not self.paid or not self.history or self._signed_seq == len(self.history):
            return
        settle = node_pb2.Settle(session_id=self.session_id, receipt=self._receipt())
        try:
            answer = self._exchange(node_pb2.InferenceRequest(settle=settle), SETTLE_TIMEOUT)
            if answer.WhichOneof("kind") != "settled":
                raise RemoteError(self.hop.address, BAD_OUTPUT, "expected `settled` in answer to `settle`")
        except RemoteError as exc:
            logger.warning("could not settle session %s with %s: %s", self.session_id, self.hop.address, exc)
            self.swarm.health.failed(self.hop.node_id, f"{exc.code} at settle: {exc.details}")

    def close(self) -> None:
        self._closed.set()
        self._requests.put(_CLOSE)
        self._call.cancel()
        if self._counted:
            self._counted = False
            self.swarm.health.closed(self.hop.node_id)

    @property
    def _params_per_token(self) -> int:
        assert self.payer is not None
        return self.payer.params_per_token(self.hop.start, self.hop.end)

    def _check_opened(self, answer: node_pb2.InferenceResponse) -> None:
        """The node must open exactly the session asked for, under the key its DHT record names."""
        if answer.WhichOneof("kind") != "opened":
            raise RemoteError(self.hop.address, BAD_OUTPUT, "expected `opened` as the first answer")
        opened = answer.opened
        if (opened.session_id, opened.start_block, opened.end_block) != (self.session_id, self.hop.start, self.hop.end):
            raise RemoteError(
                self.hop.address,
                BAD_OUTPUT,
                f"opened session {opened.session_id} blocks {opened.start_block}:{opened.end_block}, "
                f"not {self.session_id} blocks {self.hop.start}:{self.hop.end}",
            )
        if opened.dtype != self.hop.dtype:
            raise RemoteError(self.hop.address, BAD_OUTPUT, f"runs {opened.dtype}, its record says {self.hop.dtype}")
        if self.attest and opened.node_key != self.hop.owner:
            raise RemoteError(
                self.hop.address,
                BAD_IDENTITY,
                f"the node answers with key {opened.node_key[:16] or '(none)'}…, but the DHT record for this address "
                f"is owned by {self.hop.owner[:16]}…",
            )
        if opened.node_account and (
            not is_public_key(opened.node_key) or account_of(opened.node_key) != opened.node_account
        ):
            raise RemoteError(
                self.hop.address,
                BAD_IDENTITY,
                f"asks to be paid to account {opened.node_account}, which its key {opened.node_key[:16] or '(none)'}… "
                "does not own",
            )
        self.node_account = opened.node_account
        if self.node_account and self.payer is not None and opened.params_per_token != self._params_per_token:
            raise RemoteError(
                self.hop.address,
                BAD_PRICE,
                f"the node counts {opened.params_per_token} parameters per token for blocks "
                f"{self.hop.start}:{self.hop.end}; the checkpoint has {self._params_per_token}",
            )

    def _check_result(
        self, answer: node_pb2.InferenceResponse, step: node_pb2.Step, inputs: StepInputs
    ) -> torch.Tensor:
        """The answer to `step`, if it is one: right ids and kind, signed by the node, of the step's shape and
        dtype, finite where it counts. The signature is checked first, so a signed bad answer is proof."""
        address = self.hop.address
        if answer.WhichOneof("kind") != "result":
            raise RemoteError(address, BAD_OUTPUT, f"answered step {step.step_id} with `{answer.WhichOneof('kind')}`")
        result = answer.result
        if result.session_id != self.session_id or result.step_id != step.step_id:
            answered = f"session {result.session_id} step {result.step_id}"
            raise RemoteError(address, BAD_OUTPUT, f"answered {answered} to step {step.step_id}")
        attestation = None
        if self.attest:
            input_digest = step_input_digest(step)
            previous = self.attestations[-1].history_digest if self.attestations else ""
            claim = StepClaim(
                model_key=self.swarm.model_key,
                session_id=self.session_id,
                step=step.step_id,
                start=self.hop.start,
                end=self.hop.end,
                input_digest=input_digest,
                output_digest=tensor_digest(result.hidden_states),
                history_digest=chain_digest(previous, input_digest),
            )
            if not verify_claim(self.hop.owner, claim, result.signature):
                unsigned = f"step {step.step_id}'s answer is not signed by the node's key"
                raise RemoteError(address, BAD_SIGNATURE, unsigned)
            attestation = Attestation(claim.input_digest, claim.output_digest, claim.history_digest, result.signature)
        output, problem = self._decode_output(result.hidden_states, step.step_id, inputs)
        if problem:
            if attestation is not None and output is not None:
                raise ProvenFault(address, problem, inputs, result.hidden_states, attestation)
            raise RemoteError(address, BAD_OUTPUT, problem)
        assert output is not None
        if attestation is not None:
            self.attestations.append(attestation)
        return output

    def _decode_output(
        self, message: node_pb2.Tensor, step_id: int, inputs: StepInputs
    ) -> tuple[torch.Tensor | None, str]:
        """(tensor, "") for a well-formed answer; else what is wrong, with the tensor if it decodes at all."""
        try:
            output = deserialize(message)
        except TensorDecodeError as exc:
            return None, f"malformed hidden states: {exc}"
        expected = [self.batch_size, int(inputs.hidden.shape[1]), self.hidden_size]
        if message.dtype != self.hop.dtype or list(message.shape) != expected:
            got = f"{message.dtype} {list(message.shape)}"
            return output, f"returned {got} hidden states; step {step_id} needs {self.hop.dtype} {expected}"
        if not bool(torch.isfinite(output[inputs.attention_mask.to(torch.bool)]).all()):
            return output, f"returned NaN or infinite hidden states at step {step_id}"
        return output, ""

    def _receipt(self) -> ledger_pb2.Receipt:
        assert self.payer is not None
        self._signed_seq = len(self.history)
        self.signed_work = self.work
        return self.payer.receipt(self.session_id, self.node_account, self._signed_seq, self.work)

    def _exchange(self, request: node_pb2.InferenceRequest, timeout: float) -> node_pb2.InferenceResponse:
        if self._closed.is_set():
            raise RemoteError(self.hop.address, "CANCELLED", "the stream to this node is closed")
        self._requests.put(request)
        try:
            item = self._responses.get(timeout=timeout)
        except queue.Empty:
            self._call.cancel()
            raise RemoteError(self.hop.address, "DEADLINE_EXCEEDED", f"no answer within {timeout:.1f} s") from None
        if isinstance(item, grpc.RpcError):
            code = item.code() if hasattr(item, "code") else grpc.StatusCode.UNKNOWN
            details = item.details() if hasattr(item, "details") else str(item)
            _raise_insufficient(item, self.hop.address)
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (details or ""):
                raise RemoteError(self.hop.address, BAD_OUTPUT, f"sent an oversized answer ({details})")
            raise RemoteError(self.hop.address, code.name, details or "")
        assert isinstance(item, node_pb2.InferenceResponse)
        return item

    def _request_iter(self) -> Iterator[node_pb2.InferenceRequest]:
        while (item := self._requests.get()) is not _CLOSE:
            yield item  # type: ignore[misc]

    def _read(self) -> None:
        try:
            for response in self._call:
                self._put(response)
            self._put(grpc.RpcError("stream closed by the node"))
        except grpc.RpcError as exc:
            self._put(exc)

    def _put(self, item: object) -> None:
        """Queue an answer, waiting while the client has not read the earlier ones (until the session closes)."""
        while not self._closed.is_set():
            try:
                self._responses.put(item, timeout=0.5)
                return
            except queue.Full:
                continue


def _raise_insufficient(error: grpc.RpcError, address: str) -> None:
    """Turn a node's refusal for want of credits into InsufficientCredits (GrantProofNeeded for a new account)."""
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    need = grant_proof_needed(trailing)
    if need is not None:
        raise need
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
