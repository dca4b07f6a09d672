"""The coordinator as a user runs it, and as an attacker with nothing but its address tries it: DHT bootstrap,
the ledger over gRPC (signed calls, proof-of-work grants, receipts only to announced nodes), HTTP status, the
credits CLI."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import hivemind
import pytest

from hivegen import __version__
from hivegen.coordinator.client import LedgerClient, open_account
from hivegen.credits.auth import sign_call
from hivegen.credits.grants import solve_proof
from hivegen.credits.identity import Identity
from hivegen.credits.receipts import WORK_UNITS_PER_CREDIT as UNIT
from hivegen.credits.receipts import Receipt, SignedReceipt, sign_receipt
from hivegen.dht import ModelInfo, SpanRecord, announce_model, announce_span, node_id, start_dht
from hivegen.errors import GrantProofNeeded
from hivegen.proto import ledger_pb2, ledger_pb2_grpc
from tests.conftest import TinyFactory, wait_for

HIVEGEN = [sys.executable, "-m", "hivegen"]
GRANT = 500
BITS = 10  # a proof of work of 2^10 hashes: milliseconds, so tests can open many accounts
MODEL = "tiny-0"


def start_coordinator(data: Path, ready: Path) -> subprocess.Popen[str]:
    ready.unlink(missing_ok=True)
    command = [*HIVEGEN, "coordinator", "serve", "--data", str(data), "--starter-grant", str(GRANT),
               "--grant-proof-of-work", str(BITS)]  # fmt: skip
    return subprocess.Popen(
        [*command, "--ready-file", str(ready)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    data = tmp_path_factory.mktemp("coordinator")
    ready = data / "ready.json"
    proc = start_coordinator(data, ready)
    try:
        wait_for(ready.exists, what="the coordinator's ready file")
        yield {**json.loads(ready.read_text()), "data": data, "ready": ready, "proc": proc}
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def swarm(coordinator: dict[str, Any]) -> Iterator[hivemind.DHT]:
    """A DHT peer of our own in the coordinator's swarm, to announce nodes from (as anyone may)."""
    dht = start_dht(coordinator["initial_peers"])
    try:
        yield dht
    finally:
        dht.shutdown()


@pytest.fixture
def ledger(coordinator: dict[str, Any]) -> Iterator[LedgerClient]:
    with LedgerClient(coordinator["coordinator"]) as client:
        yield client


def announce_node(dht: hivemind.DHT, owner: Identity, model: str = MODEL) -> None:
    """Announce a node owned by `owner` serving block 0 of `model` (the ledger pays only such accounts)."""
    announce_model(dht, ModelInfo(model, model, 1), 300, owner)
    record = SpanRecord(node_id(dht, owner.public_key_hex), "127.0.0.1:1", 0, 1, 1.0, 1024, "float32", __version__)
    announce_span(dht, model, record, 300, owner)
    time.sleep(0.6)  # the ledger looks an account up again at most every 0.5 s (hivegen.coordinator.serving)


def opened(ledger: LedgerClient) -> Identity:
    """A fresh identity whose account has claimed its grant (solving the proof of work)."""
    identity = Identity.generate()
    assert open_account(ledger, identity) == GRANT * UNIT
    return identity


def serving_node(ledger: LedgerClient, dht: hivemind.DHT) -> Identity:
    node = Identity.generate()
    announce_node(dht, node)
    return node


def credits_cli(coordinator: dict[str, Any], *args: str, key: Path | None = None) -> subprocess.CompletedProcess[str]:
    identity = ["--identity", str(key)] if key is not None else []
    return subprocess.run(
        [*HIVEGEN, "credits", *args, *identity, "--coordinator", coordinator["coordinator"], "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def receipt(client: Identity, node: Identity, session: str, seq: int, work: int, model: str = MODEL) -> SignedReceipt:
    return sign_receipt(
        client,
        Receipt(session_id=session, client=client.account, client_key=client.public_key_hex, node=node.account,
                model_key=model, seq=seq, work=work),
    )  # fmt: skip


def refusal(call: Any, request: Any, coordinator: dict[str, Any]) -> grpc.RpcError:
    """The RpcError a raw ledger call (as a hand-written attacker sends it) ends in."""
    with grpc.insecure_channel(coordinator["coordinator"]) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            getattr(stub, call)(request, timeout=10)
    return caught.value


def test_receipts_move_exact_work_units_from_client_to_serving_node(ledger: LedgerClient, swarm: hivemind.DHT) -> None:
    client, node = opened(ledger), serving_node(ledger, swarm)
    results = ledger.submit([receipt(client, node, "s1", 1, 30 * UNIT), receipt(client, node, "s1", 2, 70 * UNIT + 3)])
    assert [r.error for r in results] == ["", ""]
    assert sum(r.transferred_units for r in results) == 70 * UNIT + 3
    again = ledger.submit([receipt(client, node, "s1", 2, 70 * UNIT + 3)])  # a duplicate changes nothing
    assert again[0].transferred_units == 0 and again[0].error == ""
    assert ledger.balance(client).units == (GRANT - 70) * UNIT - 3
    assert ledger.balance(node).units == 70 * UNIT + 3


def test_sub_credit_sessions_are_each_charged_exactly(ledger: LedgerClient, swarm: hivemind.DHT) -> None:
    client, node = opened(ledger), serving_node(ledger, swarm)
    results = ledger.submit([receipt(client, node, f"short-{i}", 1, UNIT // 3) for i in range(30)])
    assert [r.error for r in results] == [""] * 30
    assert ledger.balance(node).units == 30 * (UNIT // 3)
    assert ledger.balance(client).units == GRANT * UNIT - 30 * (UNIT // 3)


def test_forged_receipt_is_refused_with_its_reason(ledger: LedgerClient, swarm: hivemind.DHT) -> None:
    client, node, thief = opened(ledger), serving_node(ledger, swarm), opened(ledger)
    ledger.submit([receipt(client, node, "owned", 1, 5 * UNIT)])
    stolen = ledger.submit([receipt(thief, node, "owned", 2, 9 * UNIT)])  # another client's session
    assert stolen[0].error.startswith("forged: session-owner")
    assert ledger.balance(thief).units == GRANT * UNIT


def test_keyless_open_account_is_refused_and_grants_nothing(coordinator: dict[str, Any]) -> None:
    made_up = Identity.generate().account
    error = refusal("OpenAccount", ledger_pb2.AccountRequest(account=made_up), coordinator)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "must be signed by the account's key" in error.details()


def test_open_account_without_the_proof_of_work_is_refused_with_the_puzzle(ledger: LedgerClient) -> None:
    newcomer = Identity.generate()
    with pytest.raises(GrantProofNeeded) as caught:
        ledger.open_account(newcomer)
    policy = ledger.grant_policy()
    assert (caught.value.bits, caught.value.salt, caught.value.grant_units) == (BITS, policy.salt, GRANT * UNIT)
    wrong = solve_proof(policy.salt, Identity.generate().public_key_hex, BITS)  # a proof for another key
    with pytest.raises(GrantProofNeeded):
        ledger.open_account(newcomer, wrong if wrong != solve_proof(policy.salt, newcomer.public_key_hex, BITS) else 0)
    assert not ledger.balance(newcomer).known
    proof = solve_proof(policy.salt, newcomer.public_key_hex, BITS)
    assert ledger.open_account(newcomer, proof).units == GRANT * UNIT
    assert ledger.open_account(newcomer, proof).units == GRANT * UNIT  # the grant is paid once


@pytest.mark.parametrize("call", ["GetBalance", "History"])
def test_unsigned_reads_of_an_account_are_refused(coordinator: dict[str, Any], call: str) -> None:
    account = Identity.generate().account
    request = (
        ledger_pb2.AccountRequest(account=account)
        if call == "GetBalance"
        else ledger_pb2.HistoryRequest(account=account, limit=1000)
    )
    error = refusal(call, request, coordinator)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "auth missing" in error.details()


def test_reading_another_accounts_history_is_refused(ledger: LedgerClient, coordinator: dict[str, Any]) -> None:
    victim, snoop = opened(ledger), Identity.generate()
    auth = sign_call(snoop, "History", {"limit": 1000})  # the snoop signs with its own key for the victim's account
    error = refusal("History", ledger_pb2.HistoryRequest(account=victim.account, limit=1000, auth=auth), coordinator)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"signed for {snoop.account}, not for {victim.account}" in error.details()
    auth.account = victim.account  # claiming the victim's account does not help: the key does not own it
    error = refusal("History", ledger_pb2.HistoryRequest(account=victim.account, limit=1000, auth=auth), coordinator)
    assert "does not own" in error.details()


def test_a_replayed_signed_request_is_refused(ledger: LedgerClient, coordinator: dict[str, Any]) -> None:
    owner = opened(ledger)
    request = ledger_pb2.AccountRequest(account=owner.account, auth=sign_call(owner, "GetBalance"))
    with grpc.insecure_channel(coordinator["coordinator"]) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        assert stub.GetBalance(request, timeout=10).units == GRANT * UNIT  # the owner's own call
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetBalance(request, timeout=10)  # captured and sent again
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED and "replayed" in caught.value.details()


def test_a_signature_cannot_be_moved_to_another_call_or_argument(
    ledger: LedgerClient, coordinator: dict[str, Any]
) -> None:
    owner = opened(ledger)
    auth = sign_call(owner, "History", {"limit": 1})
    error = refusal("History", ledger_pb2.HistoryRequest(account=owner.account, limit=1000, auth=auth), coordinator)
    assert "bad signature" in error.details()
    error = refusal("GetBalance", ledger_pb2.AccountRequest(account=owner.account, auth=auth), coordinator)
    assert "bad signature" in error.details()


def test_a_stale_signed_request_is_refused(ledger: LedgerClient, coordinator: dict[str, Any]) -> None:
    owner = opened(ledger)
    auth = sign_call(owner, "GetBalance")
    auth.at_ms -= 3_600_000  # an hour old (re-signed, so only the time is wrong)
    from hivegen.credits.auth import call_payload

    auth.signature = owner.sign(call_payload("GetBalance", auth, {})).hex()
    error = refusal("GetBalance", ledger_pb2.AccountRequest(account=owner.account, auth=auth), coordinator)
    assert "stale call" in error.details()


def test_a_ring_of_fresh_identities_cannot_launder_grants(
    ledger: LedgerClient, swarm: hivemind.DHT, coordinator: dict[str, Any]
) -> None:
    collector = Identity.generate()
    ring = [Identity.generate() for _ in range(20)]
    # Without proofs of work, the ring has nothing to pay with: no account opens, every receipt is unaffordable.
    for member in ring:
        with pytest.raises(GrantProofNeeded):
            ledger.open_account(member)
    announce_node(swarm, collector)  # even to an account that announces a node
    results = ledger.submit([receipt(m, collector, f"ring-{i}", 1, GRANT * UNIT) for i, m in enumerate(ring)])
    assert all(r.error.startswith("insufficient") for r in results)
    # With proofs of work but no announced node, nothing moves either.
    hidden = Identity.generate()
    payers = [opened(ledger) for _ in range(5)]
    results = ledger.submit([receipt(p, hidden, f"ring2-{i}", 1, GRANT * UNIT) for i, p in enumerate(payers)])
    assert all(r.error.startswith("unannounced") for r in results)
    assert not ledger.balance(hidden).known and ledger.balance(collector).units == 0
    # Through an announced account, each grant moved is one solved proof of work: 5 proofs, 5 grants, no more.
    results = ledger.submit([receipt(p, collector, f"ring3-{i}", 1, GRANT * UNIT) for i, p in enumerate(payers)])
    assert [r.error for r in results] == [""] * 5
    assert ledger.balance(collector).units == 5 * GRANT * UNIT


def test_balance_and_history_cli_sign_for_you(coordinator: dict[str, Any], tmp_path: Path, swarm: hivemind.DHT) -> None:
    key = tmp_path / "identity"
    shown = subprocess.run([*HIVEGEN, "identity", "--path", str(key), "--json"], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    account = json.loads(shown.stdout)["account"]
    assert account == Identity.load(key).account
    result = credits_cli(coordinator, "balance", key=key)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"account": account, "credits": 0, "units": 0, "known": False}
    opened_ = credits_cli(coordinator, "open", key=key)
    assert opened_.returncode == 0, opened_.stderr
    assert json.loads(opened_.stdout)["credits"] == GRANT
    node = Identity.generate()
    announce_node(swarm, node)
    with LedgerClient(coordinator["coordinator"]) as ledger:
        ledger.submit([receipt(Identity.load(key), node, "h1", 1, 400 * UNIT + UNIT // 4)])
    history = json.loads(credits_cli(coordinator, "history", key=key).stdout)
    assert any(row["to"] == node.account and row["credits"] == 400.25 and row["kind"] == "transfer" for row in history)
    assert json.loads(credits_cli(coordinator, "balance", key=key).stdout)["credits"] == GRANT - 400.25
    top = json.loads(credits_cli(coordinator, "top").stdout)  # public: no key needed
    assert any(row["account"] == node.account and row["earned"] == 400.25 for row in top)


def test_journal_check_is_public_and_runs_at_most_once_a_minute(coordinator: dict[str, Any]) -> None:
    first = json.loads(credits_cli(coordinator, "verify-journal").stdout)
    second = json.loads(credits_cli(coordinator, "verify-journal").stdout)
    assert first["ok"] and first["rows"] >= 1 and len(first["head_hash"]) == 64
    assert second["checked_at"] == first["checked_at"]  # the cached outcome, not a second full scan


def test_status_page_shows_models_nodes_and_coverage(
    coordinator: dict[str, Any], tiny_model: TinyFactory, tmp_path: Path
) -> None:
    ready = tmp_path / "node.json"
    node = subprocess.Popen(
        [*HIVEGEN, "node", "serve", "--model", str(tiny_model("llama")), "--blocks", "0:4", "--num-threads", "1",
         "--ready-file", str(ready), "--initial-peers", *coordinator["initial_peers"]],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(ready.exists, what="the node")

        def status() -> list[dict[str, Any]]:
            with urllib.request.urlopen(coordinator["status_url"] + "/status", timeout=10) as reply:
                return list(json.load(reply)["models"])

        models = wait_for(status, timeout=30, what="the model on the status page")
        assert models[0]["num_blocks"] == 6 and models[0]["missing_blocks"] == [4, 5] and not models[0]["covered"]
        assert [n["blocks"] for n in models[0]["nodes"]] == [[0, 4]]
        with urllib.request.urlopen(coordinator["status_url"] + "/leaderboard", timeout=10) as reply:
            assert "top" in json.load(reply)
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(30)


def test_altering_a_journal_row_fails_verification_naming_it(tmp_path: Path) -> None:
    data, ready = tmp_path / "ledger", tmp_path / "ready.json"
    proc = start_coordinator(data, ready)
    try:
        info = json.loads(wait_for(lambda: ready.exists() and ready.read_text(), what="coordinator"))
        with LedgerClient(info["coordinator"]) as ledger:
            client = Identity.generate()
            open_account(ledger, client)
            dht = start_dht(info["initial_peers"])
            try:
                node = Identity.generate()
                announce_node(dht, node)
                results = ledger.submit([receipt(client, node, "j", seq, seq * 10 * UNIT) for seq in (1, 2, 3)])
                assert [r.error for r in results] == ["", "", ""]
            finally:
                dht.shutdown()
        assert credits_cli(info, "verify-journal").returncode == 0
    finally:
        stop(proc)
    with sqlite3.connect(data / "ledger.sqlite") as db:
        rows = [r[0] for r in db.execute("SELECT row FROM journal ORDER BY row")]
        tampered = rows[len(rows) // 2]
        db.execute("DROP TRIGGER journal_no_update")  # the journal refuses updates; an attacker drops that first
        db.execute("UPDATE journal SET amount = amount + 1 WHERE row = ?", (tampered,))
    proc = start_coordinator(data, ready)  # the same data directory, restarted
    try:
        info = json.loads(wait_for(lambda: ready.exists() and ready.read_text(), what="coordinator restart"))
        result = credits_cli(info, "verify-journal")
        assert result.returncode == 1
        assert json.loads(result.stdout)["bad_row"] == tampered
    finally:
        stop(proc)
