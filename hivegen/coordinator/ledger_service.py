"""The ledger over gRPC: nodes submit receipts, anyone reads balances, history and the leaderboard."""

from __future__ import annotations

import logging

import grpc

from hivegen.credits.ledger import Ledger
from hivegen.credits.receipts import Receipt, SignedReceipt
from hivegen.errors import ForgedReceiptError, InsufficientCredits, JournalError
from hivegen.proto import ledger_pb2, ledger_pb2_grpc

logger = logging.getLogger(__name__)
MAX_RECEIPTS_PER_CALL = 1000
MAX_HISTORY = 1000


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
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def Submit(self, request: ledger_pb2.SubmitRequest, context: grpc.ServicerContext) -> ledger_pb2.SubmitResponse:
        if len(request.receipts) > MAX_RECEIPTS_PER_CALL:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_RECEIPTS_PER_CALL} receipts per call")
        results = []
        for message in request.receipts:
            result = ledger_pb2.SubmitResult(session_id=message.session_id, seq=message.seq)
            try:
                result.transferred = self.ledger.apply_receipt(receipt_from_proto(message))
            except ForgedReceiptError as exc:
                logger.info("refused a forged receipt for session %s: %s", message.session_id, exc)
                result.error = f"forged: {exc.reason}: {exc}"
            except InsufficientCredits as exc:
                result.error = f"insufficient: {exc}"
            results.append(result)
        return ledger_pb2.SubmitResponse(results=results)

    def GetBalance(self, request: ledger_pb2.AccountRequest, context: grpc.ServicerContext) -> ledger_pb2.Balance:
        known = self.ledger.has_account(request.account)
        return ledger_pb2.Balance(account=request.account, balance=self.ledger.balance(request.account), known=known)

    def OpenAccount(self, request: ledger_pb2.AccountRequest, context: grpc.ServicerContext) -> ledger_pb2.Balance:
        balance = self.ledger.ensure_account(request.account, request.public_key or None)
        return ledger_pb2.Balance(account=request.account, balance=balance, known=True)

    def History(self, request: ledger_pb2.HistoryRequest, context: grpc.ServicerContext) -> ledger_pb2.HistoryResponse:
        limit = min(request.limit or 50, MAX_HISTORY)
        entries = [
            ledger_pb2.JournalEntry(
                row=e.row,
                at=e.at,
                kind=e.kind,
                src=e.src,
                dst=e.dst,
                amount=e.amount,
                session_id=e.session_id or "",
                seq=e.seq or 0,
                hash=e.hash,
            )
            for e in self.ledger.history(request.account or None, limit)
        ]
        return ledger_pb2.HistoryResponse(entries=entries)

    def Top(self, request: ledger_pb2.TopRequest, context: grpc.ServicerContext) -> ledger_pb2.TopResponse:
        top = self.ledger.top(min(request.limit or 10, MAX_HISTORY))
        return ledger_pb2.TopResponse(entries=[ledger_pb2.TopEntry(account=a, earned=e) for a, e in top])

    def VerifyJournal(
        self, request: ledger_pb2.VerifyRequest, context: grpc.ServicerContext
    ) -> ledger_pb2.VerifyResponse:
        try:
            self.ledger.verify_journal()
        except JournalError as exc:
            return ledger_pb2.VerifyResponse(ok=False, bad_row=exc.row, message=str(exc))
        return ledger_pb2.VerifyResponse(ok=True, message="journal intact")
