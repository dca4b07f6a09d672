"""DirectoryStore: a store in a local directory, and `open_store` to pick a store from a spec.

Every write is atomic and durable (temp file, fsync, rename); docs/store-format.md specifies the layout.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from hivegen.store.backend import (
    FORMAT_VERSION,
    KEY_PATTERN,
    MEMORY_SPEC,
    NAMESPACE_PATTERN,
    CorruptObjectError,
    MemoryStore,
    ObjectNotFoundError,
    ObjectStore,
    StoreError,
    as_bytes,
    check_pointer,
    check_ref,
)
from hivegen.store.encoding import is_ref, ref_of


class DirectoryStore(ObjectStore):
    """A store in a local directory; every write is atomic and durable (temp file, fsync, rename)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.location = str(self.root)
        self._objects = self.root / "objects"
        self._pointers = self.root / "pointers"
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._check_format()
        self._objects.mkdir(exist_ok=True)
        self._pointers.mkdir(exist_ok=True)

    def _check_format(self) -> None:
        path = self.root / "FORMAT"
        try:
            text = path.read_text()
        except FileNotFoundError:
            self._write_atomic(path, f"hivegen-store {FORMAT_VERSION}\n".encode())
            return
        name, _, version = text.strip().partition(" ")
        if name != "hivegen-store" or not version.isdigit():
            raise StoreError(f"{path} is not a hivegen store FORMAT file; point HIVEGEN_STORE at another directory")
        if int(version) > FORMAT_VERSION:
            raise StoreError(f"store {self.root} has format {version}, newer than hivegen's {FORMAT_VERSION}; upgrade")

    def _object_path(self, ref: str) -> Path:
        check_ref(ref)
        return self._objects / ref[:2] / ref[2:]

    def _write_atomic(self, target: Path, data: bytes) -> None:
        """Write a uniquely named temp file in tmp/, fsync it, rename it over `target`, fsync the directory."""
        fd, tmp = tempfile.mkstemp(dir=self._tmp, prefix=f"{target.name[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(target.parent)

    def _make_dir(self, path: Path) -> None:
        if not path.is_dir():
            path.mkdir(parents=True, exist_ok=True)
            _fsync_dir(path.parent)

    def put(self, data: bytes) -> str:
        data = as_bytes(data)
        ref = ref_of(data)
        path = self._object_path(ref)
        if not path.is_file():
            self._make_dir(path.parent)
            self._write_atomic(path, data)
        return ref

    def get(self, ref: str) -> bytes:
        path = self._object_path(ref)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ObjectNotFoundError(ref, self.location) from None
        if ref_of(data) != ref:
            raise CorruptObjectError(ref, str(path))
        return data

    def has(self, ref: str) -> bool:
        return self._object_path(ref).is_file()

    def iter_refs(self) -> Iterator[str]:
        for shard in _scan(self._objects):
            if len(shard.name) != 2 or not shard.is_dir():
                continue
            for entry in _scan(Path(shard.path)):
                ref = shard.name + entry.name
                if is_ref(ref) and entry.is_file():
                    yield ref

    def delete(self, ref: str) -> None:
        self._object_path(ref).unlink(missing_ok=True)

    def set_pointer(self, namespace: str, key: str, value: str) -> None:
        check_pointer(namespace, key, value)
        self._make_dir(self._pointers / namespace)
        self._write_atomic(self._pointers / namespace / key, value.encode("utf-8"))

    def get_pointer(self, namespace: str, key: str) -> str | None:
        check_pointer(namespace, key)
        try:
            return (self._pointers / namespace / key).read_bytes().decode("utf-8")
        except FileNotFoundError:
            return None

    def list_pointers(self, namespace: str) -> dict[str, str]:
        check_pointer(namespace)
        out: dict[str, str] = {}
        for entry in _scan(self._pointers / namespace):
            if KEY_PATTERN.fullmatch(entry.name) and entry.is_file():
                with contextlib.suppress(FileNotFoundError):  # deleted since the scan
                    out[entry.name] = Path(entry.path).read_bytes().decode("utf-8")
        return dict(sorted(out.items()))

    def delete_pointer(self, namespace: str, key: str) -> None:
        check_pointer(namespace, key)
        (self._pointers / namespace / key).unlink(missing_ok=True)

    def namespaces(self) -> list[str]:
        names = (e.name for e in _scan(self._pointers) if NAMESPACE_PATTERN.fullmatch(e.name) and e.is_dir())
        return sorted(ns for ns in names if self.list_pointers(ns))

    def clean_tmp(self, older_than: float = 3600) -> int:
        """Remove temp files left by writers that died more than `older_than` seconds ago; return how many."""
        cutoff = time.time() - older_than
        removed = 0
        for entry in _scan(self._tmp):
            with contextlib.suppress(FileNotFoundError):
                if older_than <= 0 or entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
        return removed


def _scan(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _fsync_dir(path: Path) -> None:
    """Make a rename or new entry in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    with contextlib.suppress(OSError):
        os.fsync(fd)
    os.close(fd)


def default_store_path() -> Path:
    """$HIVEGEN_STORE, else $HIVEGEN_HOME/store, else ~/.hivegen/store."""
    if os.environ.get("HIVEGEN_STORE"):
        return Path(os.environ["HIVEGEN_STORE"]).expanduser()
    if os.environ.get("HIVEGEN_HOME"):
        return Path(os.environ["HIVEGEN_HOME"]).expanduser() / "store"
    return Path.home() / ".hivegen" / "store"


def open_store(spec: ObjectStore | str | Path | None = None) -> ObjectStore:
    """A store from a spec: a store as is, ":memory:", a directory path, or None for the default directory."""
    if isinstance(spec, ObjectStore):
        return spec
    if spec is None:
        return DirectoryStore(default_store_path())
    if isinstance(spec, str) and spec == MEMORY_SPEC:
        return MemoryStore()
    return DirectoryStore(Path(spec).expanduser())
