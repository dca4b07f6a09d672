"""Content-addressed store: immutable objects addressed by the SHA-256 of their canonical bytes, plus named pointers.

The on-disk format is specified in docs/store-format.md.
"""

from hivegen.store.backend import (
    CorruptObjectError,
    InvalidNameError,
    MemoryStore,
    ObjectNotFoundError,
    ObjectStore,
    StoreError,
)
from hivegen.store.directory import DirectoryStore, default_store_path, open_store
from hivegen.store.encoding import (
    REF_PATTERN,
    EncodingError,
    StoredObject,
    canonical_bytes,
    decode_object,
    encode_object,
    is_ref,
    ref_of,
)
from hivegen.store.gc import GcReport, collect_garbage, reachable

__all__ = [
    "REF_PATTERN",
    "CorruptObjectError",
    "DirectoryStore",
    "EncodingError",
    "GcReport",
    "InvalidNameError",
    "MemoryStore",
    "ObjectNotFoundError",
    "ObjectStore",
    "StoreError",
    "StoredObject",
    "canonical_bytes",
    "collect_garbage",
    "decode_object",
    "default_store_path",
    "encode_object",
    "is_ref",
    "open_store",
    "reachable",
    "ref_of",
]
