"""Step attestations: a node's signed statement of what it computed in one step of a session.

A node signs every answer: for session S, step k, blocks [start, end) of a model, "given inputs with digest
D_in, after a session whose inputs so far chain to digest H, I returned hidden states with digest D_out".
Digests are taken over the exact wire tensors (dtype, shape, bytes), so the client checks them against what it
sent and what it received. The chained history binds a step's answer to every input before it: steps from two
runs of a session id cannot be spliced into a history the node never saw. When re-execution on
other nodes proves an answer wrong, the signed claims plus the tensors they name are evidence that anyone
holding the model's blocks can check (see hivegen.client.verify and hivegen.coordinator.reports).
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import asdict, dataclass

import torch

from hivegen.credits.identity import PUBLIC_KEY_PATTERN, Identity, verify_signature
from hivegen.proto import node_pb2
from hivegen.store.encoding import canonical_bytes

CLAIM_KIND = "hivegen.step"

# How far two honest runs of the same blocks on the same inputs may differ, as the largest relative L2 error per
# position (relative_errors), per dtype: at least 3x the largest gap between a prefill and step-by-step decoding
# measured over Llama, Mistral, Qwen2/3, Gemma 3 and SmolLM2 on CPU (3e-6, 3.3e-3, 2.4e-2). Clients compare within
# these; the coordinator accepts no accusation made with a tighter one.
TOLERANCES: dict[str, float] = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 8e-2}


def tolerance_for(dtype: str) -> float:
    """The tolerance for `dtype`; the loosest one for a dtype the table does not know."""
    return TOLERANCES.get(dtype, max(TOLERANCES.values()))


def relative_errors(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per position [batch, positions]: ||a - b|| / max(||a||, ||b||) over the hidden size, in float32. Symmetric,
    so it does not matter which side is "expected"; 0 where `mask` is 0 (padding is never used); inf where
    either side is not finite."""
    x, y = a.float(), b.float()
    err = (x - y).norm(dim=-1) / torch.maximum(x.norm(dim=-1), y.norm(dim=-1)).clamp_min(1e-6)
    err = torch.nan_to_num(err, nan=math.inf)
    return torch.where(mask.to(torch.bool), err, torch.zeros_like(err))


CLAIM_VERSION = 2


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


def chain_digest(previous: str, input_digest: str) -> str:
    """The history digest after a step: SHA-256 of the previous one ("" before step 0) and the step's inputs."""
    return hashlib.sha256(f"{previous}:{input_digest}".encode()).hexdigest()


def history_digests(input_digests: list[str]) -> list[str]:
    """The history digest after each step of a session whose steps had these input digests."""
    chain, out = "", []
    for digest in input_digests:
        chain = chain_digest(chain, digest)
        out.append(chain)
    return out


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
    history_digest: str  # chain_digest over the input digests of steps 0..step of the session

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
