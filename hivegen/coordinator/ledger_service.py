"""The ledger over gRPC: nodes submit receipts for work they served; an account's owner reads its balance and
history with signed calls; anyone reads the leaderboard, the grant policy and the journal's checked head."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc

from hivegen import __version__
from hivegen.credits.auth import CallRefused, check_call
from hivegen.credits.ledger import Ledger
from hivegen.credits.receipts import GRANT_PROOF_NEEDED, Receipt, SignedReceipt
from hivegen.errors import ForgedReceiptError, GrantProofNeeded, InsufficientCredits, JournalError
from hivegen.proto import ledger_pb2, ledger_pb2_grpc

logger = logging.getLogger(__name__)
MAX_RECEIPTS_PER_CALL = 1000
MAX_HISTORY = 1000
VERIFY_INTERVAL_S = 60.0
"""The journal's full check runs at most this often; callers in between get the latest outcome."""

IsServing = Callable[[str, str], bool]
"""(model_key, account) -> whether the account owns a node announced for the model (hivegen.coordinator.serving)."""


def receipt_to_proto(signed: SignedReceipt) -> ledger_pb2.Receipt:
    r = signed.receipt
    return ledger_pb2.Receipt(
        session_id=r.session_id,
        client=r.client,
        client_key=r.client_key,
        node=r.node,
        model_key=r.model_key,
        seq=r.seq,
        work=r.work,
        signature=signed.signature,
    )


def receipt_from_proto(message: ledger_pb2.Receipt) -> SignedReceipt:
    receipt = Receipt(
        session_id=message.session_id,
        client=message.client,
        client_key=message.client_key,
        node=message.node,
        model_key=message.model_key,
        seq=message.seq,
        work=message.work,
    )
    return SignedReceipt(receipt=receipt, signature=message.signature)


class LedgerServicer(ledger_pb2_grpc.LedgerServicer):
    """`serving` says which accounts may be paid for work on a model: receipts paying any other account are
    refused ("unannounced"), so credits only move to accounts that run nodes (None: no such rule)."""

    def __init__(self, ledger: Ledger, serving: IsServing | None = None) -> None:
        self.ledger = ledger
        self.serving = serving
        self.status_url = ""  # set once the coordinator's HTTP face is up
        self._verified: ledger_pb2.VerifyResponse | None = None
        self._verify_lock = threading.Lock()

    def Submit(self, request: ledger_pb2.SubmitRequest, context: grpc.ServicerContext) -> ledger_pb2.SubmitResponse:
        if len(request.receipts) > MAX_RECEIPTS_PER_CALL:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_RECEIPTS_PER_CALL} receipts per call")
        results = []
        for message in request.receipts:
            result = ledger_pb2.SubmitResult(session_id=message.session_id, seq=message.seq)
            try:
                signed = receipt_from_proto(message)
                self._check_payee(signed.receipt)
                result.transferred_units = self.ledger.apply_receipt(signed)
            except ForgedReceiptError as exc:
                logger.info("refused a forged receipt for session %s: %s", message.session_id[:64], exc)
                result.error = f"forged: {exc.reason}: {exc}"
            except InsufficientCredits as exc:
                result.error = f"insufficient: {exc}"
            except Unannounced as exc:
                result.error = f"unannounced: {exc}"
            results.append(result)
        return ledger_pb2.SubmitResponse(results=results)

    def GetBalance(self, request: ledger_pb2.AccountRequest, context: grpc.ServicerContext) -> ledger_pb2.Balance:
        self._authenticate(context, "GetBalance", request.auth, request.account, {})
        known = self.ledger.has_account(request.account)
        return ledger_pb2.Balance(account=request.account, units=self.ledger.balance(request.account), known=known)

    def OpenAccount(self, request: ledger_pb2.AccountRequest, context: grpc.ServicerContext) -> ledger_pb2.Balance:
        args = {"grant_proof": request.grant_proof}
        self._authenticate(context, "OpenAccount", request.auth, request.account, args)
        try:
            units = self.ledger.open_account(request.account, request.auth.public_key, request.grant_proof or None)
        except GrantProofNeeded as exc:
            context.set_trailing_metadata(grant_proof_metadata(exc))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return ledger_pb2.Balance(account=request.account, units=units, known=True)

    def History(self, request: ledger_pb2.HistoryRequest, context: grpc.ServicerContext) -> ledger_pb2.HistoryResponse:
        self._authenticate(context, "History", request.auth, request.account, {"limit": request.limit})
        limit = min(request.limit or 50, MAX_HISTORY)
        entries = [
            ledger_pb2.JournalEntry(
                row=e.row,
                at=e.at,
                kind=e.kind,
                src=e.src,
                dst=e.dst,
                units=e.amount,
                session_id=e.session_id or "",
                seq=e.seq or 0,
                hash=e.hash,
            )
            for e in self.ledger.history(request.account, limit)
        ]
        return ledger_pb2.HistoryResponse(entries=entries)

    def Top(self, request: ledger_pb2.TopRequest, context: grpc.ServicerContext) -> ledger_pb2.TopResponse:
        top = self.ledger.top(min(request.limit or 10, MAX_HISTORY))
        return ledger_pb2.TopResponse(entries=[ledger_pb2.TopEntry(account=a, earned_units=e) for a, e in top])

    def VerifyJournal(
        self, request: ledger_pb2.VerifyRequest, context: grpc.ServicerContext
    ) -> ledger_pb2.VerifyResponse:
        """The latest full check of the journal; a new one runs only if the last is VERIFY_INTERVAL_S old."""
        with self._verify_lock:  # concurrent callers wait for one check instead of each running their own
            last = self._verified
            if last is None or time.time() - last.checked_at >= VERIFY_INTERVAL_S:
                last = self._verified = self._verify()
            return last

    def GetGrantPolicy(
        self, request: ledger_pb2.GrantPolicyRequest, context: grpc.ServicerContext
    ) -> ledger_pb2.GrantPolicy:
        policy = self.ledger.grant_policy
        return ledger_pb2.GrantPolicy(grant_units=policy.grant_units, proof_bits=policy.bits, salt=policy.salt)

    def GetInfo(
        self, request: ledger_pb2.CoordinatorInfoRequest, context: grpc.ServicerContext
    ) -> ledger_pb2.CoordinatorInfo:
        return ledger_pb2.CoordinatorInfo(status_url=self.status_url, version=__version__)

    def _verify(self) -> ledger_pb2.VerifyResponse:
        now = time.time()
        try:
            rows, head = self.ledger.verify_journal()
        except JournalError as exc:
            return ledger_pb2.VerifyResponse(ok=False, bad_row=exc.row, message=str(exc), checked_at=now)
        return ledger_pb2.VerifyResponse(ok=True, message="journal intact", rows=rows, head_hash=head, checked_at=now)

    def _authenticate(
        self, context: grpc.ServicerContext, method: str, auth: ledger_pb2.CallAuth, account: str, args: dict
    ) -> None:
        """Abort with PERMISSION_DENIED (naming what was wrong) unless the account's owner signed this call now."""
        now = time.time()
        try:
            check_call(method, auth, account, args, now)
            self.ledger.use_nonce(auth.nonce, now)
        except CallRefused as exc:
            logger.info("refused an unauthenticated ledger call: %s", exc)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))

    def _check_payee(self, receipt: Receipt) -> None:
        """Raise Unannounced unless the paid account owns a node announced for the receipt's model."""
        if self.serving is not None and not self.serving(receipt.model_key, receipt.node):
            raise Unannounced(
                f"{receipt.node} owns no node announced in the swarm for model {receipt.model_key[:64]}; receipts "
                "pay only accounts that serve (a node submits while it is announced, and retries later)"
            )


class Unannounced(Exception):
    """A receipt pays an account that runs no announced node for its model."""


def grant_proof_metadata(exc: GrantProofNeeded) -> tuple[tuple[str, str], ...]:
    """The trailing metadata that carries a grant's policy to the client (through a node, too)."""
    return (
        ("hivegen-error", GRANT_PROOF_NEEDED),
        ("hivegen-account", exc.account),
        ("hivegen-grant-units", str(exc.grant_units)),
        ("hivegen-grant-bits", str(exc.bits)),
        ("hivegen-grant-salt", exc.salt),
    )
