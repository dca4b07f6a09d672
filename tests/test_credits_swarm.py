"""Credits end to end: a coordinator process, nodes that charge, clients that sign receipts.

The model is a 4-block Llama wide enough (hidden 1024) that a short generation is worth whole credits:
each block holds ~15.7M parameters, so one token through a 2-block node is ~0.31 credits. The coordinator
runs as its own process, so that it can be SIGKILLed and restarted on the same data directory and port.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import hivemind
import pytest
import torch
from transformers import AutoModelForCausalLM

from hivegen.client import Client
from hivegen.client.model import RemoteModelForCausalLM
from hivegen.cluster import PARENT_PID_ENV, LocalCluster
from hivegen.coordinator.client import LedgerClient, open_account
from hivegen.coordinator.ledger_service import receipt_to_proto
from hivegen.credits.identity import Identity
from hivegen.credits.receipts import WORK_UNITS_PER_CREDIT, Receipt, SignedReceipt
from hivegen.credits.units import format_credits
from hivegen.dht import start_dht, visible_maddrs
from hivegen.errors import InsufficientCredits, NoRouteError
from hivegen.model.tiny import make_tiny_checkpoint
from hivegen.proto import ledger_pb2, node_pb2_grpc
from hivegen.proto.options import grpc_options
from hivegen.store.backend import MemoryStore
from tests.conftest import wait_for
from tests.wire import Stream, info, new_id, open_request, refusal, step_request

WIDE = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 8, "num_key_value_heads": 4,
        "max_position_embeddings": 1024}  # fmt: skip
SPANS = [(0, 2), (2, 4)]
UNIT = WORK_UNITS_PER_CREDIT
GRANT = 100  # small, so that a long session is unaffordable
PROMPT = list(range(3, 19))  # 16 tokens
NEW = 24
POSITIONS = len(PROMPT) + NEW - 1  # the last token chosen is never fed back
UNPAID_LIMIT = 30  # credits a known client may owe a node while the ledger is away: two generations' worth

ClusterFactory = Callable[..., LocalCluster]
MakeReceipt = Callable[[str], ledger_pb2.Receipt | None]  # a session id -> the receipt to send


class CoordinatorProcess:
    """`hivegen coordinator serve` on a fixed port and data directory, so it can be killed and restarted."""

    def __init__(self, data: Path, port: int, initial_peers: list[str]) -> None:
        self.data = data
        self.port = port
        self.initial_peers = initial_peers  # the swarm it joins (and rejoins after a restart) to see the nodes
        self.address = f"127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        ready = self.data / "ready.json"
        ready.unlink(missing_ok=True)
        cmd = [
            sys.executable, "-m", "hivegen", "coordinator", "serve", "--port", str(self.port),
            "--data", str(self.data), "--starter-grant", str(GRANT), "--grant-proof-of-work", "8",
            "--ready-file", str(ready), "--initial-peers", *self.initial_peers,
        ]  # fmt: skip
        env = {**os.environ, PARENT_PID_ENV: str(os.getpid())}
        with open(self.data / "coordinator.log", "ab") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        process = self.process
        wait_for(lambda: ready.exists() or process.poll() is not None, 120, "the coordinator to start")
        assert process.poll() is None, (self.data / "coordinator.log").read_text()[-3000:]
        assert json.loads(ready.read_text())["coordinator"] == self.address

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("wide-llama"), num_layers=4, **WIDE)


@pytest.fixture(scope="module")
def block_params(wide_model: Path) -> list[int]:
    """Parameters of each block, counted by transformers itself."""
    hf = AutoModelForCausalLM.from_pretrained(wide_model)
    return [sum(p.numel() for p in layer.parameters()) for layer in hf.model.layers]


@pytest.fixture(scope="module")
def reference(wide_model: Path) -> list[int]:
    """transformers' greedy continuation of PROMPT, eos disabled."""
    hf = AutoModelForCausalLM.from_pretrained(wide_model)
    out = hf.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, do_sample=False, eos_token_id=None)
    return [int(t) for t in out[0, len(PROMPT) :]]


@pytest.fixture(scope="module")
def bootstrap() -> Iterator[hivemind.DHT]:
    """The swarm's bootstrap peer, so the coordinator can be killed and rejoin the nodes' swarm."""
    dht = start_dht()
    try:
        yield dht
    finally:
        dht.shutdown()


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory, bootstrap: hivemind.DHT) -> Iterator[CoordinatorProcess]:
    process = CoordinatorProcess(tmp_path_factory.mktemp("coordinator"), free_port(), visible_maddrs(bootstrap))
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def cluster(wide_model: Path, coordinator: CoordinatorProcess, start_cluster: ClusterFactory) -> LocalCluster:
    node_args = ["--unpaid-credits", str(UNPAID_LIMIT)]
    return start_cluster(wide_model, spans=SPANS, coordinator_address=coordinator.address, node_args=node_args,
                         initial_peers=coordinator.initial_peers)  # fmt: skip


@pytest.fixture(scope="module")
def ledger(coordinator: CoordinatorProcess) -> Iterator[LedgerClient]:
    with LedgerClient(coordinator.address) as client:
        yield client


# --- helpers -------------------------------------------------------------------------------------------------------


def expected_charges(cluster: LocalCluster, block_params: list[int], positions: int = POSITIONS) -> dict[str, int]:
    """What each node earns for one generation: positions x parameters of its blocks, in work units."""
    return {n.account: positions * sum(block_params[n.blocks[0] : n.blocks[1]])
            for n in cluster.nodes}  # fmt: skip


def generate(
    model: Path, cluster: LocalCluster, payer: Identity, max_new_tokens: int = NEW, route_wait: float = 10.0
) -> tuple[list[int], dict[str, int]]:
    """One greedy generation of PROMPT paid by `payer`: (new tokens, credits signed for per node)."""
    peers = cluster.initial_peers
    with RemoteModelForCausalLM.from_pretrained(model, peers, identity=payer, route_wait=route_wait) as remote:
        out = remote.generate(torch.tensor([PROMPT]), max_new_tokens=max_new_tokens, eos_token_id=[])
        return out[0, len(PROMPT) :].tolist(), remote.last_charges


def pending(cluster: LocalCluster) -> list[int]:
    """Receipts each node holds that the ledger has not applied."""
    counts = []
    for node in cluster.nodes:
        with grpc.insecure_channel(node.address, options=grpc_options()) as channel:
            counts.append(info(node_pb2_grpc.NodeStub(channel)).receipts_pending)
    return counts


def settled(cluster: LocalCluster) -> None:
    wait_for(lambda: not any(pending(cluster)), 60, "the nodes' receipts to reach the ledger")


def paid(ledger: LedgerClient, client: Identity) -> dict[str, int]:
    """Work units the ledger moved from `client` to each account (read with the client's key)."""
    moved: dict[str, int] = {}
    for entry in ledger.history(client, limit=1000):
        if entry.kind == "transfer" and entry.src == client.account:
            moved[entry.dst] = moved.get(entry.dst, 0) + entry.units
    return moved


def node_steps(cluster: LocalCluster) -> list[int]:
    steps = []
    for node in cluster.nodes:
        with grpc.insecure_channel(node.address, options=grpc_options()) as channel:
            steps.append(info(node_pb2_grpc.NodeStub(channel)).counters.steps)
    return steps


# --- paying for work -----------------------------------------------------------------------------------------------


def test_a_paid_generation_is_exact_and_moves_exactly_the_work_served(
    wide_model: Path,
    cluster: LocalCluster,
    ledger: LedgerClient,
    block_params: list[int],
    reference: list[int],
) -> None:
    client = Identity.generate()
    tokens, charges = generate(wide_model, cluster, client)
    assert tokens == reference
    expected = expected_charges(cluster, block_params)
    assert all(units > 5 * UNIT for units in expected.values()), expected
    assert charges == expected
    settled(cluster)
    assert paid(ledger, client) == expected
    assert ledger.balance(client).units == GRANT * UNIT - sum(expected.values())
    assert ledger.verify_journal().ok


def test_insufficient_credits_are_refused_at_open_before_any_work(
    wide_model: Path, cluster: LocalCluster, ledger: LedgerClient, block_params: list[int]
) -> None:
    client = Identity.generate()
    steps_before = node_steps(cluster)
    new_tokens = 400  # 416 positions x ~31.5M parameters per node is over the 100-credit grant
    with pytest.raises(InsufficientCredits) as refused:
        generate(wide_model, cluster, client, max_new_tokens=new_tokens)
    needed = (len(PROMPT) + new_tokens) * sum(block_params[0:2])  # exact work units, nothing rounded
    assert (refused.value.account, refused.value.balance, refused.value.needed) == (
        client.account,
        GRANT * UNIT,
        needed,
    )
    assert f"has {GRANT} credits" in str(refused.value)
    assert f"may cost up to {format_credits(needed)}" in str(refused.value)
    assert node_steps(cluster) == steps_before  # no node did any work
    assert ledger.balance(client).units == GRANT * UNIT and paid(ledger, client) == {}
    assert generate(wide_model, cluster, client)[1]  # an affordable session still runs, and is paid


def test_a_replay_from_the_store_reaches_no_node_and_costs_nothing(
    wide_model: Path, cluster: LocalCluster, coordinator: CoordinatorProcess, ledger: LedgerClient,
    block_params: list[int], reference: list[int],
) -> None:  # fmt: skip
    me = Identity.generate()
    expected = expected_charges(cluster, block_params)
    with Client(wide_model, cluster.initial_peers, store=MemoryStore(), identity=me, eos_token_ids=(),
                coordinator=coordinator.address) as client:  # fmt: skip
        first = client.generate(PROMPT, max_new_tokens=NEW)
        assert list(first.tokens) == reference and not first.replayed
        assert client.last_cost == sum(expected.values()) and client.remote.last_charges == expected
        settled(cluster)
        steps = node_steps(cluster)
        again = client.generate(PROMPT, max_new_tokens=NEW)
        assert again.replayed and again.tokens == first.tokens and client.last_cost == 0
        settled(cluster)
        assert node_steps(cluster) == steps  # no node worked
        assert client.balance() == GRANT * UNIT - sum(expected.values())
    assert paid(ledger, me) == expected


# --- receipts on the wire ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node0(cluster: LocalCluster) -> Iterator[node_pb2_grpc.NodeStub]:
    with grpc.insecure_channel(cluster.nodes[0].address, options=grpc_options()) as channel:
        yield node_pb2_grpc.NodeStub(channel)


def signed(
    signer: Identity, session_id: str, node: str, model_key: str, seq: int, work: int, client: Identity | None = None
) -> ledger_pb2.Receipt:
    """A receipt signed by `signer`, in the name (account and key) of `client` (default: the signer)."""
    named = client or signer
    receipt = Receipt(session_id, named.account, named.public_key_hex, node, model_key, seq, work)
    return receipt_to_proto(SignedReceipt(receipt, signer.sign(receipt.payload()).hex()))  # fmt: skip


def test_forged_stale_and_missing_receipts_are_refused_over_the_wire(
    cluster: LocalCluster, node0: node_pb2_grpc.NodeStub, ledger: LedgerClient, block_params: list[int]
) -> None:
    key, node = cluster.model_key, cluster.nodes[0].account
    hidden = info(node0).hidden_size
    work = sum(block_params[0:2])  # one token through node 0's blocks
    alice, mallory = Identity.generate(), Identity.generate()
    open_account(ledger, alice)  # alice claims her grant; mallory never does

    def refused_step(
        make_receipt: Callable[[str], ledger_pb2.Receipt | None], pay_step_0: bool = True
    ) -> grpc.RpcError:
        """Open a paid session of alice's, serve two steps (the second paying for the first unless told not
        to), then send step 2 with a bad receipt."""
        sid = new_id()
        with Stream(node0) as stream:
            stream.send(open_request(key, sid, max_length=16, start=0, end=2, client=alice))
            stream.send(step_request(sid, 0, hidden))
            first = signed(alice, sid, node, key, 1, work) if pay_step_0 else None
            stream.send(step_request(sid, 1, hidden, past=1, receipt=first))
            with pytest.raises(grpc.RpcError) as error:
                stream.send(step_request(sid, 2, hidden, past=2, receipt=make_receipt(sid)))
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED, error.value.details()
        return error.value

    # Who pays must be named, and the key must own the account.
    unnamed = refusal(node0, [open_request(key, new_id(), start=0, end=2)])
    assert unnamed.code() == grpc.StatusCode.UNAUTHENTICATED and "charges credits" in unnamed.details()
    request = open_request(key, new_id(), start=0, end=2, client=alice)
    request.open.client_key = mallory.public_key_hex
    wrong_key = refusal(node0, [request])
    assert wrong_key.code() == grpc.StatusCode.UNAUTHENTICATED and "does not own" in wrong_key.details()

    def altered(sid: str) -> ledger_pb2.Receipt:
        receipt = signed(alice, sid, node, key, 2, 2 * work)
        receipt.work = 2 * work + 1  # a larger amount than alice signed
        return receipt

    def wrong_signer(sid: str) -> ledger_pb2.Receipt:
        receipt = signed(mallory, sid, node, key, 2, 2 * work)
        receipt.client = alice.account  # alice's account with mallory's key
        return receipt

    # One unpaid step is allowed, so step 1 may come without a receipt but step 2 must pay for step 0.
    assert "needs a receipt" in refused_step(lambda sid: None, pay_step_0=False).details()

    checks: dict[str, MakeReceipt] = {
        "(bad-signature)": altered,
        "(wrong-signer)": wrong_signer,
        "(bad-signature) ": lambda sid: signed(mallory, sid, node, key, 2, 2 * work, client=alice),
        "but session": lambda sid: signed(mallory, sid, node, key, 2, 2 * work),  # mallory pays alice's session
        "not newer": lambda sid: signed(alice, sid, node, key, 1, work),  # the old receipt again
        "not this node": lambda sid: signed(alice, sid, cluster.nodes[1].account, key, 2, 2 * work),
        "more than": lambda sid: signed(alice, sid, node, key, 2, 3 * work),
    }
    for expected, make_receipt in checks.items():
        assert expected.strip() in refused_step(make_receipt).details()

    # The node kept serving; only alice's genuine receipts reached the ledger, and mallory paid nothing.
    settled(cluster)
    assert paid(ledger, mallory) == {} and not ledger.balance(mallory).known
    # Each of alice's sessions paid exactly its first step's genuine receipt, a third of a credit: nothing rounds.
    assert paid(ledger, alice) == {node: len(checks) * work} and work < UNIT
    assert info(node0).counters.errors >= len(checks) + 3


# --- outages -------------------------------------------------------------------------------------------------------


def test_coordinator_killed_mid_generation_settles_like_an_uninterrupted_run(
    wide_model: Path,
    cluster: LocalCluster,
    coordinator: CoordinatorProcess,
    ledger: LedgerClient,
    block_params: list[int],
    reference: list[int],
) -> None:
    expected = expected_charges(cluster, block_params)
    client = Identity.generate()
    generate(wide_model, cluster, client, max_new_tokens=2)  # makes the client known to the nodes
    settled(cluster)
    before = paid(ledger, client)

    tokens: list[int] = []
    with RemoteModelForCausalLM.from_pretrained(wide_model, cluster.initial_peers, identity=client) as remote:
        for token in remote.generate_stream(torch.tensor([PROMPT]), max_new_tokens=NEW, eos_token_id=[]):
            tokens.append(int(token))
            if len(tokens) == 5:
                coordinator.kill()
    assert tokens == reference  # the generation completed through the outage
    assert all(count >= 1 for count in pending(cluster))  # the receipts queue on the nodes

    # While the ledger is away, a known client is still served on credit, up to the nodes' unpaid limit;
    # an unknown client is not served at all.
    assert generate(wide_model, cluster, client)[0] == reference
    with pytest.raises(NoRouteError, match=f"over the unpaid limit of {UNPAID_LIMIT}"):
        generate(wide_model, cluster, client, max_new_tokens=100, route_wait=1.0)  # may cost 37 more
    with pytest.raises(NoRouteError, match="unreachable and this node has not served"):
        generate(wide_model, cluster, Identity.generate(), max_new_tokens=2, route_wait=1.0)

    coordinator.start()  # same data directory, same port
    settled(cluster)
    after = paid(ledger, client)
    assert {a: after[a] - before.get(a, 0) for a in after} == {a: 2 * c for a, c in expected.items()}
    assert ledger.verify_journal().ok


def test_a_node_killed_after_serving_submits_its_receipts_when_restarted(
    wide_model: Path,
    cluster: LocalCluster,
    coordinator: CoordinatorProcess,
    ledger: LedgerClient,
    block_params: list[int],
) -> None:
    expected = expected_charges(cluster, block_params)
    client = Identity.generate()
    generate(wide_model, cluster, client)
    settled(cluster)
    assert paid(ledger, client) == expected

    coordinator.kill()  # so the next generation's receipts can only be on the nodes' disks
    generate(wide_model, cluster, client)
    wait_for(lambda: all(pending(cluster)), 30, "both nodes to hold receipts")
    cluster.stop_node(0, signal.SIGKILL)
    coordinator.start()
    first, second = cluster.nodes[0].account, cluster.nodes[1].account
    wait_for(lambda: paid(ledger, client).get(second) == 2 * expected[second], 60, "the live node's receipts")
    assert paid(ledger, client)[first] == expected[first]  # the killed node's receipts are still on its disk

    cluster.restart_node(0)
    wait_for(lambda: paid(ledger, client).get(first) == 2 * expected[first], 60, "the restarted node's receipts")
    assert paid(ledger, client) == {a: 2 * c for a, c in expected.items()}
    assert ledger.verify_journal().ok


# --- through the OpenAI-compatible API ----------------------------------------------------------------------------


def test_the_api_charges_its_identity_and_says_how_much(
    cluster: LocalCluster, ledger: LedgerClient, tmp_path: Path
) -> None:
    """The API server pays nodes with its own identity: the x-hivegen-cost header is exactly what the ledger moves,
    a replay costs 0, and an answer its balance cannot cover is 402 naming the balance and the amount needed."""
    payer = Identity.generate()
    payer.save(tmp_path / "api-identity")
    api = cluster.start_api(0, ["--identity", str(tmp_path / "api-identity"), "--store", str(tmp_path / "store")])
    try:
        ask = {"model": cluster.model.name, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        status, headers, answer = post_json(api.url + "/completions", ask)
        assert status == 200, answer
        settled(cluster)
        assert headers["x-hivegen-cost"] == format_credits(sum(paid(ledger, payer).values()))
        assert sum(paid(ledger, payer).values()) > UNIT  # whole credits: the header is not trivially "0"
        status, headers, _ = post_json(api.url + "/completions", ask)
        assert (status, headers["x-hivegen-replayed"], headers["x-hivegen-cost"]) == (200, "true", "0")
        status, _, answer = post_json(api.url + "/completions", {**ask, "max_tokens": 400})
        assert status == 402, answer
        error = answer["error"]
        assert error["code"] == "insufficient_credits" and error["account"] == payer.account
        assert float(error["needed"].replace(",", "")) > float(error["balance"].replace(",", ""))
        assert "hivegen node serve" in error["message"]
    finally:
        cluster.stop_api()


def post_json(url: str, body: object) -> tuple[int, dict[str, str], dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, json.loads(error.read())


def test_a_call_replayed_inside_a_trace_costs_nothing(wide_model: Path, cluster: LocalCluster) -> None:
    with Client(wide_model, cluster.initial_peers, store=MemoryStore(), identity=Identity.generate(),
                eos_token_ids=()) as client:  # fmt: skip
        with client.trace("flow") as recording:
            client.generate(PROMPT, max_new_tokens=4)
        assert client.last_cost > 0
        with client.trace("flow", replay=recording.ref):
            replayed = client.generate(PROMPT, max_new_tokens=4)
        assert replayed.replayed and client.last_cost == 0
