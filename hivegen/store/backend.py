"""Object stores: immutable blobs addressed by their SHA-256, plus named pointers, in memory or in a directory."""

from __future__ import annotations

import abc
import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from hivegen.store.encoding import (
    EncodingError,
    StoredObject,
    StoreError,
    decode_object,
    encode_object,
    is_ref,
    ref_of,
)

NAMESPACE_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
MAX_POINTER_VALUE = 4096
FORMAT_VERSION = 1
MEMORY_SPEC = ":memory:"

__all__ = [
    "CorruptObjectError",
    "InvalidNameError",
    "MemoryStore",
    "ObjectNotFoundError",
    "ObjectStore",
    "StoreError",
]


class ObjectNotFoundError(StoreError):
    """No object with this ref is in the store."""

    def __init__(self, ref: str, location: str) -> None:
        self.ref = ref
        self.location = location
        super().__init__(f"object {ref} is not in the store at {location}; put it first, or check HIVEGEN_STORE")


class CorruptObjectError(StoreError):
    """An object's bytes no longer hash to its ref: it is damaged and must never be used as data."""

    def __init__(self, ref: str, location: str) -> None:
        self.ref = ref
        self.location = location
        super().__init__(
            f"object {ref} at {location} is corrupt: its content does not match its ref. "
            "Run `hivegen store verify` to list damaged objects, then remove them and put them again from a good copy"
        )


class InvalidNameError(StoreError):
    """A ref, pointer namespace, key or value is malformed."""


class ObjectStore(abc.ABC):
    """Content-addressed objects (put/get by SHA-256 ref) plus mutable named pointers grouped in namespaces."""

    location: str  # where the store lives, for messages: "memory" or a directory path

    @abc.abstractmethod
    def put(self, data: bytes) -> str:
        """Store `data` (a no-op if already present) and return its ref."""

    @abc.abstractmethod
    def get(self, ref: str) -> bytes:
        """The bytes of `ref`, hash-checked; raises ObjectNotFoundError or CorruptObjectError."""

    @abc.abstractmethod
    def has(self, ref: str) -> bool:
        """Whether an object with this ref is present (its content is not checked)."""

    @abc.abstractmethod
    def iter_refs(self) -> Iterator[str]:
        """Every ref in the store, in no particular order."""

    @abc.abstractmethod
    def delete(self, ref: str) -> None:
        """Remove an object; removing a missing one is fine."""

    @abc.abstractmethod
    def set_pointer(self, namespace: str, key: str, value: str) -> None:
        """Point namespace/key at `value` (usually a ref); the last writer wins."""

    @abc.abstractmethod
    def get_pointer(self, namespace: str, key: str) -> str | None:
        """The value of namespace/key, or None if unset."""

    @abc.abstractmethod
    def list_pointers(self, namespace: str) -> dict[str, str]:
        """Every key -> value in a namespace (empty if the namespace has none)."""

    @abc.abstractmethod
    def delete_pointer(self, namespace: str, key: str) -> None:
        """Remove a pointer; removing a missing one is fine."""

    @abc.abstractmethod
    def namespaces(self) -> list[str]:
        """The sorted namespaces that hold at least one pointer."""

    def put_object(self, kind: str, data: dict[str, Any], links: Sequence[str] = (), version: int = 1) -> str:
        """Encode a typed record as a canonical object, store it, and return its ref."""
        return self.put(encode_object(kind, data, links, version))

    def get_object(self, ref: str) -> StoredObject:
        """Read and decode the object at `ref`; bytes that are not a valid envelope raise EncodingError."""
        raw = self.get(ref)
        try:
            return decode_object(raw)
        except EncodingError as exc:
            raise EncodingError(f"object {ref} in {self.location}: {exc}") from exc

    def verify(self) -> list[CorruptObjectError]:
        """Re-hash every object; one error per damaged object (none are raised)."""
        bad: list[CorruptObjectError] = []
        for ref in list(self.iter_refs()):
            try:
                self.get(ref)
            except CorruptObjectError as exc:
                bad.append(exc)
            except ObjectNotFoundError:
                pass  # deleted while we were looking
        return bad

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"


class MemoryStore(ObjectStore):
    """A store held in dicts; for tests and short-lived processes. Thread-safe."""

    def __init__(self) -> None:
        self.location = "memory"
        self._lock = threading.Lock()
        self._objects: dict[str, bytes] = {}
        self._pointers: dict[str, dict[str, str]] = {}

    def put(self, data: bytes) -> str:
        data = as_bytes(data)
        ref = ref_of(data)
        with self._lock:
            self._objects.setdefault(ref, data)
        return ref

    def get(self, ref: str) -> bytes:
        check_ref(ref)
        with self._lock:
            data = self._objects.get(ref)
        if data is None:
            raise ObjectNotFoundError(ref, self.location)
        if ref_of(data) != ref:
            raise CorruptObjectError(ref, self.location)
        return data

    def has(self, ref: str) -> bool:
        check_ref(ref)
        with self._lock:
            return ref in self._objects

    def iter_refs(self) -> Iterator[str]:
        with self._lock:
            refs = list(self._objects)
        return iter(refs)

    def delete(self, ref: str) -> None:
        check_ref(ref)
        with self._lock:
            self._objects.pop(ref, None)

    def set_pointer(self, namespace: str, key: str, value: str) -> None:
        check_pointer(namespace, key, value)
        with self._lock:
            self._pointers.setdefault(namespace, {})[key] = value

    def get_pointer(self, namespace: str, key: str) -> str | None:
        check_pointer(namespace, key)
        with self._lock:
            return self._pointers.get(namespace, {}).get(key)

    def list_pointers(self, namespace: str) -> dict[str, str]:
        check_pointer(namespace)
        with self._lock:
            return dict(self._pointers.get(namespace, {}))

    def delete_pointer(self, namespace: str, key: str) -> None:
        check_pointer(namespace, key)
        with self._lock:
            space = self._pointers.get(namespace, {})
            space.pop(key, None)
            if not space:
                self._pointers.pop(namespace, None)

    def namespaces(self) -> list[str]:
        with self._lock:
            return sorted(ns for ns, space in self._pointers.items() if space)


def as_bytes(data: bytes) -> bytes:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"a store holds bytes, not {type(data).__name__}; encode it first (put_object for records)")
    return bytes(data)


def check_ref(ref: str) -> None:
    """Raise InvalidNameError unless `ref` is 64 lowercase hex characters."""
    if not is_ref(ref):
        raise InvalidNameError(f"{ref!r} is not a ref: expected 64 lowercase hex characters (a SHA-256)")


def check_pointer(namespace: str, key: str | None = None, value: str | None = None) -> None:
    """Raise InvalidNameError for a malformed namespace, key or value (so none can escape the store's directory)."""
    if not isinstance(namespace, str) or not NAMESPACE_PATTERN.fullmatch(namespace):
        raise InvalidNameError(
            f"pointer namespace {namespace!r} is invalid: use 1-64 of a-z, 0-9, '_' or '-', starting with a-z"
        )
    if key is not None and (not isinstance(key, str) or not KEY_PATTERN.fullmatch(key)):
        raise InvalidNameError(
            f"pointer key {key!r} is invalid: use 1-200 of A-Z, a-z, 0-9, '.', '_' or '-', starting alphanumeric"
        )
    if value is not None:
        if not isinstance(value, str) or len(value) > MAX_POINTER_VALUE:
            raise InvalidNameError(f"pointer value must be a str of at most {MAX_POINTER_VALUE} characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidNameError("pointer value is not valid UTF-8 (it has a lone surrogate)") from exc
