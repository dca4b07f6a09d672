"""The credit ledger: idempotent receipt application, zero-sum transfers, and a tamper-evident journal."""

from __future__ import annotations

import dataclasses
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivegen.credits.auth import CallRefused
from hivegen.credits.grants import check_proof, solve_proof
from hivegen.credits.identity import Identity
from hivegen.credits.ledger import Ledger, LedgerFormatError
from hivegen.credits.receipts import WORK_UNITS_PER_CREDIT, Receipt, SignedReceipt, sign_receipt
from hivegen.errors import ForgedReceiptError, GrantProofNeeded, InsufficientCredits, JournalError

UNIT = WORK_UNITS_PER_CREDIT
GRANT = 1_000
ALICE, BOB = Identity.generate(), Identity.generate()
NODE, NODE2 = Identity.generate().account, Identity.generate().account


def pay(
    client: Identity, seq: int, credits: float, node: str = NODE, session: str = "s1", model: str = "smollm2"
) -> SignedReceipt:
    """`client`'s receipt #seq for `credits` credits of cumulative work on `node`."""
    receipt = Receipt(session, client.account, client.public_key_hex, node, model, seq, int(credits * UNIT))
    return sign_receipt(client, receipt)


def open_clients(ledger: Ledger, *clients: Identity) -> None:
    for client in clients:
        ledger.open_account(client.account, client.public_key_hex)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    """A ledger (grants without proof of work) where ALICE and BOB have opened their accounts."""
    with Ledger(tmp_path / "ledger.db", starter_grant=GRANT) as opened:
        open_clients(opened, ALICE, BOB)
        yield opened


def reason(exc: pytest.ExceptionInfo[ForgedReceiptError]) -> str:
    return exc.value.reason


def test_new_account_gets_the_starter_grant_once(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.db", starter_grant=GRANT) as ledger:
        assert ledger.open_account(ALICE.account, ALICE.public_key_hex) == GRANT * UNIT
        assert ledger.has_account(ALICE.account)
        assert ledger.open_account(ALICE.account, ALICE.public_key_hex) == GRANT * UNIT
        assert [e.kind for e in ledger.history(ALICE.account)] == ["grant"]
        assert ledger.totals() == (GRANT * UNIT, GRANT * UNIT)


def test_balance_of_an_unknown_account_is_zero_and_does_not_create_it(ledger: Ledger) -> None:
    stranger = Identity.generate().account
    assert ledger.balance(stranger) == 0
    assert not ledger.has_account(stranger)


def test_a_grant_needs_a_proof_of_work_bound_to_the_key(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.db", starter_grant=GRANT, grant_proof_bits=8) as ledger:
        salt = ledger.grant_policy.salt
        with pytest.raises(GrantProofNeeded) as caught:
            ledger.open_account(ALICE.account, ALICE.public_key_hex)
        assert (caught.value.bits, caught.value.salt, caught.value.grant_units) == (8, salt, GRANT * UNIT)
        bobs = solve_proof(salt, BOB.public_key_hex, 8)  # another key's proof is worth nothing to ALICE
        if bobs != solve_proof(salt, ALICE.public_key_hex, 8):
            with pytest.raises(GrantProofNeeded):
                ledger.open_account(ALICE.account, ALICE.public_key_hex, bobs)
        assert not ledger.has_account(ALICE.account) and ledger.totals() == (0, 0)
        proof = solve_proof(salt, ALICE.public_key_hex, 8)
        assert ledger.open_account(ALICE.account, ALICE.public_key_hex, proof) == GRANT * UNIT
        assert ledger.open_account(ALICE.account, ALICE.public_key_hex, proof) == GRANT * UNIT  # once only
        assert ledger.totals() == (GRANT * UNIT, GRANT * UNIT)


def test_with_no_starter_grant_accounts_open_empty(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.db", starter_grant=0, grant_proof_bits=20) as ledger:
        assert ledger.open_account(ALICE.account, ALICE.public_key_hex) == 0
        with pytest.raises(InsufficientCredits):
            ledger.apply_receipt(pay(ALICE, 1, 0.001))
        assert ledger.totals() == (0, 0)


def test_a_client_that_never_opened_its_account_cannot_pay(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.db", starter_grant=GRANT) as ledger, pytest.raises(InsufficientCredits):
        ledger.apply_receipt(pay(ALICE, 1, 1))


def test_a_proof_of_work_is_never_zero_which_means_none_on_the_wire() -> None:
    salt = "s"
    for key in (Identity.generate().public_key_hex for _ in range(300)):  # at 2 bits, 0 would win 1 time in 4
        proof = solve_proof(salt, key, 2)
        assert proof >= 1 and check_proof(salt, key, proof, 2)
        assert not check_proof(salt, key, 0, 0)


def test_a_nonce_is_accepted_once(ledger: Ledger) -> None:
    ledger.use_nonce("ab" * 16, time.time())
    with pytest.raises(CallRefused, match="replayed"):
        ledger.use_nonce("ab" * 16, time.time())


def test_a_ledger_in_whole_credits_from_an_earlier_version_is_refused(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "old.db") as db:
        db.executescript(
            "CREATE TABLE accounts (account TEXT PRIMARY KEY, public_key TEXT, balance INTEGER, granted INTEGER, "
            "created_at REAL); CREATE TABLE journal (row INTEGER PRIMARY KEY, amount INTEGER);"
            "INSERT INTO journal VALUES (1, 10000);"
        )
    db.close()
    with pytest.raises(LedgerFormatError, match="whole credits"):
        Ledger(tmp_path / "old.db")


def test_receipt_moves_its_work_units_from_client_to_new_node(ledger: Ledger) -> None:
    assert ledger.apply_receipt(pay(ALICE, 1, 7)) == 7 * UNIT
    assert ledger.balance(ALICE.account) == (GRANT - 7) * UNIT
    assert ledger.balance(NODE) == 7 * UNIT


def test_later_receipt_transfers_only_the_increase(ledger: Ledger) -> None:
    ledger.apply_receipt(pay(ALICE, 1, 7))
    assert ledger.apply_receipt(pay(ALICE, 2, 10)) == 3 * UNIT
    assert ledger.balance(NODE) == 10 * UNIT


def test_sessions_worth_less_than_a_credit_are_charged_exactly(ledger: Ledger) -> None:
    for i in range(10):  # ten short sessions of 0.3 credits each
        assert ledger.apply_receipt(pay(ALICE, 1, 0.3, session=f"short-{i}")) == 30_000_000
    assert ledger.apply_receipt(pay(ALICE, 1, 1e-8, session="tiny")) == 1  # one parameter-token
    assert ledger.balance(NODE) == 3 * UNIT + 1
    assert ledger.balance(ALICE.account) == (GRANT - 3) * UNIT - 1


def test_same_receipt_twice_changes_nothing(ledger: Ledger) -> None:
    receipt = pay(ALICE, 1, 7)
    ledger.apply_receipt(receipt)
    assert ledger.apply_receipt(receipt) == 0
    assert ledger.balance(NODE) == 7 * UNIT


def test_older_receipt_after_a_newer_one_changes_nothing(ledger: Ledger) -> None:
    older, newer = pay(ALICE, 1, 7), pay(ALICE, 2, 10)
    ledger.apply_receipt(newer)
    assert ledger.apply_receipt(older) == 0
    assert ledger.balance(NODE) == 10 * UNIT


def test_receipt_for_another_clients_session_is_rejected_and_changes_nothing(ledger: Ledger) -> None:
    ledger.apply_receipt(pay(ALICE, 1, 7))
    before = ledger.history()
    with pytest.raises(ForgedReceiptError) as caught:
        ledger.apply_receipt(pay(BOB, 2, 50))
    assert reason(caught) == "session-owner"
    assert ledger.history() == before
    assert ledger.balance(BOB.account) == GRANT * UNIT


def test_receipt_with_less_work_than_already_applied_is_malformed(ledger: Ledger) -> None:
    ledger.apply_receipt(pay(ALICE, 1, 7))
    with pytest.raises(ForgedReceiptError) as caught:
        ledger.apply_receipt(pay(ALICE, 2, 5))
    assert reason(caught) == "malformed"
    assert ledger.balance(NODE) == 7 * UNIT


def test_forged_receipt_is_rejected_before_creating_any_account(ledger: Ledger) -> None:
    signed = pay(ALICE, 1, 7)
    forged = SignedReceipt(dataclasses.replace(signed.receipt, work=70 * UNIT), signed.signature)
    with pytest.raises(ForgedReceiptError) as caught:
        ledger.apply_receipt(forged)
    assert reason(caught) == "bad-signature"
    assert not ledger.has_account(NODE)


def test_unaffordable_receipt_raises_insufficient_credits_and_moves_nothing(ledger: Ledger) -> None:
    ledger.apply_receipt(pay(ALICE, 1, 600))
    with pytest.raises(InsufficientCredits) as caught:
        ledger.apply_receipt(pay(ALICE, 2, 1100))
    assert (caught.value.account, caught.value.balance, caught.value.needed) == (ALICE.account, 400 * UNIT, 500 * UNIT)
    assert "400" in str(caught.value) and "500" in str(caught.value) and "hivegen node serve" in str(caught.value)
    assert ledger.balance(ALICE.account) == 400 * UNIT
    assert ledger.apply_receipt(pay(ALICE, 2, 1000)) == 400 * UNIT  # the session was left where it was


def test_same_session_id_on_two_nodes_is_paid_separately(ledger: Ledger) -> None:
    assert ledger.apply_receipt(pay(ALICE, 1, 7, node=NODE)) == 7 * UNIT
    assert ledger.apply_receipt(pay(ALICE, 1, 7, node=NODE2)) == 7 * UNIT


def test_file_ledger_runs_in_wal_mode(ledger: Ledger, tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "ledger.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_balances_and_sessions_survive_reopening(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.db", starter_grant=GRANT) as first:
        open_clients(first, ALICE)
        first.apply_receipt(pay(ALICE, 1, 7))
    with Ledger(tmp_path / "ledger.db", starter_grant=GRANT) as second:
        assert second.balance(NODE) == 7 * UNIT
        assert second.apply_receipt(pay(ALICE, 1, 7)) == 0


WORKER = """
import sys, time
from pathlib import Path
from hivegen.credits import WORK_UNITS_PER_CREDIT, Identity, Ledger, Receipt, sign_receipt
db, tmp, me, steps = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
clients = {name: Identity.load(tmp / name) for name in ("shared", "own-" + me)}
node = Identity.load(tmp / "node").account
(tmp / ("ready-" + me)).touch()
while not (tmp / "go").exists():
    time.sleep(0.01)
ledger = Ledger(db, starter_grant=1000)  # GRANT
for seq in range(1, steps + 1):
    for name, who in clients.items():
        receipt = Receipt(name, who.account, who.public_key_hex, node, "m", seq, seq * WORK_UNITS_PER_CREDIT)
        ledger.apply_receipt(sign_receipt(who, receipt))
ledger.close()
"""


def test_two_processes_applying_receipts_concurrently_lose_and_double_count_nothing(tmp_path: Path) -> None:
    steps = 60
    for name in ("shared", "own-0", "own-1", "node"):
        Identity.generate().save(tmp_path / name)
    db = str(tmp_path / "ledger.db")
    with Ledger(db, starter_grant=GRANT) as ledger:
        open_clients(ledger, *(Identity.load(tmp_path / name) for name in ("shared", "own-0", "own-1")))
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, db, str(tmp_path), me, str(steps)], cwd=Path(__file__).parents[1]
        )
        for me in ("0", "1")
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{me}").exists() for me in "01") and time.monotonic() < deadline:
        time.sleep(0.01)
    (tmp_path / "go").touch()
    assert [w.wait(timeout=120) for w in workers] == [0, 0]
    with Ledger(db, starter_grant=GRANT) as ledger:
        node = Identity.load(tmp_path / "node").account
        assert ledger.balance(node) == 3 * steps * UNIT  # the shared stream is paid once, each own stream once
        for name in ("shared", "own-0", "own-1"):
            assert ledger.balance(Identity.load(tmp_path / name).account) == (GRANT - steps) * UNIT
        assert ledger.totals() == (3 * GRANT * UNIT, 3 * GRANT * UNIT)
        ledger.verify_journal()


def test_threads_sharing_one_ledger_lose_nothing(ledger: Ledger) -> None:
    clients = [Identity.generate() for _ in range(4)]
    open_clients(ledger, *clients)
    paid: list[int] = []

    def run(client: Identity) -> None:
        paid.extend(ledger.apply_receipt(pay(client, seq, seq, session=client.account)) for seq in range(1, 21))

    threads = [threading.Thread(target=run, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(paid) == 4 * 20 * UNIT and len(paid) == 4 * 20
    assert ledger.balance(NODE) == 4 * 20 * UNIT
    ledger.verify_journal()


def test_history_lists_newest_first_and_filters_by_account(ledger: Ledger) -> None:
    ledger.apply_receipt(pay(ALICE, 1, 7))
    ledger.apply_receipt(pay(BOB, 1, 3, session="s2"))
    assert [(e.kind, e.src, e.amount) for e in ledger.history(limit=2)] == [
        ("transfer", BOB.account, 3 * UNIT),
        ("transfer", ALICE.account, 7 * UNIT),
    ]
    assert [(e.kind, e.amount, e.session_id, e.seq) for e in ledger.history(ALICE.account)] == [
        ("transfer", 7 * UNIT, "s1", 1),
        ("grant", GRANT * UNIT, None, None),
    ]


def test_top_ranks_accounts_by_credits_earned(ledger: Ledger) -> None:
    ledger.apply_receipt(pay(ALICE, 1, 7, node=NODE))
    ledger.apply_receipt(pay(ALICE, 1, 9, node=NODE2))
    ledger.apply_receipt(pay(BOB, 1, 4, node=NODE, session="s2"))
    assert ledger.top() == [(NODE, 11 * UNIT), (NODE2, 9 * UNIT)]
    assert ledger.top(limit=1) == [(NODE, 11 * UNIT)]


def test_totals_of_balances_and_grants_are_equal(ledger: Ledger) -> None:
    ledger.apply_receipt(pay(ALICE, 1, 7))
    ledger.apply_receipt(pay(BOB, 1, 3, session="s2", node=ALICE.account))
    assert ledger.totals() == (2 * GRANT * UNIT, 2 * GRANT * UNIT)


def tampered(path: Path, sql: str) -> None:
    """Change the ledger file behind its back, as an attacker with the file would (guards dropped)."""
    with sqlite3.connect(path) as db:
        db.execute("DROP TRIGGER journal_no_update")
        db.execute("DROP TRIGGER journal_no_delete")
        db.execute(sql)
    db.close()


@pytest.fixture
def busy_ledger_path(tmp_path: Path) -> Path:
    """A ledger file with 5 journal rows: 2 grants and 3 transfers."""
    with Ledger(tmp_path / "ledger.db", starter_grant=GRANT) as ledger:
        open_clients(ledger, ALICE, BOB)
        ledger.apply_receipt(pay(ALICE, 1, 7))
        ledger.apply_receipt(pay(BOB, 1, 3, session="s2"))
        ledger.apply_receipt(pay(ALICE, 2, 9))
        assert len(ledger.history()) == 5
        ledger.verify_journal()
    return tmp_path / "ledger.db"


@pytest.mark.parametrize("row", [1, 4])
def test_altering_a_journal_row_fails_verification_naming_that_row(busy_ledger_path: Path, row: int) -> None:
    tampered(busy_ledger_path, f"UPDATE journal SET amount = amount + 1 WHERE row = {row}")
    with Ledger(busy_ledger_path) as ledger, pytest.raises(JournalError) as caught:
        ledger.verify_journal()
    assert caught.value.row == row
    assert f"row {row}" in str(caught.value)


@pytest.mark.parametrize("row", [1, 3, 5])
def test_deleting_a_journal_row_fails_verification_naming_that_row(busy_ledger_path: Path, row: int) -> None:
    tampered(busy_ledger_path, f"DELETE FROM journal WHERE row = {row}")
    with Ledger(busy_ledger_path) as ledger, pytest.raises(JournalError) as caught:
        ledger.verify_journal()
    assert caught.value.row == row


def test_altering_a_balance_fails_verification(busy_ledger_path: Path) -> None:
    tampered(busy_ledger_path, f"UPDATE accounts SET balance = balance + 5 WHERE account = '{NODE}'")
    with Ledger(busy_ledger_path) as ledger, pytest.raises(JournalError, match="balance"):
        ledger.verify_journal()


def test_journal_refuses_updates_and_deletes_through_sql(busy_ledger_path: Path) -> None:
    with sqlite3.connect(busy_ledger_path) as db:
        for sql in ("UPDATE journal SET amount = 1", "DELETE FROM journal"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                db.execute(sql)
    db.close()


# Conservation: random mixes of valid, duplicate, reordered, stale, forged and unaffordable receipts, of grants
# claimed with right, wrong and missing proofs of work, and of replayed call nonces.
CLIENTS = (ALICE, BOB)
NEWCOMERS = tuple(Identity.generate() for _ in range(3))
PROOF_BITS = 4
NODES = (NODE, NODE2, BOB.account)  # a client can serve too, and even serve itself
SMALL_GRANT = 500  # credits; small, so that some receipts cost more than the client has
SESSIONS = ("s0", "s1", "s2")  # session i belongs to CLIENTS[i % 2]
streams = st.tuples(st.integers(0, len(SESSIONS) - 1), st.integers(0, len(NODES) - 1))
work_steps = st.one_of(st.integers(0, 3 * UNIT), st.integers(100 * UNIT, 700 * UNIT))  # cheap or costly steps
operations = st.lists(
    st.one_of(
        st.tuples(st.just("step"), streams, work_steps, st.booleans()),  # False: held back, applied later
        st.tuples(st.just("reorder"), streams, work_steps, work_steps),  # two steps, the newer applied first
        st.tuples(st.just("replay"), st.integers(0, 20), st.integers(0, 20)),  # a stream with receipts, one of them
        st.tuples(st.sampled_from(["bad-signature", "wrong-signer"]), streams, st.integers(0, 20)),
        st.tuples(st.sampled_from(["session-owner", "less-work"]), st.integers(0, 20), st.integers(1, 5 * UNIT)),
        st.tuples(st.just("open"), st.integers(0, len(NEWCOMERS) - 1), st.sampled_from(["right", "wrong", "none"])),
        st.tuples(st.just("nonce"), st.integers(0, 3), st.booleans()),
    ),
    max_size=40,
)


Issued = dict[tuple[str, str], list[SignedReceipt]]


@dataclasses.dataclass
class Model:
    """What the ledger should hold: balances and, per (session, node), the newest applied receipt."""

    balances: dict[str, int]  # work units
    applied: dict[tuple[str, str], SignedReceipt] = dataclasses.field(default_factory=dict)
    grantees: set[str] = dataclasses.field(default_factory=set)
    nonces: set[str] = dataclasses.field(default_factory=set)

    def expect(self, signed: SignedReceipt) -> int | None:
        """Units the ledger should move for an honest receipt, or None when the client cannot afford it."""
        r = signed.receipt
        before = self.applied.get((r.session_id, r.node))
        if before is not None and r.seq <= before.receipt.seq:
            return 0
        delta = r.work - (before.receipt.work if before else 0)
        if self.balances[r.client] < delta:
            return None
        self.balances[r.client] -= delta
        self.balances[r.node] += delta
        self.applied[(r.session_id, r.node)] = signed
        return delta


def owners(session: str) -> tuple[Identity, Identity]:
    """(the client owning `session`, the other client)."""
    s = SESSIONS.index(session)
    return CLIENTS[s % 2], CLIENTS[(s + 1) % 2]


def forge(op: str, where: Any, n: int, issued: Issued, model: Model) -> SignedReceipt | None:
    """A receipt the ledger must reject for reason `op` (less-work: malformed), or None if `op` cannot apply yet."""
    if op in ("session-owner", "less-work"):  # these need a stream that a receipt has bound to its client
        bound = sorted(model.applied)
        if not bound:
            return None
        applied = model.applied[bound[where % len(bound)]].receipt
        owner, other = owners(applied.session_id)
        later = dataclasses.replace(applied, seq=applied.seq + 1 + n % 3)
        if op == "session-owner":
            stolen = dataclasses.replace(
                later, client=other.account, client_key=other.public_key_hex, work=later.work + n
            )
            return sign_receipt(other, stolen)
        return sign_receipt(owner, dataclasses.replace(later, work=applied.work - 1)) if applied.work else None
    key = (SESSIONS[where[0]], NODES[where[1]])
    owner, other = owners(key[0])
    history = issued.get(key)
    base = history[-1].receipt if history else Receipt(*key[:1], owner.account, owner.public_key_hex, key[1], "m", 1, n)
    if op == "bad-signature":
        return SignedReceipt(dataclasses.replace(base, work=base.work + UNIT), sign_receipt(owner, base).signature)
    receipt = dataclasses.replace(base, seq=base.seq + 1, client_key=other.public_key_hex)  # wrong-signer
    return SignedReceipt(receipt, other.sign(receipt.payload()).hex())


def next_receipt(key: tuple[str, str], history: list[SignedReceipt], increment: int) -> SignedReceipt:
    """The stream owner's next receipt: seq + 1, `increment` more work."""
    owner, _ = owners(key[0])
    seq, work = (history[-1].receipt.seq, history[-1].receipt.work) if history else (0, 0)
    return sign_receipt(
        owner, Receipt(key[0], owner.account, owner.public_key_hex, key[1], "m", seq + 1, work + increment)
    )


def check_apply(ledger: Ledger, model: Model, signed: SignedReceipt) -> None:
    want = model.expect(signed)
    if want is None:
        with pytest.raises(InsufficientCredits):
            ledger.apply_receipt(signed)
    else:
        assert ledger.apply_receipt(signed) == want


def claim(ledger: Ledger, model: Model, who: Identity, how: str) -> None:
    """A newcomer opens its account with the right proof of work, a wrong one, or none."""
    salt = ledger.grant_policy.salt
    right = solve_proof(salt, who.public_key_hex, PROOF_BITS)
    proof = {"right": right, "wrong": right + 1, "none": None}[how]
    wrong = proof is None or not check_proof(salt, who.public_key_hex, proof, PROOF_BITS)
    already = model.balances.get(who.account) is not None
    if wrong and not already:
        with pytest.raises(GrantProofNeeded):
            ledger.open_account(who.account, who.public_key_hex, proof)
        return
    ledger.open_account(who.account, who.public_key_hex, proof)
    if not already:
        model.balances[who.account] = SMALL_GRANT * UNIT
        model.grantees.add(who.account)


def use_nonce(ledger: Ledger, model: Model, which: int) -> None:
    nonce = f"{which:032x}"
    if nonce in model.nonces:
        with pytest.raises(CallRefused):
            ledger.use_nonce(nonce, time.time())
    else:
        ledger.use_nonce(nonce, time.time())
        model.nonces.add(nonce)


@settings(max_examples=150, deadline=None)
@given(operations)
def test_credits_are_conserved_under_any_mix_of_receipts_grants_and_calls(ops: list[tuple[Any, ...]]) -> None:
    accounts = sorted({*(c.account for c in CLIENTS), *NODES})
    model = Model({account: 0 for account in accounts})
    issued: Issued = {}
    with Ledger(":memory:", starter_grant=SMALL_GRANT, grant_proof_bits=PROOF_BITS) as ledger:
        for client in CLIENTS:
            proof = solve_proof(ledger.grant_policy.salt, client.public_key_hex, PROOF_BITS)
            ledger.open_account(client.account, client.public_key_hex, proof)
            model.balances[client.account] = SMALL_GRANT * UNIT
            model.grantees.add(client.account)
        for op, where, arg, *rest in ops:
            if op == "open":
                claim(ledger, model, NEWCOMERS[where], arg)
            elif op == "nonce":
                use_nonce(ledger, model, where)
            elif op in ("step", "reorder"):
                key = (SESSIONS[where[0]], NODES[where[1]])
                history = issued.setdefault(key, [])
                for increment in (arg, rest[0]) if op == "reorder" else (arg,):
                    history.append(next_receipt(key, history, increment))
                if op == "reorder":
                    check_apply(ledger, model, history[-1])
                    check_apply(ledger, model, history[-2])
                elif rest[0]:
                    check_apply(ledger, model, history[-1])
            elif op == "replay":
                if issued:
                    history = issued[sorted(issued)[where % len(issued)]]
                    check_apply(ledger, model, history[arg % len(history)])
            elif (forged := forge(op, where, arg, issued, model)) is not None:
                with pytest.raises(ForgedReceiptError) as caught:
                    ledger.apply_receipt(forged)
                assert caught.value.reason == ("malformed" if op == "less-work" else op)
            balances = {account: ledger.balance(account) for account in model.balances}
            assert balances == model.balances
            assert min(balances.values()) >= 0
            granted = SMALL_GRANT * UNIT * len(model.grantees)  # one grant per key that proved its work
            assert ledger.totals() == (granted, granted)
        ledger.verify_journal()
    # The net of each stream's newest applied receipt alone, from the grants.
    final = {account: SMALL_GRANT * UNIT if account in model.grantees else 0 for account in model.balances}
    for signed in model.applied.values():
        final[signed.receipt.client] -= signed.receipt.work
        final[signed.receipt.node] += signed.receipt.work
    assert final == model.balances
