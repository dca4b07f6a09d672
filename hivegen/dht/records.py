"""DHT keys and the typed record a node announces for its span of blocks."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from hivegen.dht.signing import split_owned

STATES = ("online", "offline")
DTYPES = ("float32", "float16", "bfloat16")  # what blocks may run in: hidden states are floating point
# The peer-id part of a node id: base58 in practice; it only tells one owner's nodes apart (the key is what counts).
_PEER_PART = re.compile(r"^[A-Za-z0-9]{1,128}$")
# Strangers write these strings and the status page and CLI show them: short, printable ASCII, no spaces.
MAX_ADDRESS_CHARS = 262  # "host:port": a DNS name is at most 253 characters, a port 5
MAX_VERSION_CHARS = 64
_ADDRESS = re.compile(rf"^[\x21-\x7e]{{3,{MAX_ADDRESS_CHARS}}}$")
_VERSION = re.compile(rf"^[\x21-\x7e]{{0,{MAX_VERSION_CHARS}}}$")


def block_key(model_key: str, block: int) -> str:
    """The DHT key under which every node serving `block` of `model_key` announces itself."""
    return f"{model_key}.block.{block}"


MAX_COUNT = 1 << 48  # bound on the counts a record may claim


@dataclass(frozen=True)
class SpanRecord:
    """What one node serves and how fast; stored under every block key of its span, subkey = node_id."""

    node_id: str  # "<peer id base58>@<owner's Ed25519 public key hex>"; the DHT subkey, so not part of to_dict()
    address: str  # gRPC endpoint clients connect to, "host:port"
    start: int  # first block served (inclusive)
    end: int  # block after the last one served (exclusive); start < end
    throughput: float  # decode steps per second over the whole span at batch 1; > 0
    cache_tokens_free: int  # KV-cache tokens the node can still give to new sessions; >= 0
    dtype: str  # dtype the blocks run in and tensors travel as, e.g. "float32"
    version: str  # hivegen version of the node, so clients can skip incompatible ones
    state: str = "online"  # "online" while serving; "offline" once withdrawn
    active_sessions: int = 0  # sessions open on the node now (its load); 0 in records of older nodes
    cache_tokens_total: int = 0  # the node's whole KV-cache budget; 0: not said (older nodes)
    updated_at: float = 0.0  # DHT time at which the node announced this record; 0: not said

    def __post_init__(self) -> None:
        _check_node_id(self.node_id)
        _check_address(self.address)
        if self.start < 0:
            raise ValueError(f"span record has negative start {self.start}")
        if self.start >= self.end:
            raise ValueError(f"span record has start {self.start} >= end {self.end}")
        if not (math.isfinite(self.throughput) and self.throughput > 0):
            raise ValueError(f"span record has throughput {self.throughput}; it must be a positive number")
        if self.cache_tokens_free < 0:
            raise ValueError(f"span record has negative cache_tokens_free {self.cache_tokens_free}")
        if not isinstance(self.version, str) or not _VERSION.fullmatch(self.version):
            raise ValueError(
                f"span record version {str(self.version)[:80]!r} is not printable ASCII of at most {MAX_VERSION_CHARS} "
                "characters"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"span record has dtype {self.dtype!r}; blocks run in one of {DTYPES}")
        if self.state not in STATES:
            raise ValueError(f"span record has unknown state {self.state!r}; expected one of {STATES}")
        if not 0 <= self.active_sessions <= MAX_COUNT or not 0 <= self.cache_tokens_total <= MAX_COUNT:
            raise ValueError("span record has active_sessions or cache_tokens_total outside 0..2**48")
        if not (math.isfinite(self.updated_at) and self.updated_at >= 0):
            raise ValueError(f"span record has updated_at {self.updated_at}; it must be a time >= 0")

    @property
    def owner(self) -> str:
        """The Ed25519 public key (hex) that owns this record: only its holder can announce or withdraw it."""
        return self.node_id.rpartition("@")[2]

    @property
    def online(self) -> bool:
        """True while the node serves its span."""
        return self.state == "online"

    def to_dict(self) -> dict[str, Any]:
        """The msgpack-friendly DHT value (node_id travels as the subkey)."""
        return {
            "address": self.address,
            "start": self.start,
            "end": self.end,
            "throughput": float(self.throughput),
            "cache_tokens_free": self.cache_tokens_free,
            "dtype": self.dtype,
            "version": self.version,
            "state": self.state,
            "active_sessions": self.active_sessions,
            "cache_tokens_total": self.cache_tokens_total,
            "updated_at": float(self.updated_at),
        }

    @classmethod
    def from_dict(cls, node_id: str, data: object) -> SpanRecord:
        """Parse a DHT value; raise ValueError naming what is wrong. Unknown extra fields are ignored."""
        if not isinstance(node_id, str):
            raise ValueError(f"span record node_id must be a string, got {type(node_id).__name__}")
        if not isinstance(data, dict):
            raise ValueError(f"span record must be a dict, got {type(data).__name__}")
        return cls(
            node_id=node_id,
            address=_field(data, "address", str),
            start=_field(data, "start", int),
            end=_field(data, "end", int),
            throughput=float(_field(data, "throughput", float)),
            cache_tokens_free=_field(data, "cache_tokens_free", int),
            dtype=_field(data, "dtype", str),
            version=_field(data, "version", str),
            state=_field(data, "state", str, default="online"),
            active_sessions=_field(data, "active_sessions", int, default=0),
            cache_tokens_total=_field(data, "cache_tokens_total", int, default=0),
            updated_at=float(_field(data, "updated_at", float, default=0.0)),
        )


_MISSING = object()


def _field(data: dict[Any, Any], name: str, kind: type, default: Any = _MISSING) -> Any:
    """Read one field, checking its type (an int is accepted for a float; a bool never counts as a number)."""
    if name not in data:
        if default is _MISSING:
            raise ValueError(f"span record is missing field {name!r}")
        return default
    value = data[name]
    accepted: tuple[type, ...] = (int, float) if kind is float else (kind,)
    if isinstance(value, bool) or not isinstance(value, accepted):
        raise ValueError(f"span record field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _check_node_id(node_id: object) -> None:
    """Reject anything that is not "<peer id>@<64 lowercase hex public key>"."""
    parts = split_owned(node_id)
    if parts is None or not _PEER_PART.fullmatch(parts[0]):
        raise ValueError(
            f"span record node_id {str(node_id)[:200]!r} is not '<peer id>@<64 hex public key>'; "
            "build it with hivegen.dht.node_id"
        )


def _check_address(address: str) -> None:
    """Reject anything that is not "host:port" with a port in 1..65535, in printable ASCII of bounded length."""
    if not isinstance(address, str) or not _ADDRESS.fullmatch(address):
        raise ValueError(
            f"span record address {str(address)[:80]!r} is not host:port in printable ASCII of at most "
            f"{MAX_ADDRESS_CHARS} characters"
        )
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"span record address {address!r} is not host:port")
