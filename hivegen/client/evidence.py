"""Evidence against a node: its signed steps of one session, the answer it signed at the last of them, and what
other nodes computed instead (absent when the answer is wrong on its face: a wrong shape, NaN, infinities).

Built by the client that caught the node, kept under ~/.hivegen/evidence/<digest>.pb, sent to the coordinator.
`check_evidence` is how anyone holding the blocks settles it: re-run the signed inputs from an empty cache and
compare with what the node signed.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from hivegen.client.routing import Hop
from hivegen.client.span import Attestation, StepInputs
from hivegen.credits.attestation import relative_errors
from hivegen.errors import HivegenError
from hivegen.files import write_bytes_atomic
from hivegen.model.demo import hivegen_home
from hivegen.proto import node_pb2, reports_pb2
from hivegen.proto.tensors import deserialize, serialize

logger = logging.getLogger(__name__)
EVIDENCE_DIR = "evidence"


def build_evidence(
    model_key: str,
    hop: Hop,
    session_id: str,
    dtype: torch.dtype,
    steps: list[tuple[StepInputs, Attestation]],
    output: node_pb2.Tensor,
    expected: torch.Tensor | None,
    witnesses: list[str],
    tolerance: float,
) -> reports_pb2.Evidence:
    """Evidence that `hop`'s node answered the last of `steps` with `output` (the exact wire tensor it signed);
    `expected` is what the `witnesses` computed for those positions, None for a self-evidently wrong answer."""
    evidence = reports_pb2.Evidence(
        model_key=model_key,
        node_id=hop.node_id,
        node_key=hop.owner,
        node_address=hop.address,
        session_id=session_id,
        start_block=hop.start,
        end_block=hop.end,
        output=output,
        witnesses=witnesses,
        tolerance=tolerance,
        error=math.inf,
    )
    if expected is not None:
        mask = steps[-1][0].attention_mask
        evidence.expected.CopyFrom(serialize(expected.to(dtype)))
        evidence.error = float(relative_errors(deserialize(output), expected, mask).max())
    for index, (inputs, attestation) in enumerate(steps):
        evidence.steps.append(
            reports_pb2.SignedStep(
                step=index,
                hidden_states=serialize(inputs.hidden.to(dtype)),
                position_ids=serialize(inputs.position_ids),
                attention_mask=serialize(inputs.attention_mask),
                output_digest=attestation.output_digest,
                signature=attestation.signature,
            )
        )
    return evidence


def evidence_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_evidence(evidence: reports_pb2.Evidence) -> str:
    """Keep the evidence under ~/.hivegen/evidence/<digest>.pb (the digest is the SHA-256 of the bytes)."""
    data = evidence.SerializeToString(deterministic=True)
    digest = evidence_digest(data)
    try:
        folder = hivegen_home() / EVIDENCE_DIR
        folder.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(folder / f"{digest}.pb", data)
    except OSError as exc:
        logger.warning("could not keep evidence %s: %s", digest, exc)
    return digest


class EvidenceError(HivegenError):
    """Evidence cannot be checked as asked (e.g. against another model than the one it is about)."""


@dataclass(frozen=True)
class Verdict:
    """What re-running the evidence's steps showed."""

    signed: bool  # every step is signed by the accused node's key, and the output is the one it signed
    error: float  # largest relative error of the node's output vs the re-run over unpadded positions (inf: malformed)
    tolerance: float
    witnesses_error: float | None  # the same for the witnesses' `expected`, if given

    @property
    def proven(self) -> bool:
        """The node signed an answer that its blocks do not compute."""
        return self.signed and self.error > self.tolerance


def check_evidence(evidence: reports_pb2.Evidence, model: str | Path, device: str = "cpu") -> Verdict:
    """Re-run the evidence's signed inputs through blocks [start, end) of `model` from an empty cache and compare
    the last step with the answer the node signed (and with what the witnesses computed)."""
    from hivegen.coordinator.reports import ReportRejected, check_evidence_signatures
    from hivegen.model.checkpoint import ModelCheckpoint
    from hivegen.model.span import BlockSpan

    try:
        check_evidence_signatures(evidence)
    except ReportRejected as exc:
        logger.warning("evidence does not hold: %s", exc)
        return Verdict(False, 0.0, evidence.tolerance, None)
    checkpoint = ModelCheckpoint.open(model)
    if checkpoint.model_key != evidence.model_key:
        raise EvidenceError(
            f"the evidence is about model {evidence.model_key}, but {model} is {checkpoint.model_key}; "
            "check it against the checkpoint the node served"
        )
    signed = True
    last = evidence.steps[-1]
    dtype = deserialize(last.hidden_states).dtype
    span = BlockSpan(checkpoint, evidence.start_block, evidence.end_block, dtype=dtype, device=device)
    cache = span.new_cache()
    masks: list[torch.Tensor] = []
    rerun = torch.empty(0)
    for step in evidence.steps:
        masks.append(deserialize(step.attention_mask))
        mask = torch.cat(masks, dim=1)
        rerun = span.forward(deserialize(step.hidden_states), deserialize(step.position_ids), mask, cache).cpu()
    step_mask = masks[-1]
    shapes_match = (evidence.output.dtype, list(evidence.output.shape)) == (last.hidden_states.dtype, list(rerun.shape))
    error = float(relative_errors(deserialize(evidence.output), rerun, step_mask).max()) if shapes_match else math.inf
    witnesses = None
    if evidence.HasField("expected"):
        witnesses = float(relative_errors(deserialize(evidence.expected), rerun, step_mask).max())
    return Verdict(signed, error, evidence.tolerance, witnesses)
