"""Verification of node work by re-execution: a hop's inputs, replayed as one prefill on another node that
serves the same blocks, must reproduce every answer the hop gave, within a tolerance for the dtype.

The client keeps each hop's inputs and outputs for the whole generation, so one prefill on a second node checks
all of a hop's steps at once. If the two disagree, a third node breaks the tie: the node it outvotes is banned
(for this client's life and in ~/.hivegen), reported to the coordinator with its own signed answers as
evidence, and left unpaid; if the liar's answers were used, the tokens they shaped are retracted and generated
again without it. With no third node, or three that disagree, nothing can be settled: VerificationError.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from hivegen.client.evidence import build_evidence, relative_errors, save_evidence
from hivegen.client.routing import Hop, claimed_block_seconds
from hivegen.client.session import InferenceSession
from hivegen.client.span import ProvenFault, SpanSession, StepInputs
from hivegen.dht import SpanRecord
from hivegen.errors import RemoteError, VerificationError
from hivegen.proto import reports_pb2
from hivegen.proto.tensors import serialize

logger = logging.getLogger(__name__)

# Largest relative L2 error per position between two honest runs of the same blocks on the same inputs
# (prefill vs step-by-step decode, other kernels, other devices), per dtype; see benchmarks/verification.py.
TOLERANCES: dict[str, float] = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 8e-2}
DEFAULT_RATE = 0.25  # share of hops re-executed in full; the others get a spot check of a random prefix
PROBATION = 1  # generations through a node this client has never verified that are checked in full
MAX_CANDIDATES = 4  # re-execution nodes tried per hop before giving up on one that fails to answer
CHUNK_BYTES = 32 << 20  # re-execution sends at most this much hidden state per message


@dataclass(frozen=True)
class VerifyPolicy:
    """How much node work a client re-executes, per hop of each generation.

    A share `rate` of hops is re-executed in full (0: none, 1: every hop of every generation); with `spot`, each
    other hop is spot-checked: its steps 0..s are re-executed for a random s, which costs one prefill of those
    positions and catches any node that lies from its first step on. A node that has passed fewer than
    `probation` checks with this client is re-executed in full.
    """

    rate: float = DEFAULT_RATE
    spot: bool = True
    probation: int = PROBATION
    tolerances: Mapping[str, float] = field(default_factory=lambda: dict(TOLERANCES))

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"verify rate must be in [0, 1], got {self.rate}")
        if self.probation < 0:
            raise ValueError(f"probation must be >= 0, got {self.probation}")

    @property
    def mode(self) -> str:
        if self.rate >= 1.0:
            return "all"
        return "off" if self.rate == 0.0 and not self.spot and self.probation == 0 else "sample"

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def tolerance(self, dtype: str) -> float:
        return self.tolerances.get(dtype, max(self.tolerances.values()))

    @classmethod
    def parse(cls, value: VerifyPolicy | str | float | bool | None) -> VerifyPolicy:
        """None or "default": the default; "off"/False/0: nothing; "all"/True/1: every hop in full; a rate in
        (0, 1): that share of hops in full and spot checks of the others."""
        if isinstance(value, VerifyPolicy):
            return value
        if value is None or value == "default":
            return cls()
        if value is False or value == "off":
            return cls.off()
        if value is True or value == "all":
            return cls(rate=1.0)
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"verify must be 'off', 'default', 'all' or a rate in [0, 1], not {value!r}") from None
        rate = float(value)
        return cls.off() if rate == 0.0 else cls(rate=rate)

    @classmethod
    def off(cls) -> VerifyPolicy:
        return cls(rate=0.0, spot=False, probation=0)


@dataclass
class HopCheck:
    """The verification of one hop session: who served it, who re-ran it, and what came out."""

    node_id: str
    address: str
    start: int
    end: int
    steps: int
    positions: int
    # "match" (every step re-executed and matched), "partial" (a prefix of the steps matched), "lied",
    # "unverifiable" (no other node serves these blocks) or "skipped" (not sampled)
    result: str
    checked_steps: int = 0
    verified_by: list[str] = field(default_factory=list)
    max_error: float | None = None
    tolerance: float | None = None

    def to_record(self) -> dict[str, Any]:
        return {
            "node": self.node_id,
            "address": self.address,
            "blocks": [self.start, self.end],
            "steps": self.steps,
            "positions": self.positions,
            "result": self.result,
            "checked_steps": self.checked_steps,
            "verified_by": list(self.verified_by),
            "max_error": self.max_error,
            "tolerance": self.tolerance,
        }


@dataclass
class VerificationReport:
    """What verification found in one generation."""

    mode: str
    hops: list[HopCheck] = field(default_factory=list)
    liars: list[str] = field(default_factory=list)  # node ids proven wrong (banned)
    evidence: list[str] = field(default_factory=list)  # evidence digests, one per liar
    first_bad_step: int | None = None  # the first step whose tokens a liar's answer shaped

    @property
    def verified(self) -> bool:
        """Every hop was re-executed: each matched, or lied and the tokens its lies shaped were generated again
        (its answers before the first lie matched), so every token that stands rests on checked work."""
        return bool(self.hops) and all(h.result in ("match", "lied") for h in self.hops)

    def merge(self, other: VerificationReport) -> None:
        self.hops += other.hops
        self.liars += other.liars
        self.evidence += other.evidence

    def to_record(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "verified": self.verified,
            "hops": [h.to_record() for h in self.hops],
            "liars": list(self.liars),
            "evidence": list(self.evidence),
        }


Reporter = Callable[[reports_pb2.Evidence], None]


class Verifier:
    """Re-executes the hops of finished generations according to a policy; bans, reports and retracts liars."""

    def __init__(self, policy: VerifyPolicy, report: Reporter | None = None, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.report = report  # sends evidence to the coordinator (set when the client knows one)
        self.rng = rng or random.Random()
        self._passed: dict[str, int] = {}  # node id -> checks passed with this client

    def verify(self, session: InferenceSession) -> VerificationReport:
        """Check the hops of `session` (before it settles); liars are banned and left unpaid."""
        report = VerificationReport(self.policy.mode)
        if not self.policy.enabled:
            return report
        for span in session.all_spans:
            if not span.outputs:
                continue
            steps = self._steps_to_check(span)
            if not steps:
                report.hops.append(_hop_check(span, "skipped"))
                continue
            report.hops.append(self._check(session, span, steps, report))
        return report

    def _steps_to_check(self, span: SpanSession) -> int:
        """How many of the hop's steps (from the first) to re-execute: all, a random prefix, or none."""
        steps = len(span.outputs)
        if self._passed.get(span.hop.node_id, 0) < self.policy.probation:
            return steps
        if self.policy.rate >= 1.0 or self.rng.random() < self.policy.rate:
            return steps
        return self.rng.randint(1, steps) if self.policy.spot else 0

    def _check(self, session: InferenceSession, span: SpanSession, steps: int, report: VerificationReport) -> HopCheck:
        """Re-execute the hop's first `steps` steps elsewhere; a third node settles a disagreement."""
        tolerance = self.policy.tolerance(span.hop.dtype)
        check = _hop_check(span, "unverifiable")
        check.tolerance = tolerance
        inputs = _concat_inputs(span, steps)
        original = torch.cat(span.outputs[:steps], dim=1)
        tried = {span.hop.node_id}
        first = self._rerun(session, span.hop, inputs, tried)
        if first is None:
            logger.info("no other node serves blocks %d:%d in %s: hop unverified", span.hop.start, span.hop.end,
                        span.hop.dtype)  # fmt: skip
            return check
        witness, witness_out = first
        error = relative_errors(original, witness_out, inputs.attention_mask)
        check.max_error = float(error.max())
        check.verified_by = [witness.hop.node_id]
        check.checked_steps = steps
        if check.max_error <= tolerance:
            check.result = "match" if steps == len(span.outputs) else "partial"
            self._passed[span.hop.node_id] = self._passed.get(span.hop.node_id, 0) + 1
            return check
        third = self._rerun(session, span.hop, inputs, tried)
        if third is None:
            raise VerificationError(
                f"nodes {span.hop.node_id} ({span.hop.address}) and {witness.hop.node_id} ({witness.hop.address}) "
                f"disagree on blocks {span.hop.start}:{span.hop.end} (error {check.max_error:.3g} > tolerance "
                f"{tolerance:.3g}) and no third node serves those blocks to break the tie; nothing was committed",
                [span.hop.node_id, witness.hop.node_id],
            )
        judge, judge_out = third
        check.verified_by.append(judge.hop.node_id)
        agrees_with_witness = float(relative_errors(judge_out, witness_out, inputs.attention_mask).max()) <= tolerance
        agrees_with_original = float(relative_errors(judge_out, original, inputs.attention_mask).max()) <= tolerance
        if agrees_with_witness and not agrees_with_original:
            check.result = "lied"
            bad = _first_bad_step(span, error, tolerance)
            report.first_bad_step = bad if report.first_bad_step is None else min(report.first_bad_step, bad)
            self._convict(session, span, witness_out, error, [witness.hop.node_id, judge.hop.node_id], tolerance,
                          report)  # fmt: skip
            return check
        if agrees_with_original and not agrees_with_witness:  # the first re-execution lied, not the hop
            werror = relative_errors(witness_out, original, inputs.attention_mask)
            self._convict(session, witness, original, werror, [span.hop.node_id, judge.hop.node_id], tolerance,
                          report)  # fmt: skip
            check.verified_by = [judge.hop.node_id]
            check.max_error = float(relative_errors(original, judge_out, inputs.attention_mask).max())
            check.result = "match" if steps == len(span.outputs) else "partial"
            self._passed[span.hop.node_id] = self._passed.get(span.hop.node_id, 0) + 1
            return check
        nodes = [span.hop.node_id, witness.hop.node_id, judge.hop.node_id]
        raise VerificationError(
            f"three nodes disagree on blocks {span.hop.start}:{span.hop.end}: {', '.join(nodes)}; "
            "nothing was committed",
            nodes,
        )

    def _rerun(
        self, session: InferenceSession, hop: Hop, inputs: StepInputs, tried: set[str]
    ) -> tuple[SpanSession, torch.Tensor] | None:
        """Re-run `inputs` through blocks [hop.start, hop.end) on a node not yet tried; None if none answers."""
        candidates = session.swarm.covering(hop.start, hop.end, hop.dtype, exclude=tried | session.failed_nodes)
        self.rng.shuffle(candidates)
        for record in candidates[:MAX_CANDIDATES]:
            tried.add(record.node_id)
            runner_hop = _hop_on(record, hop)
            try:
                runner = session.open_span(runner_hop, max_length=int(inputs.hidden.shape[1]))
            except RemoteError as exc:
                session.swarm.health.failed(record.node_id, f"{exc.code}: {exc.details}")
                continue
            session.checks.append(runner)
            try:
                outputs = [runner.step(chunk)[0] for chunk in _chunks(inputs, runner)]
                runner.settle()
            except RemoteError as exc:
                logger.warning("re-execution on %s failed: %s", record.address, exc)
                session.swarm.health.failed(record.node_id, f"{exc.code}: {exc.details}")
                continue
            finally:
                runner.close()
            return runner, torch.cat(outputs, dim=1)
        return None

    def _convict(
        self,
        session: InferenceSession,
        liar: SpanSession,
        expected: torch.Tensor,
        error: torch.Tensor,
        witnesses: list[str],
        tolerance: float,
        report: VerificationReport,
    ) -> None:
        """Ban `liar` for answers that other nodes' re-execution contradicts (`error`: per position, over the
        steps re-executed); keep and report the evidence."""
        step = _first_bad_step(liar, error, tolerance)
        offset = sum(int(h.hidden.shape[1]) for h in liar.history[:step])
        width = int(liar.history[step].hidden.shape[1])
        evidence = build_evidence(
            session.swarm.model_key,
            liar.hop,
            liar.session_id,
            liar.dtype,
            list(zip(liar.history[: step + 1], liar.attestations[: step + 1], strict=True)),
            serialize(liar.outputs[step]),
            expected[:, offset : offset + width],
            witnesses,
            tolerance,
        )
        digest = self._punish(session, liar.hop, evidence, f"wrong hidden states at step {step}")
        report.liars.append(liar.hop.node_id)
        report.evidence.append(digest)

    def convict_fault(self, session: InferenceSession, span: SpanSession, fault: ProvenFault) -> None:
        """Ban a node that signed a self-evidently wrong answer (wrong shape or dtype, NaN, infinities)."""
        steps = [*zip(span.history, span.attestations, strict=True), (fault.inputs, fault.attestation)]
        evidence = build_evidence(
            session.swarm.model_key, span.hop, span.session_id, span.dtype, steps, fault.output, None, [],
            self.policy.tolerance(span.hop.dtype),
        )  # fmt: skip
        self._punish(session, span.hop, evidence, fault.details)

    def _punish(self, session: InferenceSession, hop: Hop, evidence: reports_pb2.Evidence, reason: str) -> str:
        """Ban the node, stop paying it, keep the evidence and report it; return the evidence digest."""
        digest = save_evidence(evidence)
        session.unpaid.add(hop.node_id)
        session.swarm.bans.ban(hop.owner, hop.node_id, hop.address, reason, digest)
        logger.warning(
            "node %s (%s) signed a wrong answer for blocks %d:%d (%s); banned; evidence %s",
            hop.node_id, hop.address, hop.start, hop.end, reason, digest,
        )  # fmt: skip
        if self.report is not None:
            try:
                self.report(evidence)
            except Exception as exc:  # reporting is best effort: the ban and the local evidence stand
                logger.warning("could not report node %s to the coordinator: %s", hop.node_id, exc)
        return digest


def _hop_check(span: SpanSession, result: str) -> HopCheck:
    return HopCheck(
        node_id=span.hop.node_id,
        address=span.hop.address,
        start=span.hop.start,
        end=span.hop.end,
        steps=len(span.outputs),
        positions=sum(int(o.shape[1]) for o in span.outputs),
        result=result,
    )


def _hop_on(record: SpanRecord, hop: Hop) -> Hop:
    return Hop(record.node_id, record.address, hop.start, hop.end, record.dtype, claimed_block_seconds(record))


def _concat_inputs(span: SpanSession, count: int) -> StepInputs:
    """The inputs of the first `count` answered steps, as one prefill."""
    steps = span.history[: min(count, len(span.outputs))]
    return StepInputs(
        torch.cat([s.hidden for s in steps], dim=1),
        torch.cat([s.position_ids for s in steps], dim=1),
        torch.cat([s.attention_mask for s in steps], dim=1),
    )


def _chunks(inputs: StepInputs, runner: SpanSession) -> list[StepInputs]:
    """Split a long prefill into messages of at most CHUNK_BYTES of hidden state."""
    batch, length, hidden = inputs.hidden.shape
    per_position = batch * hidden * torch.empty((), dtype=runner.dtype).element_size()
    size = max(1, CHUNK_BYTES // max(1, per_position))
    cut = [slice(i, i + size) for i in range(0, length, size)]
    return [StepInputs(inputs.hidden[:, c], inputs.position_ids[:, c], inputs.attention_mask[:, c]) for c in cut]


def _first_bad_step(span: SpanSession, error: torch.Tensor, tolerance: float) -> int:
    """The first step of `span` with a position whose error (over the steps re-executed) exceeds `tolerance`."""
    offset = 0
    for index, inputs in enumerate(span.history[: len(span.outputs)]):
        width = int(inputs.hidden.shape[1])
        if offset >= error.shape[1]:
            break
        if bool((error[:, offset : offset + width] > tolerance).any()):
            return index
        offset += width
    raise AssertionError("no position exceeds the tolerance")
