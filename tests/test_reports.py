"""Reports of lying nodes: the coordinator checks the evidence, keeps it within bounds, lists and serves it."""

from __future__ import annotations

import hashlib
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from hivegen.coordinator.client import CoordinatorUnreachable, report_node
from hivegen.coordinator.report_store import REPORTS_PER_REPORTER_AND_NODE, ReportStore
from hivegen.coordinator.reports import MAX_EVIDENCE_BYTES, CheckedReport, ReportRejected, check_report, sign_report
from hivegen.coordinator.server import Coordinator, CoordinatorConfig
from hivegen.credits.attestation import StepClaim, chain_digest, sign_claim, step_input_digest, tensor_digest
from hivegen.credits.identity import Identity
from hivegen.proto import node_pb2, reports_pb2, reports_pb2_grpc
from hivegen.proto.options import grpc_options
from hivegen.proto.tensors import deserialize, serialize

MODEL, HIDDEN, TOLERANCE = "tiny-llama-0", 8, 0.05


def make_evidence(
    node: Identity,
    *,
    lie: float = 1.0,
    seed: int = 0,
    signer: Identity | None = None,
    node_id: str | None = None,
    last_mask: tuple[int, ...] = (1,),
    answer: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> reports_pb2.Evidence:
    """Steps 0 (a 3-token prefill) and 1 of a session, each signed by `signer` (default: the node). The node's answer
    to step 1 is `answer(expected)`, by default `lie` x noise away from what the witnesses computed."""
    g = torch.Generator().manual_seed(seed)
    steps, position, history = [], 0, ""
    for step, mask in enumerate([(1, 1, 1), last_mask]):
        new = len(mask)
        inputs = node_pb2.Step(
            hidden_states=serialize(torch.randn(1, new, HIDDEN, generator=g)),
            position_ids=serialize(torch.arange(position, position + new)[None]),
            attention_mask=serialize(torch.tensor([mask])),
        )
        expected = torch.randn(1, new, HIDDEN, generator=g)
        noise = torch.randn(1, new, HIDDEN, generator=g)
        answered = expected  # the node answered the prefill right
        if step == 1:
            answered = answer(expected) if answer else expected + lie * noise
        output = serialize(answered)
        history = chain_digest(history, step_input_digest(inputs))
        claim = StepClaim(MODEL, "session-1", step, 0, 4, step_input_digest(inputs), tensor_digest(output), history)
        steps.append(
            reports_pb2.SignedStep(
                step=step,
                hidden_states=inputs.hidden_states,
                position_ids=inputs.position_ids,
                attention_mask=inputs.attention_mask,
                output_digest=claim.output_digest,
                signature=sign_claim(signer or node, claim),
            )
        )
        position += new
    return reports_pb2.Evidence(
        model_key=MODEL,
        node_id=node_id or f"12D3KooWPeer@{node.public_key_hex}",
        node_key=node.public_key_hex,
        node_address="127.0.0.1:31337",
        session_id="session-1",
        start_block=0,
        end_block=4,
        steps=steps,
        output=output,
        expected=serialize(expected),
        witnesses=["12D3KooWWitnessA@" + "a" * 64, "12D3KooWWitnessB@" + "b" * 64],
        error=lie,
        tolerance=TOLERANCE,
    )


def send(coordinator: Coordinator, report: reports_pb2.Report) -> reports_pb2.ReportAck:
    """Send an already signed report as a stranger would, without the client helper."""
    with grpc.insecure_channel(coordinator.address, options=grpc_options()) as channel:
        return reports_pb2_grpc.ReportsStub(channel).ReportNode(report, timeout=30)


def listed(coordinator: Coordinator) -> list[reports_pb2.ReportedNode]:
    with grpc.insecure_channel(coordinator.address, options=grpc_options()) as channel:
        return list(reports_pb2_grpc.ReportsStub(channel).ListReports(reports_pb2.ReportsRequest(), timeout=30).nodes)


def http_get(coordinator: Coordinator, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(f"{coordinator.status_url}{path}", timeout=30) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    started = Coordinator(CoordinatorConfig(data=tmp_path_factory.mktemp("coordinator")))
    started.start()
    try:
        yield started
    finally:
        started.stop()


def test_check_report_accepts_signed_evidence_and_recomputes_the_error() -> None:
    reporter, node = Identity.generate(), Identity.generate()
    evidence = make_evidence(node).SerializeToString()
    checked = check_report(sign_report(reporter, evidence), now=time.time())
    assert isinstance(checked, CheckedReport)
    assert checked.digest == hashlib.sha256(evidence).hexdigest()
    assert (checked.reporter, checked.node_key, checked.model_key) == (reporter.account, node.public_key_hex, MODEL)
    e = reports_pb2.Evidence.FromString(evidence)
    output, expected = deserialize(e.output), deserialize(e.expected)
    scale = torch.maximum(output.norm(dim=-1), expected.norm(dim=-1))  # symmetric: no side is taken as the truth
    assert checked.error == pytest.approx(float(((output - expected).norm(dim=-1) / scale).max()))


def test_check_report_ignores_padded_positions() -> None:
    def wrong_only_in_padding(expected: torch.Tensor) -> torch.Tensor:
        return expected + torch.tensor([0.0, 100.0])[None, :, None]

    evidence = make_evidence(Identity.generate(), last_mask=(1, 0), answer=wrong_only_in_padding)
    with pytest.raises(ReportRejected) as refused:
        check_report(sign_report(Identity.generate(), evidence.SerializeToString()))
    assert refused.value.reason == "no-error"


def test_check_report_counts_a_non_finite_output_as_infinitely_wrong() -> None:
    evidence = make_evidence(Identity.generate(), answer=lambda expected: torch.full_like(expected, float("nan")))
    checked = check_report(sign_report(Identity.generate(), evidence.SerializeToString()))
    assert checked.error == float("inf")


def test_check_report_compares_half_precision_answers_in_float32() -> None:
    evidence = make_evidence(Identity.generate(), answer=lambda expected: (expected * 1.5).half())
    checked = check_report(sign_report(Identity.generate(), evidence.SerializeToString()))
    assert checked.error == pytest.approx(0.5 / 1.5, rel=1e-3)  # |1.5e - e| / max(|1.5e|, |e|)


def test_honest_report_is_accepted_and_listed(coordinator: Coordinator) -> None:
    reporter, node = Identity.generate(), Identity.generate()
    ack = report_node(coordinator.address, reporter, make_evidence(node))
    assert ack.reporters == 1 and len(ack.evidence_digest) == 64
    [entry] = [n for n in listed(coordinator) if n.node_key == node.public_key_hex]
    assert (entry.account, entry.reporters, entry.reports) == (node.account, 1, 1)
    assert list(entry.evidence) == [ack.evidence_digest]
    assert list(entry.node_ids) == [f"12D3KooWPeer@{node.public_key_hex}"] and list(entry.models) == [MODEL]
    assert list(entry.addresses) == ["127.0.0.1:31337"] and entry.last_report_at > 0


def test_status_page_lists_reported_nodes(coordinator: Coordinator) -> None:
    node = Identity.generate()
    ack = report_node(coordinator.address, Identity.generate(), make_evidence(node))
    code, _, body = http_get(coordinator, "/status")
    assert code == 200
    status = json.loads(body)
    assert "models" in status
    [entry] = [n for n in status["reported_nodes"] if n["node_key"] == node.public_key_hex]
    assert entry["account"] == node.account and entry["evidence"] == [ack.evidence_digest]
    assert (entry["reporters"], entry["reports"], entry["models"]) == (1, 1, [MODEL])


def test_evidence_is_downloadable_by_its_digest(coordinator: Coordinator) -> None:
    evidence = make_evidence(Identity.generate())
    ack = report_node(coordinator.address, Identity.generate(), evidence)
    code, content_type, body = http_get(coordinator, f"/evidence/{ack.evidence_digest}")
    assert (code, content_type) == (200, "application/octet-stream")
    assert hashlib.sha256(body).hexdigest() == ack.evidence_digest
    assert reports_pb2.Evidence.FromString(body) == evidence


def test_unknown_evidence_is_404_and_a_malformed_digest_400(coordinator: Coordinator) -> None:
    assert http_get(coordinator, "/evidence/" + "0" * 64)[0] == 404
    assert http_get(coordinator, "/evidence/not-a-digest")[0] == 400
    assert http_get(coordinator, "/evidence/" + "A" * 64)[0] == 400


def test_two_reporters_count_as_two_and_one_reporter_twice_as_one(coordinator: Coordinator) -> None:
    first, second, node = Identity.generate(), Identity.generate(), Identity.generate()
    evidence = make_evidence(node)
    assert report_node(coordinator.address, first, evidence).reporters == 1
    assert report_node(coordinator.address, first, evidence).reporters == 1  # a duplicate: nothing new stored
    assert report_node(coordinator.address, first, make_evidence(node, seed=1)).reporters == 1
    assert report_node(coordinator.address, second, evidence).reporters == 2
    [entry] = [n for n in listed(coordinator) if n.node_key == node.public_key_hex]
    assert (entry.reporters, entry.reports, len(entry.evidence)) == (2, 3, 2)


def forged_reporter(reporter: Identity, node: Identity) -> reports_pb2.Report:
    """Signed by a thief in the name of `reporter`."""
    report = sign_report(Identity.generate(), make_evidence(node).SerializeToString())
    report.reporter, report.reporter_key = reporter.account, reporter.public_key_hex
    return report


def altered_input(reporter: Identity, node: Identity) -> reports_pb2.Report:
    evidence = make_evidence(node)
    data = bytearray(evidence.steps[0].hidden_states.data)
    data[0] ^= 0x01
    evidence.steps[0].hidden_states.data = bytes(data)
    return sign_report(reporter, evidence.SerializeToString())


def other_output(reporter: Identity, node: Identity) -> reports_pb2.Report:
    evidence = make_evidence(node)
    evidence.output.CopyFrom(serialize(torch.ones(1, 1, HIDDEN)))
    return sign_report(reporter, evidence.SerializeToString())


def oversized(reporter: Identity, node: Identity) -> reports_pb2.Report:
    evidence = make_evidence(node)
    evidence.witnesses.append("w" * MAX_EVIDENCE_BYTES)
    return sign_report(reporter, evidence.SerializeToString())


def out_of_order(reporter: Identity, node: Identity) -> reports_pb2.Report:
    evidence = make_evidence(node)
    evidence.steps.reverse()
    return sign_report(reporter, evidence.SerializeToString())


def spliced(reporter: Identity, node: Identity) -> reports_pb2.Report:
    """Step 0 of one run of the session and step 1 of another: each signed, but never one history."""
    first, second = make_evidence(node, seed=0), make_evidence(node, seed=1)
    del second.steps[0]
    second.steps.insert(0, first.steps[0])
    return sign_report(reporter, second.SerializeToString())


def too_tight(reporter: Identity, node: Identity) -> reports_pb2.Report:
    evidence = make_evidence(node, lie=1e-4)
    evidence.tolerance = 1e-6  # float32 runs differ by up to ~3e-6: such an accusation convicts honest nodes
    return sign_report(reporter, evidence.SerializeToString())


def nan_in_nan_out(reporter: Identity, node: Identity) -> reports_pb2.Report:
    """A node "caught" answering NaN to inputs that were NaN already: nothing to blame it for."""
    inputs = node_pb2.Step(
        hidden_states=serialize(torch.full((1, 2, HIDDEN), float("nan"))),
        position_ids=serialize(torch.arange(2)[None]),
        attention_mask=serialize(torch.ones(1, 2, dtype=torch.int64)),
    )
    output = serialize(torch.full((1, 2, HIDDEN), float("nan")))
    digest = step_input_digest(inputs)
    claim = StepClaim(MODEL, "s", 0, 0, 4, digest, tensor_digest(output), chain_digest("", digest))
    evidence = reports_pb2.Evidence(
        model_key=MODEL, node_id=f"12D3KooWPeer@{node.public_key_hex}", node_key=node.public_key_hex,
        node_address="127.0.0.1:1", session_id="s", start_block=0, end_block=4, output=output, tolerance=TOLERANCE,
        steps=[reports_pb2.SignedStep(step=0, hidden_states=inputs.hidden_states, position_ids=inputs.position_ids,
                                      attention_mask=inputs.attention_mask, output_digest=claim.output_digest,
                                      signature=sign_claim(node, claim))],
    )  # fmt: skip
    return sign_report(reporter, evidence.SerializeToString())


def signed(evidence: Callable[[Identity], reports_pb2.Evidence]) -> Callable[[Identity, Identity], reports_pb2.Report]:
    return lambda reporter, node: sign_report(reporter, evidence(node).SerializeToString())


INVALID, DENIED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED
REFUSALS: dict[str, tuple[Callable[[Identity, Identity], reports_pb2.Report], grpc.StatusCode, str]] = {
    "forged reporter signature": (forged_reporter, DENIED, "bad-signature"),
    "step signed by another key": (
        signed(lambda n: make_evidence(n, signer=Identity.generate())),
        INVALID,
        "unsigned-step",
    ),
    "input altered after signing": (altered_input, INVALID, "unsigned-step"),
    "output whose digest differs": (other_output, INVALID, "digest-mismatch"),
    "error below tolerance": (signed(lambda n: make_evidence(n, lie=1e-4)), INVALID, "no-error"),
    "stale time": (
        lambda r, n: sign_report(r, make_evidence(n).SerializeToString(), time.time() - 3600),
        INVALID,
        "stale",
    ),
    "oversized evidence": (oversized, INVALID, "too-large"),
    "node id of another key": (
        signed(lambda n: make_evidence(n, node_id=f"12D3KooWPeer@{Identity.generate().public_key_hex}")),
        INVALID,
        "node-mismatch",
    ),
    "bytes that are not evidence": (lambda r, n: sign_report(r, b"\xff\xff\xff"), INVALID, "malformed"),
    "steps out of order": (out_of_order, INVALID, "malformed"),
    "steps spliced from two runs of a session": (spliced, INVALID, "unsigned-step"),
    "a tolerance tighter than honest runs get": (too_tight, INVALID, "malformed"),
    "NaN out of NaN in": (nan_in_nan_out, INVALID, "malformed"),
}


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
def test_bad_report_is_refused_with_its_status_and_reason(coordinator: Coordinator, case: str) -> None:
    build, code, reason = REFUSALS[case]
    reporter, node = Identity.generate(), Identity.generate()
    report = build(reporter, node)
    with pytest.raises(grpc.RpcError) as refused:
        send(coordinator, report)
    assert refused.value.code() == code
    assert f"({reason})" in refused.value.details()
    assert ("hivegen-reason", reason) in tuple(refused.value.trailing_metadata() or ())
    assert not [n for n in listed(coordinator) if n.node_key == node.public_key_hex]


def test_client_helper_raises_the_coordinators_reason(coordinator: Coordinator) -> None:
    with pytest.raises(ReportRejected) as refused:
        report_node(coordinator.address, Identity.generate(), make_evidence(Identity.generate(), lie=1e-4))
    assert refused.value.reason == "no-error" and "tolerance" in str(refused.value)


def test_coordinator_keeps_serving_after_refusals(coordinator: Coordinator) -> None:
    for build, _, _ in REFUSALS.values():
        with pytest.raises(grpc.RpcError):
            send(coordinator, build(Identity.generate(), Identity.generate()))
    assert report_node(coordinator.address, Identity.generate(), make_evidence(Identity.generate())).reporters == 1


def test_client_helper_says_when_no_coordinator_answers() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(CoordinatorUnreachable, match="unreachable"):
        report_node(address, Identity.generate(), make_evidence(Identity.generate()), timeout=2.0)


def test_one_reporter_keeps_at_most_a_bounded_number_of_reports_per_node(coordinator: Coordinator) -> None:
    reporter, node = Identity.generate(), Identity.generate()
    for seed in range(REPORTS_PER_REPORTER_AND_NODE):
        report_node(coordinator.address, reporter, make_evidence(node, seed=seed))
    with pytest.raises(grpc.RpcError) as refused:
        send(coordinator, sign_report(reporter, make_evidence(node, seed=999).SerializeToString()))
    assert (
        refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "(too-many-reports)" in refused.value.details()
    )
    assert report_node(coordinator.address, reporter, make_evidence(node, seed=0)).reporters == 1  # still a duplicate
    assert report_node(coordinator.address, Identity.generate(), make_evidence(node, seed=999)).reporters == 2


def test_evidence_past_the_budget_is_refused_but_known_evidence_still_counts(tmp_path: Path) -> None:
    first = make_evidence(Identity.generate())
    small = Coordinator(CoordinatorConfig(data=tmp_path, evidence_budget=len(first.SerializeToString()) + 100))
    small.start()
    try:
        report_node(small.address, Identity.generate(), first)
        with pytest.raises(grpc.RpcError) as refused:
            send(small, sign_report(Identity.generate(), make_evidence(Identity.generate()).SerializeToString()))
        assert (
            refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "(storage-full)" in refused.value.details()
        )
        assert report_node(small.address, Identity.generate(), first).reporters == 2  # no new bytes to keep
        assert [p.name for p in (tmp_path / "evidence").iterdir()] == [
            f"{hashlib.sha256(first.SerializeToString()).hexdigest()}.pb"
        ]
    finally:
        small.stop()


def test_store_keeps_at_most_its_total_number_of_reports(tmp_path: Path) -> None:
    store = ReportStore(tmp_path, max_reports=2)
    try:
        node = Identity.generate()
        for seed in range(2):
            store.add(
                check_report(sign_report(Identity.generate(), make_evidence(node, seed=seed).SerializeToString()))
            )
        third = check_report(sign_report(Identity.generate(), make_evidence(node, seed=2).SerializeToString()))
        with pytest.raises(ReportRejected) as refused:
            store.add(third)
        assert refused.value.reason == "storage-full"
        assert store.reported_nodes()[0]["reports"] == 2
    finally:
        store.close()


def test_reports_survive_a_restart(tmp_path: Path) -> None:
    node = Identity.generate()
    checked = check_report(sign_report(Identity.generate(), make_evidence(node).SerializeToString()))
    store = ReportStore(tmp_path)
    store.add(checked)
    store.close()
    reopened = ReportStore(tmp_path)
    try:
        assert [n["node_key"] for n in reopened.reported_nodes()] == [node.public_key_hex]
        assert reopened.evidence(checked.digest) == checked.evidence
    finally:
        reopened.close()
