"""DHT keys and owner-signed record schemas; announce a node's span and look up who serves which blocks."""

from hivegen.dht.announce import Announcer, announce_span, withdraw_span
from hivegen.dht.lookup import fetch_spans, missing_blocks
from hivegen.dht.models import ModelInfo, announce_model, fetch_models
from hivegen.dht.records import SpanRecord, block_key
from hivegen.dht.signing import OwnerSignatureValidator, owned_subkey, owner_of, sign_value, verify_value
from hivegen.dht.swarm import SwarmError, node_id, start_dht, visible_maddrs

__all__ = [
    "Announcer",
    "ModelInfo",
    "OwnerSignatureValidator",
    "SpanRecord",
    "SwarmError",
    "announce_model",
    "announce_span",
    "block_key",
    "fetch_models",
    "fetch_spans",
    "missing_blocks",
    "node_id",
    "owned_subkey",
    "owner_of",
    "sign_value",
    "start_dht",
    "verify_value",
    "visible_maddrs",
    "withdraw_span",
]
