"""The coordinator as a user runs it: DHT bootstrap, ledger over gRPC, HTTP status, and the credits CLI."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hivegen.coordinator.client import LedgerClient
from hivegen.credits.identity import Identity
from hivegen.credits.receipts import WORK_UNITS_PER_CREDIT as UNIT
from hivegen.credits.receipts import Receipt, sign_receipt
from tests.conftest import TinyFactory, wait_for

HIVEGEN = [sys.executable, "-m", "hivegen"]
GRANT = 500


def start_coordinator(data: Path, ready: Path) -> subprocess.Popen[str]:
    ready.unlink(missing_ok=True)
    command = [*HIVEGEN, "coordinator", "serve", "--data", str(data), "--starter-grant", str(GRANT)]
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


def credits_cli(coordinator: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HIVEGEN, "credits", *args, "--coordinator", coordinator["coordinator"], "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def receipt(client: Identity, node: Identity, session: str, seq: int, work: int) -> Any:
    return sign_receipt(
        client,
        Receipt(session_id=session, client=client.account, client_key=client.public_key_hex, node=node.account,
                model_key="tiny-0", seq=seq, work=work),
    )  # fmt: skip


def test_receipts_move_credits_from_client_to_node(coordinator: dict[str, Any]) -> None:
    client, node = Identity.generate(), Identity.generate()
    with LedgerClient(coordinator["coordinator"]) as ledger:
        assert ledger.open_account(client.account, client.public_key_hex).balance == GRANT
        results = ledger.submit([receipt(client, node, "s1", 1, 30 * UNIT), receipt(client, node, "s1", 2, 70 * UNIT)])
        assert [r.error for r in results] == ["", ""]
        assert sum(r.transferred for r in results) == 70
        again = ledger.submit([receipt(client, node, "s1", 2, 70 * UNIT)])  # a duplicate changes nothing
        assert again[0].transferred == 0 and again[0].error == ""
        assert ledger.balance(client.account).balance == GRANT - 70
        assert ledger.balance(node.account).balance == GRANT + 70


def test_forged_receipt_is_refused_with_its_reason(coordinator: dict[str, Any]) -> None:
    client, node, thief = Identity.generate(), Identity.generate(), Identity.generate()
    with LedgerClient(coordinator["coordinator"]) as ledger:
        ledger.submit([receipt(client, node, "owned", 1, 5 * UNIT)])
        stolen = ledger.submit([receipt(thief, node, "owned", 2, 9 * UNIT)])  # another client's session
        assert stolen[0].error.startswith("forged: session-owner")
        assert ledger.balance(thief.account).balance in (0, GRANT)


def test_credits_cli_prints_balance_and_identity_as_json(coordinator: dict[str, Any], tmp_path: Path) -> None:
    key = tmp_path / "identity"
    shown = subprocess.run([*HIVEGEN, "identity", "--path", str(key), "--json"], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    account = json.loads(shown.stdout)["account"]
    assert account == Identity.load(key).account
    result = credits_cli(coordinator, "balance", account)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"account": account, "balance": 0, "known": False}


def test_history_and_top_list_transfers(coordinator: dict[str, Any]) -> None:
    client, node = Identity.generate(), Identity.generate()
    with LedgerClient(coordinator["coordinator"]) as ledger:
        ledger.submit([receipt(client, node, "h1", 1, 400 * UNIT)])
    history = json.loads(credits_cli(coordinator, "history", node.account).stdout)
    assert any(row["to"] == node.account and row["amount"] == 400 and row["kind"] == "transfer" for row in history)
    top = json.loads(credits_cli(coordinator, "top").stdout)
    assert top[0]["account"] == node.account and top[0]["earned"] >= 400


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
        client, node = Identity.generate(), Identity.generate()
        with LedgerClient(info["coordinator"]) as ledger:
            ledger.submit([receipt(client, node, "j", seq, seq * 10 * UNIT) for seq in (1, 2, 3)])
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
