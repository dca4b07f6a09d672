"""Strangers that lie, on a real paid cluster: every honest hop has two other nodes that can re-run it.

One cheating node process (tests/adversary.py) serves blocks 0:3 next to two honest ones, claims a huge
throughput so that routes go through it, and lies as each test tells it. The user must get exactly the tokens
transformers gives, the store must never hold a wrong generation, and the cheater must be banned and reported
with evidence that re-running its signed steps confirms.
"""

from __future__ import annotations

import json
import shutil
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from hivegen.cli import main
from hivegen.client import Client, RemoteModelForCausalLM
from hivegen.client.bans import BanList
from hivegen.client.evidence import check_evidence
from hivegen.cluster import ClusterNode, LocalCluster
from hivegen.errors import VerificationError
from hivegen.model.demo import hivegen_home
from hivegen.proto import reports_pb2, reports_pb2_grpc
from hivegen.store.inspect import generations
from tests.conftest import ClusterFactory, TinyFactory, greedy_reference

HONEST = [(0, 3), (0, 3), (3, 6), (3, 6)]
PROMPT = [5, 17, 99, 3, 42, 8, 61]
NEW = 10
ADVERSARY = Path(__file__).with_name("adversary.py")


@pytest.fixture(scope="module")
def model_path(tiny_model: TinyFactory) -> Path:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def cluster(model_path: Path, start_cluster: ClusterFactory) -> LocalCluster:
    # One account (the session's identity) runs every test's generations and checks here: the per-client limits
    # are not what this module tests, so each client may use a whole node.
    spare = ["--max-sessions-per-client", "1000", "--max-cache-tokens-per-client", "65536"]
    return start_cluster(model_path, spans=HONEST, coordinator=True, node_args=spare)


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adversary") / "control.json"


@pytest.fixture(scope="module")
def cheater(cluster: LocalCluster, control: Path) -> ClusterNode:
    control.write_text(json.dumps({"mode": "honest"}))
    return cluster.add_node(0, 3, launcher=[sys.executable, str(ADVERSARY), str(control)])


@pytest.fixture(scope="module")
def expected(model_path: Path) -> list[int]:
    return greedy_reference(model_path, PROMPT, NEW)


@pytest.fixture
def lie(control: Path) -> Iterator[Any]:
    def set_mode(mode: str, **extra: Any) -> None:
        control.write_text(json.dumps({"mode": mode, **extra}))

    yield set_mode
    set_mode("honest")


def client(cluster: LocalCluster, tmp_path: Path, verify: Any = "all", **kwargs: Any) -> Client:
    return Client(
        cluster.model,
        cluster.initial_peers,
        store=tmp_path / "store",
        eos_token_ids=(),
        identity=tmp_path / "identity",
        coordinator=cluster.coordinator_address,
        verify=verify,
        bans=tmp_path / "bans.json",
        **kwargs,
    )


def reported(cluster: LocalCluster, node: ClusterNode) -> reports_pb2.ReportedNode | None:
    assert cluster.coordinator_address is not None
    with grpc.insecure_channel(cluster.coordinator_address) as channel:
        listing = reports_pb2_grpc.ReportsStub(channel).ListReports(reports_pb2.ReportsRequest(), timeout=10)
    return next((n for n in listing.nodes if node.node_id in n.node_ids), None)


def assert_banned_and_reported_with_proof(cluster: LocalCluster, node: ClusterNode, tmp_path: Path) -> None:
    owner = node.node_id.rpartition("@")[2]
    assert BanList(tmp_path / "bans.json").is_banned(owner)
    entry = reported(cluster, node)
    assert entry is not None, "the cheater was not reported to the coordinator"
    assert cluster.coordinator is not None
    url = f"{cluster.coordinator.status_url}/evidence/{entry.evidence[-1]}"
    with urllib.request.urlopen(url, timeout=10) as answer:
        evidence = reports_pb2.Evidence.FromString(answer.read())
    verdict = check_evidence(evidence, cluster.model)
    assert verdict.signed and verdict.proven, verdict


def assert_store_holds_only(client_: Client, expected: list[int]) -> None:
    stored = generations(client_.store)
    assert stored, "nothing was committed"
    assert all(list(g.tokens) == expected for g in stored), [g.tokens for g in stored]


@pytest.mark.parametrize("mode", ["noise", "weights", "identity"])
def test_a_node_whose_answers_differ_is_outvoted_banned_reported_and_its_tokens_regenerated(
    cluster: LocalCluster, cheater: ClusterNode, lie: Any, expected: list[int], tiny_model: TinyFactory,
    mode: str, tmp_path: Path,
) -> None:  # fmt: skip
    lie(mode, other_model=str(tiny_model("llama", seed=1)))
    with client(cluster, tmp_path) as c:
        generation = c.generate(PROMPT, NEW)
    assert list(generation.tokens) == expected
    assert generation.verification["liars"] == [cheater.node_id]
    assert generation.verified
    assert cheater.node_id not in {hop["node_id"] for hop in generation.route}
    assert_store_holds_only(c, expected)
    assert_banned_and_reported_with_proof(cluster, cheater, tmp_path)


@pytest.mark.parametrize("mode", ["nan", "last", "wide"])
def test_a_signed_malformed_answer_is_the_answering_nodes_fault_and_proof_enough(
    cluster: LocalCluster, cheater: ClusterNode, lie: Any, expected: list[int], mode: str, tmp_path: Path
) -> None:
    lie(mode)
    with client(cluster, tmp_path) as c:
        generation = c.generate(PROMPT, NEW)
        health = c.remote.swarm.health.get(cheater.node_id)
    assert list(generation.tokens) == expected
    assert generation.verified and cheater.node_id not in {hop["node_id"] for hop in generation.route}
    assert health is not None and "BAD_OUTPUT" in health.last_error
    assert_store_holds_only(c, expected)
    assert_banned_and_reported_with_proof(cluster, cheater, tmp_path)


def test_an_oversized_answer_is_refused_unread_and_routed_around(
    cluster: LocalCluster, cheater: ClusterNode, lie: Any, expected: list[int], model_path: Path, tmp_path: Path
) -> None:
    lie("huge")
    with RemoteModelForCausalLM.from_pretrained(model_path, cluster.initial_peers, bans=tmp_path / "b.json") as model:
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, do_sample=False, eos_token_id=[])
        health = model.swarm.health.get(cheater.node_id)
    assert out[0, len(PROMPT) :].tolist() == expected
    assert health is not None and health.failures == 1 and "BAD_OUTPUT" in health.last_error
    assert "larger than max" in health.last_error


def test_an_unsigned_answer_is_routed_around_without_a_ban(
    cluster: LocalCluster, cheater: ClusterNode, lie: Any, expected: list[int], tmp_path: Path
) -> None:
    lie("unsigned")
    with client(cluster, tmp_path) as c:
        generation = c.generate(PROMPT, NEW)
        health = c.remote.swarm.health.get(cheater.node_id)
    assert list(generation.tokens) == expected
    assert health is not None and "BAD_SIGNATURE" in health.last_error
    assert not BanList(tmp_path / "bans.json").owners()  # a bad signature proves nothing against the key's owner


def test_a_node_that_cheats_only_after_its_first_steps_is_caught_and_the_tokens_after_are_regenerated(
    cluster: LocalCluster, cheater: ClusterNode, lie: Any, expected: list[int], tmp_path: Path
) -> None:
    lie("noise", after=4)
    with client(cluster, tmp_path) as c:
        generation = c.generate(PROMPT, NEW)
        report = c.remote.last_verification
    assert list(generation.tokens) == expected
    assert report.liars == [cheater.node_id]
    assert_store_holds_only(c, expected)
    assert_banned_and_reported_with_proof(cluster, cheater, tmp_path)


def test_the_default_policy_catches_a_new_cheater_in_its_first_generation(
    cluster: LocalCluster, cheater: ClusterNode, lie: Any, expected: list[int], tmp_path: Path
) -> None:
    lie("noise")
    with client(cluster, tmp_path, verify=None) as c:
        generation = c.generate(PROMPT, NEW)
    assert list(generation.tokens) == expected
    assert generation.verification["mode"] == "sample"
    assert cheater.node_id in generation.verification["liars"]


def test_a_verifier_that_lies_is_outvoted_and_the_generation_stands(
    cluster: LocalCluster, cheater: ClusterNode, lie: Any, expected: list[int], model_path: Path, tmp_path: Path
) -> None:
    lie("noise", only_checks=True)  # honest in generations, lies when re-running someone else's work
    bans = BanList(tmp_path / "bans.json")
    owner = cheater.node_id.rpartition("@")[2]
    # Each check picks its witness at random among two nodes, the cheater one of them; a client prefers witnesses
    # it already found honest, so each try is a fresh client (a fresh draw).
    peers = cluster.initial_peers
    for _ in range(12):
        with RemoteModelForCausalLM.from_pretrained(model_path, peers, bans=bans, verify="all") as model:
            model.swarm.health.observe(cheater.node_id, 10.0, 3, 1)  # measured slow: routes avoid it, checks may not
            out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, do_sample=False, eos_token_id=[])
            assert out[0, len(PROMPT) :].tolist() == expected
            assert model.last_verification.first_bad_step is None
        if bans.is_banned(owner):
            break
    assert bans.is_banned(owner)


def test_with_no_third_node_a_disagreement_is_an_error_and_nothing_is_committed(
    cluster: LocalCluster, cheater: ClusterNode, lie: Any, tmp_path: Path
) -> None:
    lie("noise")
    lone_honest = [n.node_id for n in cluster.nodes if n.blocks != (0, 3)] + [cluster.nodes[0].node_id]
    allowed = [*lone_honest, cheater.node_id]
    with client(cluster, tmp_path, allowed_nodes=allowed) as c:
        with pytest.raises(VerificationError) as error:
            c.generate(PROMPT, NEW)
        assert not generations(c.store)
    assert cheater.node_id in error.value.nodes and cluster.nodes[0].node_id in error.value.nodes
    assert not BanList(tmp_path / "bans.json").owners()


def test_a_hung_node_is_abandoned_within_its_step_deadline(
    cluster: LocalCluster, cheater: ClusterNode, lie: Any, expected: list[int], model_path: Path, tmp_path: Path
) -> None:
    lie("hang", after=3)
    with RemoteModelForCausalLM.from_pretrained(model_path, cluster.initial_peers, bans=tmp_path / "b.json") as model:
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, do_sample=False, eos_token_id=[])
        slowest = max(t.seconds for t in model.last_timings)
        health = model.swarm.health.get(cheater.node_id)
    assert out[0, len(PROMPT) :].tolist() == expected
    assert health is not None and "DEADLINE_EXCEEDED" in health.last_error
    assert 2.0 <= slowest < 15.0  # the deadline (at least 2 s) plus the re-route, not the old fixed 60 s


def test_replay_verified_answers_only_from_records_whose_every_hop_was_checked(
    cluster: LocalCluster, cheater: ClusterNode, expected: list[int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with client(cluster, tmp_path, verify="off") as unchecked:
        first = unchecked.generate(PROMPT, NEW)
    with client(cluster, tmp_path, replay="verified") as strict:
        second = strict.generate(PROMPT, NEW)  # the unchecked record does not count: generated and checked
        third = strict.generate(PROMPT, NEW)
    with client(cluster, tmp_path, replay="never") as fresh:
        fourth = fresh.generate(PROMPT, NEW)
    assert [g.replayed for g in (first, second, third, fourth)] == [False, False, True, False]
    assert all(list(g.tokens) == expected for g in (first, second, third, fourth))
    assert (first.verified, second.verified, third.verified) == (False, True, True)
    assert main(["store", "ls", "--store", str(tmp_path / "store")]) == 0
    listing = capsys.readouterr().out
    assert "VERIFIED" in listing and " off " in listing and " all " in listing
    assert main(["store", "show", second.ref[:12], "--store", str(tmp_path / "store")]) == 0
    shown = capsys.readouterr().out
    assert "verified:   all" in shown and "0:3 at" in shown and "3:6 at" in shown and ": match by " in shown


def test_anyone_holding_the_blocks_can_check_published_evidence(
    cluster: LocalCluster, cheater: ClusterNode, lie: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lie("noise")
    with client(cluster, tmp_path) as c:
        c.generate(PROMPT, NEW)
    entry = reported(cluster, cheater)
    assert entry is not None and cluster.coordinator is not None
    url = f"{cluster.coordinator.status_url}/evidence/{entry.evidence[-1]}"
    assert main(["evidence", "check", url, "--model", str(cluster.model)]) == 0
    out = capsys.readouterr().out
    assert "signatures: valid" in out
    assert out.rstrip().endswith("proven: the node signed an answer its blocks do not compute")
    kept = hivegen_home() / "evidence" / f"{entry.evidence[-1]}.pb"  # the client keeps its own copy
    assert main(["evidence", "check", str(kept), "--model", str(cluster.model)]) == 0


@pytest.fixture
def extra_adversary(cluster: LocalCluster, tmp_path: Path) -> Iterator[Any]:
    """Start more lying nodes for one test only (they would change every other test's routes)."""
    started: list[ClusterNode] = []

    def start(first: int, last: int, mode: str, home: Path | None = None, **extra: Any) -> ClusterNode:
        control = tmp_path / f"control-{len(started)}.json"
        control.write_text(json.dumps({"mode": mode, **extra}))
        node = cluster.add_node(first, last, launcher=[sys.executable, str(ADVERSARY), str(control)], home=home)
        started.append(node)
        return node

    yield start
    for node in started:
        cluster.stop_node(cluster.nodes.index(node))


def test_a_cheater_serving_more_blocks_than_anyone_else_is_checked_by_a_chain_of_others(
    cluster: LocalCluster, cheater: ClusterNode, extra_adversary: Any, expected: list[int], tmp_path: Path
) -> None:
    big = extra_adversary(0, 6, "noise")  # nobody else serves 0:6: it hoped to be unverifiable
    with client(cluster, tmp_path) as c:
        generation = c.generate(PROMPT, NEW)
    assert list(generation.tokens) == expected
    assert generation.verification["liars"] == [big.node_id]
    checked = next(h for h in generation.verification["hops"] if h["node"] == big.node_id)
    assert len(checked["verified_by"]) >= 3  # a chain of witnesses (0:3 then 3:6) and a judge
    assert_banned_and_reported_with_proof(cluster, big, tmp_path)


def test_a_second_node_run_with_the_cheaters_key_never_witnesses_for_it(
    cluster: LocalCluster, cheater: ClusterNode, lie: Any, extra_adversary: Any, expected: list[int], tmp_path: Path
) -> None:
    lie("noise")
    home = tmp_path / "sibling"
    home.mkdir()
    shutil.copy(cheater.home / "identity", home / "identity")  # same owner, and the very same lies
    sibling = extra_adversary(0, 3, "noise", home=home)
    for run in range(5):  # witnesses are drawn at random: were the sibling eligible, it would vouch 1 time in 3
        with client(cluster, tmp_path / str(run)) as c:
            generation = c.generate(PROMPT, NEW)
        assert list(generation.tokens) == expected
        assert generation.verification["liars"] and set(generation.verification["liars"]) <= {
            cheater.node_id,
            sibling.node_id,
        }


def test_nan_in_padding_from_one_node_gets_no_honest_node_banned(
    cluster: LocalCluster, cheater: ClusterNode, lie: Any, model_path: Path, tmp_path: Path
) -> None:
    lie("nanpad")  # right where it is never used, and where it would spread through the next hop's attention
    prompts = torch.tensor([[0, 0, 0, 7, 9, 11], [5, 17, 99, 3, 42, 8]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    local = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa", dtype=torch.float32)
    reference = local.generate(prompts, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                               eos_token_id=None, pad_token_id=0)  # fmt: skip
    bans = BanList(tmp_path / "bans.json")
    with RemoteModelForCausalLM.from_pretrained(model_path, cluster.initial_peers, bans=bans, verify="all") as model:
        out = model.generate(prompts, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=[])
        route = model.last_route
    assert torch.equal(out, reference)
    assert cheater.node_id in {h.node_id for h in route} and not bans.owners()


def test_a_node_refusing_with_a_status_no_honest_node_gives_is_routed_around(
    cluster: LocalCluster, cheater: ClusterNode, lie: Any, expected: list[int], tmp_path: Path
) -> None:
    lie("refuse")
    with client(cluster, tmp_path) as c:
        generation = c.generate(PROMPT, NEW)
        health = c.remote.swarm.health.get(cheater.node_id)
    assert list(generation.tokens) == expected
    assert health is not None and "ALREADY_EXISTS" in health.last_error
