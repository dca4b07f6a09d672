"""A node's side of credits: admit clients that can pay, verify their receipts step by step, keep them on
disk and submit them to the coordinator's ledger in the background.

Work is tokens processed x parameters of the blocks run (see hivegen.credits.receipts). A paid session's
step k carries the client's receipt for the work of steps 0..k-1; the node serves the step only if that
receipt is genuine, names this node and this session's client, and lags the work served by at most
`unpaid_steps` steps. The receipt is committed to the outbox before the step runs, so a node killed at any
moment still holds, and later submits, every receipt it acted on.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import grpc

from hivegen.coordinator.client import CoordinatorUnreachable, LedgerClient
from hivegen.coordinator.ledger_service import grant_proof_metadata, receipt_from_proto
from hivegen.credits.identity import Identity, account_of, is_account
from hivegen.credits.outbox import APPLIED, DEFERRED, INSUFFICIENT, REJECTED, Answer, ReceiptOutbox
from hivegen.credits.receipts import INSUFFICIENT_CREDITS, WORK_UNITS_PER_CREDIT, verify_receipt
from hivegen.credits.units import format_credits
from hivegen.errors import ForgedReceiptError, GrantProofNeeded, HivegenError, InsufficientCredits
from hivegen.node.errors import RequestError
from hivegen.proto import ledger_pb2

logger = logging.getLogger(__name__)


@dataclass
class PaidSession:
    """What a node tracks of one paid session: who pays, the work served and the work receipted."""

    session_id: str
    client: str
    client_key: str
    params_per_token: int
    step_work: list[int] = field(default_factory=list)  # cumulative work after each served step
    paid_work: int = 0
    last_seq: int = 0

    @property
    def served_work(self) -> int:
        return self.step_work[-1] if self.step_work else 0

    def served(self, tokens: int) -> None:
        """Count a served step of `tokens` positions (summed over batch rows)."""
        self.step_work.append(self.served_work + tokens * self.params_per_token)


class Billing:
    """Admission by balance, receipt checks, the durable outbox and the submitter thread of one node."""

    def __init__(
        self,
        identity: Identity,
        coordinator: str,
        outbox: ReceiptOutbox,
        model_key: str,
        block_params: list[int],
        unpaid_steps: int = 1,
        unpaid_credits: int = 1000,
        balance_ttl: float = 5.0,
        submit_interval: float = 1.0,
        ledger_timeout: float = 5.0,
    ) -> None:
        if unpaid_steps < 0 or unpaid_credits < 0:
            raise ValueError("unpaid_steps and unpaid_credits must be >= 0")
        self.identity = identity
        self.account = identity.account
        self.coordinator = coordinator
        self.outbox = outbox
        self.model_key = model_key
        self.block_params = block_params
        self.unpaid_steps = unpaid_steps
        self.unpaid_units = unpaid_credits * WORK_UNITS_PER_CREDIT
        self.balance_ttl = balance_ttl
        self.submit_interval = submit_interval
        self.ledger = LedgerClient(coordinator, timeout=ledger_timeout)
        self._balances: dict[str, tuple[int, float]] = {}  # client -> (balance, when fetched)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ledger_down = False  # the last ledger call failed
        self._ledger_down_until = 0.0  # no admission retries the ledger before this (monotonic) time
        self._thread: threading.Thread | None = None

    def params_per_token(self, start: int, end: int) -> int:
        """Work one token costs through blocks [start, end)."""
        return sum(self.block_params[start:end])

    # --- admission -------------------------------------------------------------------------------------------

    def admit(
        self,
        session_id: str,
        client: str,
        client_key: str,
        start: int,
        end: int,
        tokens: int,
        ledger_open: ledger_pb2.AccountRequest | None = None,
    ) -> PaidSession:
        """Check that `client` can pay for up to `tokens` positions through [start, end); refuse before any work.

        Only the client may read its balance: `ledger_open` is its signed OpenAccount call, which the node
        forwards to the ledger when its cached balance is stale.
        """
        if not client or not client_key:
            raise RequestError(
                grpc.StatusCode.UNAUTHENTICATED,
                f"node {self.account} charges credits: open the session with client_account and client_key "
                "(hivegen's Client and RemoteModelForCausalLM do so with your identity)",
            )
        if not is_account(client):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"client_account {client[:64]!r} is not an account")
        try:
            owner = account_of(client_key)
        except ValueError:
            owner = ""
        if owner != client:
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED, f"client_key does not own client_account {client}")
        params = self.params_per_token(start, end)
        needed = tokens * params
        owed = self.outbox.unsettled_work(client)
        balance, online = self._balance(client, client_key, ledger_open)
        if not online:
            self._admit_offline(client, balance is not None, owed, needed)
        if balance is not None and balance - owed < needed:
            error = InsufficientCredits(client, balance - owed, needed, what="this session may cost up to")
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"InsufficientCredits: {error} ({tokens} positions x {params:,} parameters of blocks {start}:{end})",
                metadata=(
                    ("hivegen-error", INSUFFICIENT_CREDITS),
                    ("hivegen-account", client),
                    ("hivegen-balance", str(balance - owed)),
                    ("hivegen-needed", str(needed)),
                ),
            )
        return PaidSession(session_id, client, client_key, params)

    def _admit_offline(self, client: str, known: bool, owed: int, needed: int) -> None:
        """While the ledger is unreachable: serve only clients seen before, up to the unpaid limit."""
        if not known:
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE,
                f"the coordinator {self.coordinator} is unreachable and this node has not served {client} before; "
                "until it returns, this node serves only clients it knows",
            )
        if owed + needed > self.unpaid_units:
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE,
                f"the coordinator {self.coordinator} is unreachable and {client} already owes this node "
                f"{format_credits(owed)} unsettled credits; this session may add {format_credits(needed)}, over the "
                f"unpaid limit of {format_credits(self.unpaid_units)}",
            )
        logger.info("ledger unreachable; serving known client %s on credit (owes %s)", client, format_credits(owed))

    def _balance(
        self, client: str, client_key: str, ledger_open: ledger_pb2.AccountRequest | None
    ) -> tuple[int | None, bool]:
        """(the client's balance, whether the ledger is reachable). The balance is at most balance_ttl old
        while the ledger answers; while it does not, it is the last one seen (None for a client never seen)."""
        now = time.monotonic()
        with self._lock:
            cached = self._balances.get(client)
            if cached is not None and now - cached[1] < self.balance_ttl and not self._ledger_down:
                return cached[0], True
            retry = now >= self._ledger_down_until
        if retry:
            if ledger_open is None or ledger_open.account != client or ledger_open.auth.public_key != client_key:
                raise RequestError(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"node {self.account} charges credits and only {client} may read its balance: open the session "
                    "with ledger_open, your signed OpenAccount call for this account (hivegen's client sends it)",
                )
            try:
                # Opening is idempotent: a client new to the ledger claims its starter grant now.
                balance = int(self.ledger.forward_open(ledger_open).units)
            except CoordinatorUnreachable:
                self._ledger_reachable(False)
            except GrantProofNeeded as exc:
                self._ledger_reachable(True)
                refusal = f"InsufficientCredits: {exc}"
                metadata = grant_proof_metadata(exc)
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, refusal, metadata=metadata) from exc
            except HivegenError as exc:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, f"cannot check {client}'s balance: {exc}") from exc
            else:
                self._ledger_reachable(True)
                with self._lock:
                    self._balances[client] = (balance, time.monotonic())
                return balance, True
        return (cached[0] if cached is not None else None), False

    def _ledger_reachable(self, reachable: bool) -> None:
        """Note whether the last ledger call got through; while it does not, retry at most every 2 s."""
        with self._lock:
            if reachable and self._ledger_down:
                logger.info("coordinator %s is reachable again", self.coordinator)
            elif not reachable and not self._ledger_down:
                logger.warning("coordinator %s unreachable; receipts wait in the outbox", self.coordinator)
            self._ledger_down = not reachable
            if not reachable:
                self._ledger_down_until = time.monotonic() + 2.0

    # --- receipts --------------------------------------------------------------------------------------------

    def check_receipt(self, session: PaidSession, message: ledger_pb2.Receipt | None, step_id: int) -> None:
        """Verify the receipt sent with step `step_id` (None: none sent) and keep it; refuse if payment lags."""
        lag = step_id - 1 - self.unpaid_steps  # the last step that must be paid for by now
        required = session.step_work[lag] if lag >= 0 else 0
        self._accept(session, message, required, f"step {step_id}")

    def settle(self, session: PaidSession, message: ledger_pb2.Receipt) -> int:
        """Accept the final receipt, which must pay for every step served; return its seq."""
        self._accept(session, message, session.served_work, "settling")
        self._wake.set()
        return session.last_seq

    def _accept(self, session: PaidSession, message: ledger_pb2.Receipt | None, required: int, what: str) -> None:
        if message is not None:
            signed = receipt_from_proto(message)
            try:
                verify_receipt(signed)
            except ForgedReceiptError as exc:
                raise RequestError(grpc.StatusCode.PERMISSION_DENIED, str(exc)) from exc
            r = signed.receipt
            problem = ""
            if r.session_id != session.session_id:
                problem = f"the receipt is for session {r.session_id[:64]}, not {session.session_id}"
            elif (r.client, r.client_key) != (session.client, session.client_key):
                problem = f"the receipt is signed by {r.client}, but session {session.session_id} is {session.client}'s"
            elif r.node != self.account:
                problem = f"the receipt pays {r.node}, not this node ({self.account})"
            elif r.model_key != self.model_key:
                problem = f"the receipt is for model {r.model_key[:64]}, not {self.model_key}"
            elif r.seq <= session.last_seq:
                problem = f"receipt #{r.seq} is not newer than #{session.last_seq}"
            elif r.work < session.paid_work:
                problem = f"receipt #{r.seq} claims work {r.work}, less than the {session.paid_work} already receipted"
            elif r.work > session.served_work:
                problem = f"receipt #{r.seq} claims work {r.work}, more than the {session.served_work} served"
            if problem:
                raise RequestError(grpc.StatusCode.PERMISSION_DENIED, f"receipt rejected: {problem}")
            self.outbox.keep(signed)  # durable before the step it pays for runs
            session.paid_work, session.last_seq = r.work, r.seq
        if session.paid_work < required:
            raise RequestError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{what} needs a receipt for at least {required} work (parameter-tokens served so far, allowing "
                f"{self.unpaid_steps} unpaid steps); the latest receipt pays {session.paid_work}",
            )

    # --- submission ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the submitter; it first submits what a previous run of the node left in the outbox."""
        self._wake.set()
        self._thread = threading.Thread(target=self._submit_loop, daemon=True, name="hivegen-receipts")
        self._thread.start()

    def stop(self, flush_timeout: float = 3.0) -> None:
        """Stop the submitter after one last attempt; unsent receipts stay in the outbox for the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(flush_timeout + self.ledger.timeout)
        self.ledger.close()
        self.outbox.close()

    def pending(self) -> int:
        return self.outbox.pending_count()

    def submit_due(self) -> int:
        """Submit every receipt the ledger has not answered; return how many it answered (0 if unreachable)."""
        due = self.outbox.due()
        if not due:
            return 0
        results = self.ledger.submit(due)
        answers = []
        for signed, result in zip(due, results, strict=True):
            if not result.error:
                outcome = APPLIED
            elif result.error.startswith("insufficient"):
                outcome = INSUFFICIENT
                logger.warning("ledger refused receipt %s#%d: %s", result.session_id, result.seq, result.error)
            elif result.error.startswith("unannounced"):
                outcome = DEFERRED
                logger.warning("ledger deferred receipt %s#%d: %s", result.session_id, result.seq, result.error)
            else:
                outcome = REJECTED
                logger.error("ledger rejected receipt %s#%d: %s", result.session_id, result.seq, result.error)
            answers.append(Answer(signed.receipt.session_id, signed.receipt.seq, signed.receipt.work, outcome))
        self.outbox.record(answers)
        with self._lock:  # the balances changed: fetch them again, but keep knowing these clients
            for signed in due:
                if (cached := self._balances.get(signed.receipt.client)) is not None:
                    self._balances[signed.receipt.client] = (cached[0], float("-inf"))
        return len(answers)

    def _submit_loop(self) -> None:
        delay = self.submit_interval
        while True:
            self._wake.wait(delay)
            self._wake.clear()
            stopping = self._stop.is_set()
            try:
                if self.submit_due():  # 0: nothing was due, so the ledger was not asked
                    self._ledger_reachable(True)
                delay = self.submit_interval
            except CoordinatorUnreachable:
                self._ledger_reachable(False)
                delay = min(max(delay * 2, 0.5), 10.0)
            except Exception:  # a bug or a corrupt row: log it and keep the node serving
                logger.exception("submitting receipts failed")
                delay = 10.0
            if stopping:
                return
