"""Canonical JSON and the object envelope: the same value gives the same bytes, and so the same ref, on any machine."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hivegen.errors import HivegenError

REF_PATTERN = re.compile(r"^[0-9a-f]{64}$")
KIND_PATTERN = re.compile(r"^[a-z][a-z0-9_.-]*$")
ENVELOPE_KEYS = frozenset({"kind", "v", "links", "data"})
_ALLOWED = "only dict (str keys), list, tuple, str, int, float, bool and None can be stored"


class StoreError(HivegenError):
    """Base class of the content-addressed store's errors (re-exported by hivegen.store.backend)."""


class EncodingError(StoreError):
    """A value cannot be canonically encoded, or stored bytes are not a well-formed canonical object."""


@dataclass(frozen=True)
class StoredObject:
    """A decoded object: a typed, versioned record plus the refs of the objects it points to."""

    kind: str
    version: int
    data: dict[str, Any]
    links: tuple[str, ...]


def ref_of(data: bytes) -> str:
    """The ref of some bytes: their SHA-256 as 64 lowercase hex characters."""
    return hashlib.sha256(data).hexdigest()


def is_ref(s: str) -> bool:
    """Whether `s` is a well-formed ref (64 lowercase hex characters)."""
    return isinstance(s, str) and REF_PATTERN.fullmatch(s) is not None


def canonical_bytes(value: Any) -> bytes:
    """Encode `value` as canonical JSON (sorted keys, no spaces, UTF-8); reject anything without one exact encoding."""
    try:
        normalized = _normalize(value, "")
    except RecursionError as exc:
        raise EncodingError("value is nested too deeply to encode") from exc
    return json.dumps(normalized, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def encode_object(kind: str, data: dict[str, Any], links: Sequence[str] = (), version: int = 1) -> bytes:
    """Canonical bytes of the envelope {"kind", "v", "links", "data"}; links are deduplicated and sorted."""
    if not isinstance(kind, str) or not KIND_PATTERN.fullmatch(kind):
        raise EncodingError(f"kind {kind!r} is invalid: use lowercase letters, digits, '_', '.' or '-', starting a-z")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise EncodingError(f"version {version!r} is invalid: it must be a positive int")
    if not isinstance(data, dict):
        raise EncodingError(f"data must be a dict, not {type(data).__name__}")
    if isinstance(links, str | bytes):
        raise EncodingError("links must be a sequence of refs, not a single string")
    for i, link in enumerate(links):
        if not is_ref(link):
            raise EncodingError(f"links[{i}]: {link!r} is not a ref (64 lowercase hex characters)")
    envelope = {"kind": kind, "v": version, "links": sorted(set(links)), "data": data}
    return canonical_bytes(envelope)


def decode_object(raw: bytes) -> StoredObject:
    """Parse and validate an envelope; non-canonical or malformed bytes raise EncodingError."""
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EncodingError(f"object is not valid UTF-8 (byte {exc.start})") from exc
    try:
        parsed = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise EncodingError(f"object is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise EncodingError("object is nested too deeply to decode") from exc
    if not isinstance(parsed, dict):
        raise EncodingError(f"object must be a JSON object, not {type(parsed).__name__}")
    if set(parsed) != ENVELOPE_KEYS:
        raise EncodingError(f"object keys must be exactly {sorted(ENVELOPE_KEYS)}, got {sorted(parsed)}")
    kind, version, links, data = parsed["kind"], parsed["v"], parsed["links"], parsed["data"]
    if not isinstance(kind, str) or not KIND_PATTERN.fullmatch(kind):
        raise EncodingError(f"object kind {kind!r} is invalid")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise EncodingError(f"object version {version!r} is invalid: it must be a positive int")
    if not isinstance(links, list) or not all(is_ref(link) for link in links):
        raise EncodingError("object links must be a list of refs (64 lowercase hex characters)")
    if links != sorted(set(links)):
        raise EncodingError("object links must be sorted and without duplicates")
    if not isinstance(data, dict):
        raise EncodingError(f"object data must be a JSON object, not {type(data).__name__}")
    if canonical_bytes(parsed) != bytes(raw):
        raise EncodingError("object bytes are not canonical JSON (key order, spacing, number or escape form differ)")
    return StoredObject(kind=kind, version=version, data=data, links=tuple(links))


def _normalize(value: Any, path: str) -> Any:
    """Copy `value` into plain JSON types, turning tuples into lists; raise EncodingError naming the bad path."""
    where = path or "value"
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise EncodingError(f"{where}: float {value} is not allowed (only finite floats)")
        return float(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise EncodingError(f"{where}: str has a lone surrogate at index {exc.start}, not valid UTF-8") from exc
        return str(value)
    if isinstance(value, list | tuple):
        return [_normalize(item, f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise EncodingError(f"{where}: dict key {key!r} is a {type(key).__name__}, keys must be str")
            sub = f"{path}.{key}" if path and key.isidentifier() else f"{path}[{key!r}]" if path else key
            out[str(key)] = _normalize(item, sub)
        return out
    raise EncodingError(f"{where}: {type(value).__name__} is not allowed; {_ALLOWED}")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise EncodingError("object has a duplicate key")
    return out


def _no_constants(name: str) -> Any:
    raise EncodingError(f"object contains {name}, which canonical JSON does not allow")
