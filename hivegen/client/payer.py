"""The client's side of credits: who pays, what a block costs, and the receipts it signs for nodes."""

from __future__ import annotations

import threading
from pathlib import Path

from hivegen.coordinator.client import open_request, prove_grant
from hivegen.coordinator.ledger_service import receipt_to_proto
from hivegen.credits.identity import Identity
from hivegen.credits.receipts import Receipt, sign_receipt
from hivegen.errors import GrantProofNeeded
from hivegen.proto import ledger_pb2


class Payer:
    """Signs receipts with one identity, loaded (or created) only when a session first needs it.

    `block_params[i]` is the parameter count of block i, counted locally from the checkpoint: the client
    never takes a node's word for what its work is worth.
    """

    def __init__(self, model_key: str, block_params: list[int], identity: Identity | str | Path | None = None) -> None:
        self.model_key = model_key
        self.block_params = block_params
        self._identity = identity if isinstance(identity, Identity) else None
        self._identity_path = None if isinstance(identity, Identity) or identity is None else Path(identity)
        self._lock = threading.Lock()
        self._grant_lock = threading.Lock()  # one proof of work at a time, however many sessions ask
        self._grant_proof: tuple[str, int] | None = None  # (ledger salt, proof) once solved

    @property
    def identity(self) -> Identity:
        with self._lock:
            if self._identity is None:
                self._identity = Identity.load_or_create(self._identity_path)
            return self._identity

    def params_per_token(self, start: int, end: int) -> int:
        """Work of one token through blocks [start, end)."""
        return sum(self.block_params[start:end])

    def receipt(self, session_id: str, node: str, seq: int, work: int) -> ledger_pb2.Receipt:
        """A signed receipt for `work` parameter-tokens done by `node` in `session_id` so far."""
        me = self.identity
        receipt = Receipt(session_id, me.account, me.public_key_hex, node, self.model_key, seq, work)
        return receipt_to_proto(sign_receipt(me, receipt))

    def open_request(self) -> ledger_pb2.AccountRequest:
        """A fresh signed OpenAccount call, for a node that charges to forward to the ledger (with the starter
        grant's proof of work once it is solved)."""
        proof = self._grant_proof
        return open_request(self.identity, proof[1] if proof else None)

    def prove_grant(self, need: GrantProofNeeded) -> None:
        """Solve the proof of work a new account's starter grant asks for (once per ledger); the next
        open_request carries it. Raises `need` if no proof is found in time."""
        with self._grant_lock:
            if self._grant_proof is not None and self._grant_proof[0] == need.salt:
                return  # another session solved it meanwhile
            self._grant_proof = (need.salt, prove_grant(need, self.identity))
