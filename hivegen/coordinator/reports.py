"""Reports of lying nodes: the coordinator checks a client's evidence, keeps it, and lists the nodes reported.

The coordinator does not hold the model, so it cannot re-run the blocks. What it checks proves that the accused
node signed the inputs of steps 0..k of a session and the output of step k, and that this output is farther than
the tolerance from what the witnesses computed. Whether the witnesses or the node are right is not proven: a
listing is an accusation with checkable evidence, not a verdict. Anyone holding the blocks can fetch the evidence
(`GET /evidence/<digest>` on the status page) and re-run the steps from an empty cache to settle it.

Evidence is at most 32 MiB a report (storage and its bounds: hivegen.coordinator.report_store). Accounts cost
nothing to make, so the number of distinct reporters is a hint, not proof of independent witnesses.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field

import grpc
import torch
from google.protobuf.message import DecodeError

from hivegen.credits.attestation import (
    StepClaim,
    chain_digest,
    relative_errors,
    step_input_digest,
    tensor_digest,
    tolerance_for,
    verify_claim,
)
from hivegen.credits.identity import PUBLIC_KEY_PATTERN, Identity, account_of, verify_signature
from hivegen.errors import HivegenError
from hivegen.proto import node_pb2, reports_pb2
from hivegen.proto.tensors import TensorDecodeError, deserialize
from hivegen.store.encoding import canonical_bytes

logger = logging.getLogger(__name__)

REPORT_KIND = "hivegen.report"
REPORT_VERSION = 1
MAX_EVIDENCE_BYTES = 32 * 1024 * 1024  # one session's steps of a small span; larger evidence is refused unread
MAX_STEPS = 16_384  # each step costs one Ed25519 verification
MAX_CLOCK_SKEW_S = 600.0  # a report's `at` must be this close to the coordinator's clock
MAX_TEXT_CHARS = 256  # model key, session id, node id and address are stored and shown: keep them short


class ReportRejected(HivegenError):
    """The coordinator refused a report; `reason` says which check failed and `status` the gRPC code it maps to."""

    _INVALID = ("stale", "too-large", "malformed", "node-mismatch", "unsigned-step", "digest-mismatch", "no-error")
    STATUS = {
        "bad-signature": grpc.StatusCode.PERMISSION_DENIED,  # the reporter is not who it says
        **dict.fromkeys(_INVALID, grpc.StatusCode.INVALID_ARGUMENT),  # the evidence proves nothing
        **dict.fromkeys(("too-many-reports", "storage-full"), grpc.StatusCode.RESOURCE_EXHAUSTED),  # a bound is hit
    }

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in self.STATUS:
            raise ValueError(f"unknown report rejection reason {reason!r}; use one of {sorted(self.STATUS)}")
        self.reason = reason
        self.detail = detail
        self.status = self.STATUS[reason]
        super().__init__(f"report rejected ({reason}): {detail}")


@dataclass(frozen=True)
class CheckedReport:
    """A report that passed every check, with the coordinator's own measure of the error."""

    digest: str  # SHA-256 (hex) of the evidence bytes
    evidence: bytes = field(repr=False)
    reporter: str
    node_key: str
    node_id: str
    node_address: str
    model_key: str
    error: float  # recomputed in float32 over step k's unpadded positions; inf for a non-finite output
    tolerance: float
    at: float


def report_payload(evidence_digest: str, at: float) -> bytes:
    """The bytes a reporter signs: canonical JSON tagged so that no other signed message can match them."""
    return canonical_bytes({"kind": REPORT_KIND, "v": REPORT_VERSION, "evidence": evidence_digest, "at": float(at)})


def sign_report(identity: Identity, evidence_bytes: bytes, at: float | None = None) -> reports_pb2.Report:
    """A Report of serialized Evidence, signed by `identity` at `at` (default: now)."""
    at = time.time() if at is None else float(at)
    signature = identity.sign(report_payload(hashlib.sha256(evidence_bytes).hexdigest(), at))
    return reports_pb2.Report(
        evidence=evidence_bytes,
        reporter=identity.account,
        reporter_key=identity.public_key_hex,
        at=at,
        signature=signature.hex(),
    )


def check_report(report: reports_pb2.Report, now: float | None = None) -> CheckedReport:
    """Check everything the coordinator can without the model; raise ReportRejected naming the first failure."""
    now = time.time() if now is None else now
    data = bytes(report.evidence)
    if len(data) > MAX_EVIDENCE_BYTES:
        raise ReportRejected("too-large", f"evidence is {len(data)} bytes; at most {MAX_EVIDENCE_BYTES} are accepted")
    if not math.isfinite(report.at) or abs(now - report.at) > MAX_CLOCK_SKEW_S:
        raise ReportRejected(
            "stale", f"report time {report.at} is more than {MAX_CLOCK_SKEW_S:.0f} s from {now:.0f}; check your clock"
        )
    digest = hashlib.sha256(data).hexdigest()
    _check_reporter(report, digest)
    try:
        evidence = reports_pb2.Evidence.FromString(data)
    except DecodeError as exc:
        raise ReportRejected("malformed", f"evidence bytes are not a serialized Evidence: {exc}") from exc
    _check_fields(evidence)
    _check_steps(evidence)
    return CheckedReport(
        digest=digest,
        evidence=data,
        reporter=report.reporter,
        node_key=evidence.node_key,
        node_id=evidence.node_id,
        node_address=evidence.node_address,
        model_key=evidence.model_key,
        error=measure_error(evidence),
        tolerance=evidence.tolerance,
        at=report.at,
    )


def check_evidence_signatures(evidence: reports_pb2.Evidence) -> None:
    """The evidence's fields are well formed, every step is signed by the accused node over its inputs, and the
    output is the one it signed for the last step; ReportRejected naming the first failure otherwise."""
    _check_fields(evidence)
    _check_steps(evidence)


def _check_reporter(report: reports_pb2.Report, digest: str) -> None:
    key = report.reporter_key
    if not PUBLIC_KEY_PATTERN.fullmatch(key) or account_of(key) != report.reporter:
        raise ReportRejected("bad-signature", f"reporter key {key[:16]!r}... does not own account {report.reporter!r}")
    try:
        signature = bytes.fromhex(report.signature)
    except ValueError:
        signature = b""
    if not verify_signature(key, signature, report_payload(digest, report.at)):
        raise ReportRejected("bad-signature", f"the signature is not {report.reporter}'s signature of this report")


def _check_fields(e: reports_pb2.Evidence) -> None:
    if not PUBLIC_KEY_PATTERN.fullmatch(e.node_key):
        raise ReportRejected("malformed", "node_key must be 64 lowercase hex characters")
    if not e.node_id.endswith("@" + e.node_key) or len(e.node_id) == len(e.node_key) + 1:
        raise ReportRejected("node-mismatch", f"node_id {e.node_id[:80]!r} is not '<peer id>@{e.node_key}'")
    for name in ("model_key", "session_id", "node_id", "node_address"):
        value = getattr(e, name)
        if len(value) > MAX_TEXT_CHARS or not value.isprintable() or (not value and name != "node_address"):
            raise ReportRejected("malformed", f"{name} must be printable text of 1 to {MAX_TEXT_CHARS} characters")
    if e.start_block >= e.end_block:
        raise ReportRejected("malformed", f"blocks [{e.start_block}, {e.end_block}) are empty")
    if not (math.isfinite(e.tolerance) and e.tolerance > 0):
        raise ReportRejected("malformed", f"tolerance must be a positive finite number, not {e.tolerance}")


def _check_steps(e: reports_pb2.Evidence) -> None:
    """Every step is signed by the node over its inputs, and the output is the one it signed at step k."""
    if not 0 < len(e.steps) <= MAX_STEPS:
        raise ReportRejected("malformed", f"evidence must hold 1 to {MAX_STEPS} steps, not {len(e.steps)}")
    if any(s.step != i for i, s in enumerate(e.steps)):
        raise ReportRejected("malformed", "steps must be 0, 1, ..., k in order, from the start of the session")
    history = ""
    for s in e.steps:
        inputs = node_pb2.Step(
            hidden_states=s.hidden_states, position_ids=s.position_ids, attention_mask=s.attention_mask
        )
        input_digest = step_input_digest(inputs)
        history = chain_digest(history, input_digest)  # binds step k to exactly these inputs 0..k
        claim = StepClaim(
            model_key=e.model_key,
            session_id=e.session_id,
            step=s.step,
            start=e.start_block,
            end=e.end_block,
            input_digest=input_digest,
            output_digest=s.output_digest,
            history_digest=history,
        )
        if not verify_claim(e.node_key, claim, s.signature):
            raise ReportRejected(
                "unsigned-step", f"step {s.step} is not signed by node key {e.node_key[:16]}... with these inputs"
            )
    if tensor_digest(e.output) != e.steps[-1].output_digest:
        raise ReportRejected("digest-mismatch", "the output's digest is not the one the node signed for the last step")


def measure_error(e: reports_pb2.Evidence) -> float:
    """The largest relative L2 error ||output_p - expected_p|| / max(||output_p||, ||expected_p||) over the last
    step's positions whose attention_mask is 1, in float32 (hivegen.credits.attestation.relative_errors);
    ReportRejected("no-error") unless it exceeds the tolerance, which may be no tighter than honest runs need.

    Evidence without `expected` accuses a self-evidently wrong answer: blocks map hidden states of shape
    [batch, new, hidden] to the same shape, with finite values, so an output of another shape, dtype, or with
    NaN or infinities at unpadded positions is proven wrong by the node's own signature alone (error = inf).
    """
    if not e.HasField("expected"):
        return _self_evident_error(e)
    try:
        output, expected = deserialize(e.output), deserialize(e.expected)
        mask = deserialize(e.steps[-1].attention_mask)
    except TensorDecodeError as exc:
        raise ReportRejected("malformed", f"a tensor does not decode: {exc}") from exc
    if not (output.is_floating_point() and expected.is_floating_point()):
        raise ReportRejected("malformed", f"output and expected must be floats, not {output.dtype}, {expected.dtype}")
    if output.dim() != 3 or output.shape != expected.shape or mask.shape != output.shape[:2]:
        raise ReportRejected(
            "malformed",
            f"output {list(output.shape)} and expected {list(expected.shape)} must be [batch, new, hidden] "
            f"with the last step's attention_mask {list(mask.shape)} as [batch, new]",
        )
    if not torch.isfinite(expected.float()).all():
        raise ReportRejected("malformed", "expected holds non-finite values; witnesses never agree on those")
    floor = tolerance_for(e.output.dtype)
    if e.tolerance < floor:
        raise ReportRejected(
            "malformed",
            f"tolerance {e.tolerance:.3g} is tighter than {floor:.3g}, all honest {e.output.dtype} runs get",
        )
    relative = relative_errors(output, expected, torch.ones_like(mask))
    compared = relative[mask == 1]
    if compared.numel() == 0:
        raise ReportRejected("no-error", "the last step has no unpadded position to compare")
    worst = float(compared.max())
    if not worst > e.tolerance:
        raise ReportRejected("no-error", f"the largest error {worst:.3g} is within the tolerance {e.tolerance:.3g}")
    return worst


def _self_evident_error(e: reports_pb2.Evidence) -> float:
    for step in e.steps:  # a node is only to blame for a bad output if every input it signed for was sound
        try:
            sound = bool(torch.isfinite(deserialize(step.hidden_states).float()).all())
        except TensorDecodeError as exc:
            raise ReportRejected("malformed", f"step {step.step}'s inputs do not decode: {exc}") from exc
        if not sound:
            raise ReportRejected("malformed", f"step {step.step}'s inputs hold NaN or infinities: nothing to blame")
    inputs = e.steps[-1].hidden_states
    if (e.output.dtype, list(e.output.shape)) != (inputs.dtype, list(inputs.shape)):
        return math.inf  # the signed answer cannot be the blocks' output for these inputs
    try:
        output, mask = deserialize(e.output), deserialize(e.steps[-1].attention_mask)
    except TensorDecodeError as exc:
        raise ReportRejected("malformed", f"a tensor does not decode: {exc}") from exc
    if output.dim() != 3 or mask.shape != output.shape[:2]:
        raise ReportRejected("malformed", f"output {list(output.shape)} is not [batch, new, hidden]")
    if not bool(torch.isfinite(output.float()[mask == 1]).all()):
        return math.inf
    raise ReportRejected(
        "no-error", "without `expected`, the output must have the wrong shape or dtype, or non-finite values"
    )
