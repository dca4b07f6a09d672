"""A node's receipt outbox (SQLite) and its receipt checks, without a swarm.

The ledger address points at a closed port, so every ledger call really fails as an outage would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from hivegen.coordinator.client import open_request
from hivegen.coordinator.ledger_service import receipt_to_proto
from hivegen.credits.identity import Identity
from hivegen.credits.outbox import APPLIED, DEFERRED, INSUFFICIENT, REJECTED, Answer, ReceiptOutbox
from hivegen.credits.receipts import WORK_UNITS_PER_CREDIT, Receipt, SignedReceipt, sign_receipt
from hivegen.node.billing import Billing, PaidSession
from hivegen.node.errors import RequestError

UNIT = WORK_UNITS_PER_CREDIT
CLIENT = Identity.generate()
NODE = Identity.generate()
MODEL = "tiny-0123456789ab"
BLOCK_PARAMS = [25_000_000] * 4  # 4 blocks; one token through two of them is half a credit
DEAD_LEDGER = "127.0.0.1:1"


def receipt(session_id: str, seq: int, work: int, client: Identity = CLIENT) -> SignedReceipt:
    r = Receipt(session_id, client.account, client.public_key_hex, NODE.account, MODEL, seq, work)
    return sign_receipt(client, r)


# --- outbox --------------------------------------------------------------------------------------------------------


def test_the_outbox_keeps_only_the_latest_receipt_per_session(tmp_path: Path) -> None:
    outbox = ReceiptOutbox(tmp_path / "receipts.sqlite")
    outbox.keep(receipt("s1", 2, 2 * WORK_UNITS_PER_CREDIT))
    outbox.keep(receipt("s1", 1, WORK_UNITS_PER_CREDIT))  # older: ignored
    outbox.keep(receipt("s2", 1, 5 * WORK_UNITS_PER_CREDIT))
    latest = outbox.latest("s1")
    assert latest is not None and latest.receipt.seq == 2
    assert [r.receipt.session_id for r in outbox.due()] == ["s1", "s2"]
    assert outbox.pending_count() == 2 and outbox.unsettled_work(CLIENT.account) == 7 * WORK_UNITS_PER_CREDIT
    assert outbox.latest("nope") is None


def test_answers_settle_receipts_and_only_unaffordable_ones_are_retried(tmp_path: Path) -> None:
    outbox = ReceiptOutbox(tmp_path / "receipts.sqlite")
    for sid in ("applied", "poor", "forged", "early"):
        outbox.keep(receipt(sid, 1, 3 * WORK_UNITS_PER_CREDIT))
    outbox.record(
        [Answer(sid, 1, 3 * UNIT, outcome) for sid, outcome in (("applied", APPLIED), ("poor", INSUFFICIENT),
                                                                 ("forged", REJECTED), ("early", DEFERRED))]
    )  # fmt: skip
    assert outbox.due(retry_after=3600, deferred_after=3600) == []
    assert [r.receipt.session_id for r in outbox.due(retry_after=0, deferred_after=3600)] == ["poor"]
    assert [r.receipt.session_id for r in outbox.due(retry_after=3600, deferred_after=0)] == ["early"]
    assert outbox.pending_count() == 2
    assert outbox.unsettled_work(CLIENT.account) == 2 * 3 * UNIT  # the unaffordable and deferred ones are owed

    outbox.keep(receipt("applied", 2, 4 * WORK_UNITS_PER_CREDIT))  # the session went on: due again
    assert [r.receipt.seq for r in outbox.due(retry_after=3600, deferred_after=3600)] == [2]
    assert outbox.unsettled_work(CLIENT.account) == (2 * 3 + 1) * UNIT
    outbox.record([Answer("applied", 1, 3 * UNIT, APPLIED)])  # a late answer for an older receipt changes nothing
    assert [r.receipt.seq for r in outbox.due(retry_after=3600, deferred_after=3600)] == [2]


def test_a_kept_receipt_survives_the_process_being_killed(tmp_path: Path) -> None:
    path = tmp_path / "receipts.sqlite"
    signed = receipt("s1", 7, 9 * WORK_UNITS_PER_CREDIT)
    script = (
        "import json, os, signal, sys\n"
        "from hivegen.credits.outbox import ReceiptOutbox\n"
        "from hivegen.credits.receipts import SignedReceipt\n"
        "outbox = ReceiptOutbox(sys.argv[1])\n"
        "outbox.keep(SignedReceipt.from_dict(json.loads(sys.argv[2])))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script, str(path), json.dumps(signed.to_dict())], check=False)
    assert killed.returncode == -9
    assert ReceiptOutbox(path).latest("s1") == signed


# --- receipt checks ------------------------------------------------------------------------------------------------


def billing(tmp_path: Path, unpaid_steps: int = 1) -> Billing:
    outbox = ReceiptOutbox(tmp_path / "receipts.sqlite")
    return Billing(NODE, DEAD_LEDGER, outbox, MODEL, BLOCK_PARAMS, unpaid_steps=unpaid_steps, ledger_timeout=2.0)


def served(session: PaidSession, steps: int, tokens: int = 1) -> PaidSession:
    for _ in range(steps):
        session.served(tokens)
    return session


@pytest.mark.parametrize("unpaid_steps", [0, 1, 2])
def test_receipts_may_lag_the_work_served_by_the_unpaid_window(tmp_path: Path, unpaid_steps: int) -> None:
    node = billing(tmp_path, unpaid_steps)
    session = PaidSession("s1", CLIENT.account, CLIENT.public_key_hex, node.params_per_token(0, 2))
    per_step = 2 * 25_000_000 * 3  # 3 tokens a step through 2 blocks
    served(session, 4, tokens=3)
    # Step 4 without any receipt is served only if all 4 steps served so far fit in the window.
    if unpaid_steps >= 4:
        node.check_receipt(session, None, 4)
    else:
        with pytest.raises(RequestError, match="needs a receipt") as refused:
            node.check_receipt(session, None, 4)
        assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    # A receipt paying all but `unpaid_steps` steps is enough, one step short of that is not.
    paid_steps = 4 - unpaid_steps
    if paid_steps > 1:
        short = receipt_to_proto(receipt("s1", 1, (paid_steps - 1) * per_step))
        with pytest.raises(RequestError, match="needs a receipt"):
            node.check_receipt(session, short, 4)
    enough = receipt_to_proto(receipt("s1", 2, paid_steps * per_step))
    node.check_receipt(session, enough, 4)
    assert session.paid_work == paid_steps * per_step and node.outbox.latest("s1") == receipt(
        "s1", 2, paid_steps * per_step
    )
    if paid_steps < 4:  # settling must pay for every step served
        with pytest.raises(RequestError, match="settling needs a receipt"):
            node.settle(session, receipt_to_proto(receipt("s1", 3, paid_steps * per_step)))
    assert node.settle(session, receipt_to_proto(receipt("s1", 5, 4 * per_step))) == 5
    node.stop(flush_timeout=0)


def test_sessions_without_a_payer_or_with_a_borrowed_key_are_refused_before_any_ledger_call(tmp_path: Path) -> None:
    node = billing(tmp_path)
    cases = [
        ("", "", grpc.StatusCode.UNAUTHENTICATED, "charges credits"),
        ("hg" + "x" * 40, CLIENT.public_key_hex, grpc.StatusCode.INVALID_ARGUMENT, "is not an account"),
        (CLIENT.account, NODE.public_key_hex, grpc.StatusCode.UNAUTHENTICATED, "does not own"),
        (CLIENT.account, "00" * 31, grpc.StatusCode.UNAUTHENTICATED, "does not own"),
    ]
    for account, key, code, message in cases:
        with pytest.raises(RequestError, match=message) as refused:
            node.admit("s", account, key, 0, 2, 16)
        assert refused.value.code == code
    node.stop(flush_timeout=0)


def test_a_paying_client_must_send_its_signed_open_so_the_node_may_read_its_balance(tmp_path: Path) -> None:
    node = billing(tmp_path)
    for ledger_open in (None, open_request(NODE)):  # none, or another account's
        with pytest.raises(RequestError, match=r"only .* may read its balance") as refused:
            node.admit("s", CLIENT.account, CLIENT.public_key_hex, 0, 2, 16, ledger_open)
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    node.stop(flush_timeout=0)


def test_an_unknown_client_is_refused_while_the_ledger_is_unreachable(tmp_path: Path) -> None:
    node = billing(tmp_path)
    with pytest.raises(RequestError, match="unreachable and this node has not served") as refused:
        node.admit("s", CLIENT.account, CLIENT.public_key_hex, 0, 2, 16, open_request(CLIENT))
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE  # clients route around: another node may know them
    node.stop(flush_timeout=0)


def test_receipts_wait_in_the_outbox_while_the_ledger_is_unreachable(tmp_path: Path) -> None:
    node = billing(tmp_path)
    node.outbox.keep(receipt("s1", 1, 2 * WORK_UNITS_PER_CREDIT))
    node.start()
    node.stop(flush_timeout=1.0)  # the last submission fails: the receipt stays
    assert ReceiptOutbox(tmp_path / "receipts.sqlite").pending_count() == 1
