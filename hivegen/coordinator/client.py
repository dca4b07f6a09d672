"""Talk to a coordinator: its ledger (balances, history, leaderboard, journal check, receipt submission) and its
reports of lying nodes."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import grpc

from hivegen.credits.auth import sign_call
from hivegen.credits.receipts import GRANT_PROOF_NEEDED, SignedReceipt
from hivegen.errors import GrantProofNeeded, HivegenError
from hivegen.proto import ledger_pb2, ledger_pb2_grpc, reports_pb2, reports_pb2_grpc
from hivegen.proto.options import grpc_options

if TYPE_CHECKING:
    from hivegen.credits.identity import Identity

logger = logging.getLogger(__name__)
GRANT_PROOF_TIMEOUT_S = 600.0


class CoordinatorUnreachable(HivegenError):
    """The coordinator did not answer."""


def open_request(identity: Identity, grant_proof: int | None = None) -> ledger_pb2.AccountRequest:
    """A signed OpenAccount call for the identity's own account (sent directly, or through a node)."""
    proof = grant_proof or 0
    auth = sign_call(identity, "OpenAccount", {"grant_proof": proof})
    return ledger_pb2.AccountRequest(account=identity.account, auth=auth, grant_proof=proof)


def grant_proof_needed(metadata: object) -> GrantProofNeeded | None:
    """The GrantProofNeeded that trailing metadata describes (from the ledger or a node), or None."""
    meta = {key: value for key, value in metadata or ()}  # type: ignore[attr-defined]
    if meta.get("hivegen-error") != GRANT_PROOF_NEEDED:
        return None
    try:
        units, bits = int(meta["hivegen-grant-units"]), int(meta["hivegen-grant-bits"])
        return GrantProofNeeded(str(meta.get("hivegen-account", "?")), units, bits, str(meta["hivegen-grant-salt"]))
    except (KeyError, ValueError):
        return None


def prove_grant(need: GrantProofNeeded, identity: Identity, timeout: float = GRANT_PROOF_TIMEOUT_S) -> int:
    """Solve the proof of work `need` describes for the identity's key; raise `need` if none is found in time."""
    from hivegen.credits.grants import ProofTimeout, solve_proof
    from hivegen.credits.units import format_credits

    logger.warning(
        "claiming the starter grant of %s credits: solving a %d-bit proof of work (once per account)...",
        format_credits(need.grant_units), need.bits,
    )  # fmt: skip
    began = time.perf_counter()
    try:
        proof = solve_proof(need.salt, identity.public_key_hex, need.bits, timeout)
    except ProofTimeout as exc:
        raise need from exc
    logger.warning("proof of work found in %.1f s", time.perf_counter() - began)
    return proof


def open_account(ledger: LedgerClient, identity: Identity) -> int:
    """Open the identity's account, solving the starter grant's proof of work if the ledger asks; return the
    balance in work units."""
    try:
        return int(ledger.open_account(identity).units)
    except GrantProofNeeded as need:
        return int(ledger.open_account(identity, prove_grant(need, identity)).units)


class LedgerClient:
    """The ledger's calls; those that reveal or change an account are signed by `identity`'s key for it."""

    def __init__(self, address: str, timeout: float = 10.0) -> None:
        self.address = address
        self.timeout = timeout
        # Reconnect quickly once a restarted coordinator listens again (gRPC's default backoff reaches 120 s).
        options = [*grpc_options(), ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)]
        self._channel = grpc.insecure_channel(address, options=options)
        self._stub = ledger_pb2_grpc.LedgerStub(self._channel)

    def balance(self, identity: Identity) -> ledger_pb2.Balance:
        """The identity's own balance (in work units)."""
        request = ledger_pb2.AccountRequest(account=identity.account, auth=sign_call(identity, "GetBalance"))
        return self._call(self._stub.GetBalance, request)

    def open_account(self, identity: Identity, grant_proof: int | None = None) -> ledger_pb2.Balance:
        """Open the identity's account (claiming the starter grant with `grant_proof`); GrantProofNeeded when the
        ledger wants a proof of work first."""
        return self.forward_open(open_request(identity, grant_proof))

    def forward_open(self, request: ledger_pb2.AccountRequest) -> ledger_pb2.Balance:
        """Send an OpenAccount call signed by someone else (a node forwards its client's)."""
        return self._call(self._stub.OpenAccount, request)

    def history(self, identity: Identity, limit: int = 50) -> list[ledger_pb2.JournalEntry]:
        """The identity's own journal entries, newest first."""
        auth = sign_call(identity, "History", {"limit": limit})
        request = ledger_pb2.HistoryRequest(account=identity.account, limit=limit, auth=auth)
        return list(self._call(self._stub.History, request).entries)

    def grant_policy(self) -> ledger_pb2.GrantPolicy:
        return self._call(self._stub.GetGrantPolicy, ledger_pb2.GrantPolicyRequest())

    def info(self) -> ledger_pb2.CoordinatorInfo:
        """Where the coordinator's status page is, and its version."""
        return self._call(self._stub.GetInfo, ledger_pb2.CoordinatorInfoRequest())

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
            code = _raise_if_unreachable(exc, self.address)
            need = grant_proof_needed(exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None)
            if need is not None:
                raise need from exc
            raise HivegenError(f"coordinator {self.address} answered {code}: {exc.details()}") from exc


def report_node(
    coordinator_address: str, identity: Identity, evidence: reports_pb2.Evidence, timeout: float = 10.0
) -> reports_pb2.ReportAck:
    """Sign `evidence` as `identity` and send it to the coordinator; return its acknowledgement.

    Raises CoordinatorUnreachable when no coordinator answers, and ReportRejected (with the coordinator's reason)
    when it refuses the report.
    """
    # Imported here: the checks need torch, which the ledger's users (the credits CLI) do not otherwise load.
    from hivegen.coordinator.reports import ReportRejected, sign_report

    report = sign_report(identity, evidence.SerializeToString())
    with grpc.insecure_channel(coordinator_address, options=grpc_options()) as channel:
        try:
            return reports_pb2_grpc.ReportsStub(channel).ReportNode(report, timeout=timeout)
        except grpc.RpcError as exc:
            code = _raise_if_unreachable(exc, coordinator_address)
            trailers = dict(exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else {}
            reason = trailers.get("hivegen-reason", "")
            details = exc.details() if hasattr(exc, "details") else str(exc)
            if reason in ReportRejected.STATUS:
                raise ReportRejected(reason, details.removeprefix(f"report rejected ({reason}): ")) from exc
            raise HivegenError(f"coordinator {coordinator_address} answered {code}: {details}") from exc


def _raise_if_unreachable(error: grpc.RpcError, address: str) -> str:
    """Raise CoordinatorUnreachable if `error` says nobody answered; else return its status code's name."""
    code = error.code().name if hasattr(error, "code") else "UNKNOWN"
    if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        raise CoordinatorUnreachable(
            f"coordinator {address} is unreachable ({code}); check --coordinator or start one with "
            "`hivegen coordinator serve`"
        ) from error
    return str(code)
