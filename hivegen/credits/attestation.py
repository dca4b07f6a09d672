"""Step attestations: a node's signed statement of what it computed in one step of a session.

A node signs every answer: for session S, step k, blocks [start, end) of a model, "given inputs with digest
D_in I returned hidden states with digest D_out". Digests are taken over the exact wire tensors (dtype,
shape, bytes), so the client checks them against what it sent and what it received. When re-execution on
other nodes proves an answer wrong, the signed claims plus the tensors they name are evidence that anyone
holding the model's blocks can check (see hivegen.client.verify and hivegen.coordinator.reports).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import asdict, dataclass

from hivegen.credits.identity import PUBLIC_KEY_PATTERN, Identity, verify_signature
from hivegen.proto import node_pb2
from hivegen.store.encoding import canonical_bytes

CLAIM_KIND = "hivegen.step"
CLAIM_VERSION = 1


def tensor_digest(message: node_pb2.Tensor) -> str:
    """SHA-256 (hex) of a wire tensor: its dtype name, shape and raw bytes, unambiguously framed."""
    h = hashlib.sha256()
    dtype = message.dtype.encode()
    h.update(struct.pack("<I", len(dtype)) + dtype)
    h.update(struct.pack("<I", len(message.shape)) + struct.pack(f"<{len(message.shape)}q", *message.shape))
    h.update(struct.pack("<Q", len(message.data)))
    h.update(message.data)
    return h.hexdigest()


def step_input_digest(step: node_pb2.Step) -> str:
    """SHA-256 (hex) of a step's inputs: hidden states, position ids and padding mask, in that order."""
    parts = (tensor_digest(step.hidden_states), tensor_digest(step.position_ids), tensor_digest(step.attention_mask))
    return hashlib.sha256("".join(parts).encode()).hexdigest()


@dataclass(frozen=True)
class StepClaim:
    """What a node states about one step it served."""

    model_key: str
    session_id: str
    step: int
    start: int  # the blocks run: [start, end)
    end: int
    input_digest: str  # step_input_digest of the step as the node received it
    output_digest: str  # tensor_digest of the hidden states the node returned

    def payload(self) -> bytes:
        """The signed bytes: canonical JSON, tagged so that no other signed message can match them."""
        return canonical_bytes({"kind": CLAIM_KIND, "v": CLAIM_VERSION, **asdict(self)})


def sign_claim(identity: Identity, claim: StepClaim) -> str:
    """The node's hex Ed25519 signature of `claim`."""
    return identity.sign(claim.payload()).hex()


def verify_claim(public_key_hex: str, claim: StepClaim, signature: str) -> bool:
    """Whether `signature` (hex) is the key's signature of `claim`; malformed keys or signatures are invalid."""
    if not PUBLIC_KEY_PATTERN.fullmatch(public_key_hex or ""):
        return False
    try:
        raw = bytes.fromhex(signature)
    except (ValueError, TypeError):
        return False
    return len(raw) == 64 and verify_signature(public_key_hex, raw, claim.payload())
