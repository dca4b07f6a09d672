"""Verification of node work by re-execution: a hop's inputs, replayed as one prefill through other nodes that
serve the same blocks, must reproduce every answer the hop gave, within a tolerance for the dtype.

The client keeps each hop's inputs and outputs for the whole generation, so one prefill elsewhere checks all of
a hop's steps at once. The witness is one node when one serves the hop's blocks, else a chain of them, owned by
other keys than the hop's node and chosen at random (nodes this client already found honest first), never by
what records claim. If witness and hop disagree, a judge (owned by yet other keys) breaks the tie: the node it
outvotes is banned (for this client's life and in ~/.hivegen), reported to the coordinator with its own signed
answers as evidence, and left unpaid; if the liar's answers were used, the tokens they shaped are retracted and
generated again without it. With no judge, or no majority, nothing can be settled: VerificationError.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hivegen.client.evidence import build_evidence, save_evidence
from hivegen.client.routing import Hop
from hivegen.client.session import InferenceSession
from hivegen.client.span import ProvenFault, SpanSession, StepInputs
from hivegen.client.verification import (
    DEFAULT_RATE,
    PROBATION,
    TOLERANCES,
    HopCheck,
    VerificationReport,
    VerifyPolicy,
)
from hivegen.credits.attestation import relative_errors
from hivegen.errors import RemoteError, VerificationError
from hivegen.proto import reports_pb2
from hivegen.proto.tensors import serialize

__all__ = ["DEFAULT_RATE", "PROBATION", "TOLERANCES", "Verifier", "VerifyPolicy"]

logger = logging.getLogger(__name__)

MAX_WITNESS_TRIES = 4  # witness routes tried per role before giving up on ones that fail to answer
CHUNK_BYTES = 32 << 20  # re-execution sends at most this much hidden state per message
REPORT_TIMEOUT = 10.0  # seconds `close` waits for reports still being sent

Reporter = Callable[[reports_pb2.Evidence], None]


@dataclass
class Witness:
    """A re-execution of a hop's inputs: the sessions on the nodes that ran it, and what came out."""

    runners: list[SpanSession]
    output: torch.Tensor

    @property
    def node_ids(self) -> list[str]:
        return [r.hop.node_id for r in self.runners]

    @property
    def owners(self) -> set[str]:
        return {r.hop.owner for r in self.runners}


class Verifier:
    """Re-executes the hops of finished generations according to a policy; bans, reports and retracts liars."""

    def __init__(self, policy: VerifyPolicy, report: Reporter | None = None, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.report = report  # sends evidence to the coordinator (set when the client knows one)
        self.rng = rng or random.Random()
        self._passed: dict[str, int] = {}  # node id -> checks passed with this client
        self._reports: list[threading.Thread] = []

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

    def close(self) -> None:
        """Wait (boundedly) for reports still on their way to the coordinator."""
        for thread in self._reports:
            thread.join(REPORT_TIMEOUT)
        self._reports.clear()

    def _steps_to_check(self, span: SpanSession) -> int:
        """How many of the hop's steps (from the first) to re-execute: all, a random prefix, or none."""
        steps = len(span.outputs)
        if self._passed.get(span.hop.node_id, 0) < self.policy.probation:
            return steps
        if self.policy.rate >= 1.0 or self.rng.random() < self.policy.rate:
            return steps
        return self.rng.randint(1, steps) if self.policy.spot else 0

    def _check(self, session: InferenceSession, span: SpanSession, steps: int, report: VerificationReport) -> HopCheck:
        """Re-execute the hop's first `steps` steps elsewhere; a judge settles a disagreement."""
        tolerance = self.policy.tolerance(span.hop.dtype)
        check = _hop_check(span, "unverifiable")
        check.tolerance = tolerance
        inputs = _concat_inputs(span, steps)
        original = torch.cat(span.outputs[:steps], dim=1)
        witnesses: list[Witness] = []
        try:
            witness = self._rerun(session, span.hop, inputs, {span.hop.owner})
            if witness is None:
                logger.info("nobody else serves blocks %d:%d in %s: hop unverified", span.hop.start, span.hop.end,
                            span.hop.dtype)  # fmt: skip
                return check
            witnesses.append(witness)
            error = relative_errors(original, witness.output, inputs.attention_mask)
            check.max_error, check.verified_by, check.checked_steps = float(error.max()), witness.node_ids, steps
            if check.max_error <= tolerance:
                return self._passes(check, span, steps)
            judge = self._rerun(session, span.hop, inputs, {span.hop.owner} | witness.owners)
            if judge is None:
                raise VerificationError(
                    f"node {span.hop.node_id} ({span.hop.address}) and {', '.join(witness.node_ids)} disagree on "
                    f"blocks {span.hop.start}:{span.hop.end} (error {check.max_error:.3g} > tolerance "
                    f"{tolerance:.3g}) and no node of other owners can break the tie; nothing was committed",
                    [span.hop.node_id, *witness.node_ids],
                )
            witnesses.append(judge)
            check.verified_by = [*witness.node_ids, *judge.node_ids]
            return self._judge(session, span, steps, check, original, witness, judge, error, report)
        finally:
            for w in witnesses:  # paid only now, and only if not convicted
                for runner in w.runners:
                    if runner.hop.node_id not in session.unpaid:
                        runner.settle()
                    runner.close()

    def _judge(
        self,
        session: InferenceSession,
        span: SpanSession,
        steps: int,
        check: HopCheck,
        original: torch.Tensor,
        witness: Witness,
        judge: Witness,
        error: torch.Tensor,
        report: VerificationReport,
    ) -> HopCheck:
        """Hop and witness disagree: side with the one the judge agrees with, by a clear margin."""
        tolerance = check.tolerance or 0.0
        mask = _concat_inputs(span, steps).attention_mask
        to_hop = float(relative_errors(judge.output, original, mask).max())
        to_witness = float(relative_errors(judge.output, witness.output, mask).max())
        hop_lied = to_witness <= tolerance < to_hop or _clearly_farther(to_hop, to_witness, tolerance)
        witness_lied = to_hop <= tolerance < to_witness or _clearly_farther(to_witness, to_hop, tolerance)
        if hop_lied:
            bad = _first_bad_step(span, error, tolerance)
            if bad is not None:
                check.result = "lied"
                report.first_bad_step = bad if report.first_bad_step is None else min(report.first_bad_step, bad)
                self._convict(session, span, witness.output, error, [*witness.node_ids, *judge.node_ids], report)
                return check
        if witness_lied:
            if len(witness.runners) == 1:  # a chain's lie cannot be pinned on one of its nodes
                werror = relative_errors(witness.output, original, mask)
                self._convict(session, witness.runners[0], original, werror, [span.hop.node_id, *judge.node_ids],
                              report)  # fmt: skip
            check.verified_by, check.max_error = judge.node_ids, to_hop
            return self._passes(check, span, steps)
        nodes = [span.hop.node_id, *witness.node_ids, *judge.node_ids]
        for node in nodes:  # nobody can be blamed; leave them all alone for a while
            session.swarm.health.failed(node, "disagreed in a verification with no majority")
        raise VerificationError(
            f"no majority on blocks {span.hop.start}:{span.hop.end} among {', '.join(nodes)}; nothing was committed",
            nodes,
        )

    def _passes(self, check: HopCheck, span: SpanSession, steps: int) -> HopCheck:
        check.result = "match" if steps == len(span.outputs) else "partial"
        self._passed[span.hop.node_id] = self._passed.get(span.hop.node_id, 0) + 1
        return check

    def _rerun(self, session: InferenceSession, hop: Hop, inputs: StepInputs, avoid_owners: set[str]) -> Witness | None:
        """Re-run `inputs` through blocks [hop.start, hop.end) on nodes of none of `avoid_owners`; None if none
        can. Nodes that fail to answer are cooled down (so the next route avoids them) and others tried."""
        trusted = {node for node, passed in self._passed.items() if passed}
        positions = int(inputs.hidden.shape[1])
        for _ in range(MAX_WITNESS_TRIES):
            route = session.swarm.witness_route(hop.start, hop.end, hop.dtype, avoid_owners, trusted, self.rng)
            if route is None:
                return None
            runners: list[SpanSession] = []
            try:
                for link in route:
                    runners.append(session.open_span(link, max_length=positions))
                session.checks.extend(runners)
                output = _run_chain(runners, inputs)
            except RemoteError as exc:
                logger.warning("re-execution on %s failed: %s", exc.address, exc)
                failed = next((link for link in route if link.address == exc.address), route[len(runners) - 1])
                session.swarm.health.failed(failed.node_id, f"{exc.code} in a re-execution: {exc.details}")
                for runner in runners:
                    runner.close()
                continue
            return Witness(runners, output)
        return None

    def _convict(
        self,
        session: InferenceSession,
        liar: SpanSession,
        expected: torch.Tensor,
        error: torch.Tensor,
        witnesses: list[str],
        report: VerificationReport,
    ) -> None:
        """Ban `liar` for answers that other nodes' re-execution contradicts (`error`: per position, over the
        steps re-executed); keep and report the evidence."""
        tolerance = self.policy.tolerance(liar.hop.dtype)
        step = _first_bad_step(liar, error, tolerance)
        if step is None:
            return
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
        """Ban the node, stop paying it, keep the evidence and report it (in the background); return its digest."""
        digest = save_evidence(evidence)
        session.unpaid.add(hop.node_id)
        session.swarm.bans.ban(hop.owner, hop.node_id, hop.address, reason, digest)
        logger.warning(
            "node %s (%s) signed a wrong answer for blocks %d:%d (%s); banned; evidence %s",
            hop.node_id, hop.address, hop.start, hop.end, reason, digest,
        )  # fmt: skip
        if self.report is not None:
            thread = threading.Thread(target=self._send, args=(evidence, hop.node_id), daemon=True)
            thread.start()
            self._reports.append(thread)
        return digest

    def _send(self, evidence: reports_pb2.Evidence, node_id: str) -> None:
        assert self.report is not None
        try:
            self.report(evidence)
        except Exception as exc:  # reporting is best effort: the ban and the local evidence stand
            logger.warning("could not report node %s to the coordinator: %s", node_id, exc)


def _clearly_farther(far: float, near: float, tolerance: float) -> bool:
    """With a judge between two answers that disagree, the one at least twice as far from it (and more than half
    the tolerance away) is the outlier; closer calls are left undecided."""
    return far > tolerance / 2 and far >= 2 * near


def _run_chain(runners: list[SpanSession], inputs: StepInputs) -> torch.Tensor:
    """Feed `inputs` through the chain of sessions, in messages of at most CHUNK_BYTES; the last one's output."""
    outputs = []
    for chunk in _chunks(inputs, runners[0]):
        hidden = chunk.hidden
        for runner in runners:
            hidden, _ = runner.step(StepInputs(hidden, chunk.position_ids, chunk.attention_mask))
        outputs.append(hidden)
    return torch.cat(outputs, dim=1)


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


def _first_bad_step(span: SpanSession, error: torch.Tensor, tolerance: float) -> int | None:
    """The first step of `span` with a position whose error (over the steps re-executed) exceeds `tolerance`."""
    offset = 0
    for index, inputs in enumerate(span.history[: len(span.outputs)]):
        width = int(inputs.hidden.shape[1])
        if offset >= error.shape[1]:
            break
        if bool((error[:, offset : offset + width] > tolerance).any()):
            return index
        offset += width
    return None
