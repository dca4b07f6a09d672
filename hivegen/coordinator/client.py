"""Talk to a coordinator's ledger: balances, history, leaderboard, journal check, receipt submission."""

from __future__ import annotations

import grpc

from hivegen.credits.receipts import SignedReceipt
from hivegen.errors import HivegenError
from hivegen.proto import ledger_pb2, ledger_pb2_grpc
from hivegen.proto.options import grpc_options


class CoordinatorUnreachable(HivegenError):
    """The coordinator did not answer."""


class LedgerClient:
    def __init__(self, address: str, timeout: float = 10.0) -> None:
        self.address = address
        self.timeout = timeout
        # Reconnect quickly once a restarted coordinator listens again (gRPC's default backoff reaches 120 s).
        options = [*grpc_options(), ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)]
        self._channel = grpc.insecure_channel(address, options=options)
        self._stub = ledger_pb2_grpc.LedgerStub(self._channel)

    def balance(self, account: str) -> ledger_pb2.Balance:
        return self._call(self._stub.GetBalance, ledger_pb2.AccountRequest(account=account))

    def open_account(self, account: str, public_key: str = "") -> ledger_pb2.Balance:
        return self._call(self._stub.OpenAccount, ledger_pb2.AccountRequest(account=account, public_key=public_key))

    def history(self, account: str = "", limit: int = 50) -> list[ledger_pb2.JournalEntry]:
        return list(self._call(self._stub.History, ledger_pb2.HistoryRequest(account=account, limit=limit)).entries)

    def top(self, limit: int = 10) -> list[ledger_pb2.TopEntry]:
        return list(self._call(self._stub.Top, ledger_pb2.TopRequest(limit=limit)).entries)

    def verify_journal(self) -> ledger_pb2.VerifyResponse:
        return self._call(self._stub.VerifyJournal, ledger_pb2.VerifyRequest())

    def submit(self, receipts: list[SignedReceipt]) -> list[ledger_pb2.SubmitResult]:
        from hivegen.coordinator.ledger_service import receipt_to_proto

        request = ledger_pb2.SubmitRequest(receipts=[receipt_to_proto(r) for r in receipts])
        return list(self._call(self._stub.Submit, request).results)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> LedgerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method, request):  # type: ignore[no-untyped-def]
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
            if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                raise CoordinatorUnreachable(
                    f"coordinator {self.address} is unreachable ({code}); check --coordinator or start one with "
                    "`hivegen coordinator serve`"
                ) from exc
            raise HivegenError(f"coordinator {self.address} answered {code}: {exc.details()}") from exc
