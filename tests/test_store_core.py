"""The store's core: canonical encoding, both backends, integrity, crash safety, concurrency, gc and open_store."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hivegen.store import (
    CorruptObjectError,
    DirectoryStore,
    EncodingError,
    InvalidNameError,
    MemoryStore,
    ObjectNotFoundError,
    ObjectStore,
    StoredObject,
    StoreError,
    canonical_bytes,
    collect_garbage,
    decode_object,
    encode_object,
    open_store,
    ref_of,
)
from hivegen.store.directory import default_store_path

REPO = Path(__file__).resolve().parents[1]
# The worked example of docs/store-format.md.
EXAMPLE_BYTES = '{"data":{"a":null,"b":[1,2.5,"é"]},"kind":"example","links":[],"v":1}'.encode()
EXAMPLE_REF = "3c6ac453534468498435332dc7ee0f70dcb6170ff921a963c07dcde2ff10c453"


@pytest.fixture(params=["memory", "directory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    return MemoryStore() if request.param == "memory" else DirectoryStore(tmp_path / "store")


def object_file(store: DirectoryStore, ref: str) -> Path:
    return store.root / "objects" / ref[:2] / ref[2:]


def run_child(script: str, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, env=env)


# --- canonical encoding ---


def test_key_order_does_not_change_the_bytes() -> None:
    one = {"b": 1, "a": {"y": [1, 2], "x": None}}
    two = {"a": {"x": None, "y": [1, 2]}, "b": 1}
    assert canonical_bytes(one) == canonical_bytes(two) == b'{"a":{"x":null,"y":[1,2]},"b":1}'


def test_tuples_encode_as_lists() -> None:
    assert canonical_bytes({"t": (1, (2, "x"))}) == canonical_bytes({"t": [1, [2, "x"]]})


def test_documented_example_has_the_documented_bytes_and_ref() -> None:
    raw = encode_object("example", {"b": [1, 2.5, "é"], "a": None})
    assert raw == EXAMPLE_BYTES
    assert ref_of(raw) == EXAMPLE_REF


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"tokens": [0, 1, 2, float("nan")]}, "data.tokens[3]: float nan is not allowed"),
        ({"x": {"y": float("inf")}}, "data.x.y: float inf is not allowed"),
        ({"blob": b"\x00"}, "data.blob: bytes is not allowed"),
        ({"s": [{1, 2}]}, "data.s[0]: set is not allowed"),
        ({"m": {1: "one"}}, "data.m: dict key 1 is a int, keys must be str"),
    ],
)
def test_values_without_a_canonical_form_are_rejected_naming_the_path(data: dict[str, Any], message: str) -> None:
    with pytest.raises(EncodingError, match=re.escape(message)):
        encode_object("thing", data)


def test_decode_returns_the_encoded_object() -> None:
    link = ref_of(b"other")
    obj = decode_object(encode_object("a.kind", {"n": 1, "f": 0.5}, links=[link, link], version=2))
    assert obj == StoredObject(kind="a.kind", version=2, data={"f": 0.5, "n": 1}, links=(link,))


@pytest.mark.parametrize(
    "raw",
    [
        b'{"data":{}, "kind":"x","links":[],"v":1}',  # a space
        b'{"kind":"x","data":{},"links":[],"v":1}',  # keys out of order
        b'{"data":{"f":1.50},"kind":"x","links":[],"v":1}',  # a non-shortest float
        b'{"data":{"s":"\\u00e9"},"kind":"x","links":[],"v":1}',  # an escaped non-ASCII character
    ],
)
def test_decode_rejects_non_canonical_bytes(raw: bytes) -> None:
    with pytest.raises(EncodingError, match="not canonical"):
        decode_object(raw)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\xff", "not valid UTF-8"),
        (b'{"data":{}', "not valid JSON"),
        (b"[1]", "must be a JSON object"),
        (b'{"data":{},"kind":"x","v":1}', "keys must be exactly"),
        (b'{"data":{},"extra":1,"kind":"x","links":[],"v":1}', "keys must be exactly"),
        (b'{"data":{},"kind":"Bad Kind","links":[],"v":1}', "kind 'Bad Kind' is invalid"),
        (b'{"data":{},"kind":"x","links":[],"v":0}', "version 0 is invalid"),
        (b'{"data":{},"kind":"x","links":[],"v":true}', "version True is invalid"),
        (b'{"data":{},"kind":"x","links":["nope"],"v":1}', "links must be a list of refs"),
        (b'{"data":[],"kind":"x","links":[],"v":1}', "data must be a JSON object"),
        (b'{"data":{"x":NaN},"kind":"x","links":[],"v":1}', "contains NaN"),
        (b'{"data":{"a":1,"a":2},"kind":"x","links":[],"v":1}', "duplicate key"),
    ],
)
def test_decode_rejects_malformed_envelopes(raw: bytes, message: str) -> None:
    with pytest.raises(EncodingError, match=re.escape(message)):
        decode_object(raw)


def test_decode_rejects_unsorted_links() -> None:
    a, b = sorted([ref_of(b"a"), ref_of(b"b")])
    raw = canonical_bytes({"data": {}, "kind": "x", "links": [b, a], "v": 1})
    with pytest.raises(EncodingError, match="sorted and without duplicates"):
        decode_object(raw)


@pytest.mark.parametrize(("kind", "links"), [("Upper", []), ("", []), ("x", ["not-a-ref"]), ("x", ref_of(b""))])
def test_encode_rejects_bad_kinds_and_links(kind: str, links: Any) -> None:
    with pytest.raises(EncodingError):
        encode_object(kind, {}, links=links)


# --- objects ---


def test_put_then_get_returns_the_same_bytes(store: ObjectStore) -> None:
    ref = store.put(b"hello")
    assert ref == ref_of(b"hello")
    assert store.get(ref) == b"hello"


def test_put_is_idempotent(store: ObjectStore) -> None:
    assert store.put(b"same") == store.put(b"same")
    assert list(store.iter_refs()) == [ref_of(b"same")]


def test_has_tells_whether_an_object_is_present(store: ObjectStore) -> None:
    ref = store.put(b"here")
    assert store.has(ref)
    assert not store.has(ref_of(b"absent"))


def test_iter_refs_lists_every_object(store: ObjectStore) -> None:
    refs = {store.put(f"object {i}".encode()) for i in range(20)}
    assert set(store.iter_refs()) == refs


def test_delete_removes_an_object_and_ignores_missing_ones(store: ObjectStore) -> None:
    ref = store.put(b"doomed")
    store.delete(ref)
    store.delete(ref)
    assert not store.has(ref)


def test_get_of_a_missing_ref_raises_object_not_found(store: ObjectStore) -> None:
    missing = ref_of(b"never stored")
    with pytest.raises(ObjectNotFoundError) as info:
        store.get(missing)
    assert info.value.ref == missing


@pytest.mark.parametrize("bad", ["abc", "A" * 64, "../" + "0" * 61, "0" * 64 + "\n", ""])
def test_invalid_ref_strings_raise_invalid_name(store: ObjectStore, bad: str) -> None:
    with pytest.raises(InvalidNameError, match="is not a ref"):
        store.get(bad)


def test_put_object_then_get_object_round_trips(store: ObjectStore) -> None:
    child = store.put(b"child")
    ref = store.put_object("node", {"tokens": (1, 2)}, links=[child])
    assert store.get_object(ref) == StoredObject("node", 1, {"tokens": [1, 2]}, (child,))


def test_directory_store_persists_across_instances(tmp_path: Path) -> None:
    ref = DirectoryStore(tmp_path).put(b"durable")
    assert DirectoryStore(tmp_path).get(ref) == b"durable"
    assert (tmp_path / "FORMAT").read_text() == "hivegen-store 1\n"


def test_directory_store_refuses_a_newer_format(tmp_path: Path) -> None:
    DirectoryStore(tmp_path)
    (tmp_path / "FORMAT").write_text("hivegen-store 99\n")
    with pytest.raises(StoreError, match="newer"):
        DirectoryStore(tmp_path)


def test_iter_refs_ignores_stray_files(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    ref = store.put(b"real")
    (tmp_path / "objects" / "README").write_text("x")
    (tmp_path / "objects" / "zz").mkdir()
    (tmp_path / "objects" / "zz" / ("0" * 62)).write_text("x")
    (tmp_path / "objects" / ref[:2] / "short").write_text("x")
    assert list(store.iter_refs()) == [ref]


# --- pointers ---


def test_pointers_set_get_list_and_delete(store: ObjectStore) -> None:
    store.set_pointer("heads", "main", "v1")
    store.set_pointer("heads", "main", "v2")
    store.set_pointer("heads", "dev", "d")
    assert store.get_pointer("heads", "main") == "v2"
    assert store.get_pointer("heads", "missing") is None
    assert store.list_pointers("heads") == {"dev": "d", "main": "v2"}
    store.delete_pointer("heads", "dev")
    store.delete_pointer("heads", "dev")
    assert store.list_pointers("heads") == {"main": "v2"}
    assert store.list_pointers("empty") == {}


def test_namespaces_lists_those_holding_pointers(store: ObjectStore) -> None:
    store.set_pointer("b-ns", "k", "v")
    store.set_pointer("a_ns", "k", "v")
    store.set_pointer("gone", "k", "v")
    store.delete_pointer("gone", "k")
    assert store.namespaces() == ["a_ns", "b-ns"]


@pytest.mark.parametrize(
    ("namespace", "key"),
    [("../x", "k"), ("", "k"), ("a/b", "k"), ("Upper", "k"), ("ns", "../x"), ("ns", ""), ("ns", "a/b"), ("ns", ".k")],
)
def test_invalid_namespaces_and_keys_are_rejected(store: ObjectStore, namespace: str, key: str) -> None:
    with pytest.raises(InvalidNameError, match="is invalid"):
        store.set_pointer(namespace, key, "v")
    with pytest.raises(InvalidNameError):
        store.get_pointer(namespace, key)


def test_pointer_values_round_trip_exactly(store: ObjectStore) -> None:
    value = "line\r\nnext \u00e9 \U0001f600\n"
    store.set_pointer("ns", "k", value)
    assert store.get_pointer("ns", "k") == value
    assert store.list_pointers("ns") == {"k": value}


def test_put_rejects_non_bytes(store: ObjectStore) -> None:
    with pytest.raises(TypeError, match="holds bytes"):
        store.put(5)  # type: ignore[arg-type]


def test_overlong_pointer_values_are_rejected(store: ObjectStore) -> None:
    store.set_pointer("ns", "k", "x" * 4096)
    with pytest.raises(InvalidNameError, match="at most 4096"):
        store.set_pointer("ns", "k", "x" * 4097)


# --- integrity ---


def test_a_flipped_byte_is_reported_as_corruption_not_data(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    refs = [store.put(f"object {i}".encode()) for i in range(3)]
    path = object_file(store, refs[1])
    raw = bytearray(path.read_bytes())
    raw[0] ^= 0x01
    path.write_bytes(bytes(raw))

    with pytest.raises(CorruptObjectError, match=refs[1]) as info:
        store.get(refs[1])
    assert "hivegen store verify" in str(info.value)
    assert [err.ref for err in store.verify()] == [refs[1]]
    assert store.get(refs[0]) == b"object 0"
    assert store.get(refs[2]) == b"object 2"


WRITER = """
import os, sys
from hivegen.store import DirectoryStore
store = DirectoryStore(sys.argv[1])
i = 0
while True:
    store.put(i.to_bytes(8, "big") + os.urandom(1 << 20))
    i += 1
"""


def test_sigkill_mid_write_leaves_only_whole_objects(tmp_path: Path) -> None:
    child = run_child(WRITER, str(tmp_path))
    try:
        deadline = time.monotonic() + 20
        while len(list((tmp_path / "objects").glob("*/*"))) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(random.uniform(0, 0.02))  # land somewhere inside a write
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()

    store = DirectoryStore(tmp_path)
    files = [p for p in (tmp_path / "objects").glob("*/*")]
    assert len(files) >= 4
    assert all(p.stat().st_size == 8 + (1 << 20) for p in files)
    assert store.verify() == []
    leftovers = len(list((tmp_path / "tmp").iterdir()))
    assert store.clean_tmp(older_than=0) == leftovers
    assert list((tmp_path / "tmp").iterdir()) == []


CONCURRENT_WRITER = """
import sys, time
from pathlib import Path
from hivegen.store import DirectoryStore
root, worker = sys.argv[1], sys.argv[2]
store = DirectoryStore(root)
while not (Path(root).parent / "go").exists():
    time.sleep(0.005)
for i in range(50):
    ref = store.put(f"worker {worker} object {i}".encode())
    store.set_pointer("shared", f"w{worker}-{i}", ref)
    store.set_pointer("shared", "last", f"w{worker}")
"""


def test_concurrent_processes_lose_nothing(tmp_path: Path) -> None:
    root = tmp_path / "store"
    children = [run_child(CONCURRENT_WRITER, str(root), str(w)) for w in range(4)]
    time.sleep(0.3)
    (tmp_path / "go").touch()
    assert [child.wait(timeout=60) for child in children] == [0, 0, 0, 0]

    store = DirectoryStore(root)
    pointers = store.list_pointers("shared")
    assert pointers.pop("last") in {"w0", "w1", "w2", "w3"}
    assert len(pointers) == 200
    assert set(pointers.values()) == set(store.iter_refs())
    assert all(store.get(ref) == f"worker {key[1]} object {key[3:]}".encode() for key, ref in pointers.items())
    assert store.verify() == []


# --- garbage collection ---


def test_gc_keeps_what_pointers_reach_and_removes_the_rest(store: ObjectStore) -> None:
    leaf = store.put_object("leaf", {"n": 0})
    middle = store.put_object("middle", {"n": 1}, links=[leaf])
    top = store.put_object("top", {"n": 2}, links=[middle])
    blob = store.put(b"pointed at directly")
    garbage = {store.put_object("junk", {"n": 3}, links=[leaf]), store.put(b"junk blob")}
    store.set_pointer("roots", "top", top)
    store.set_pointer("roots", "blob", blob)
    store.set_pointer("notes", "text", "not a ref")

    report = collect_garbage(store)
    assert set(report.removed) == garbage
    assert report.kept == 4
    assert set(store.iter_refs()) == {leaf, middle, top, blob}


def test_gc_dry_run_removes_nothing(store: ObjectStore) -> None:
    junk = store.put(b"junk")
    report = collect_garbage(store, dry_run=True)
    assert report.removed == [junk]
    assert store.has(junk)


def test_gc_never_deletes_a_corrupt_object_a_pointer_reaches(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    ref = store.put_object("precious", {"n": 1})
    store.set_pointer("roots", "p", ref)
    object_file(store, ref).write_bytes(b"damaged")
    assert collect_garbage(store).removed == []
    assert object_file(store, ref).exists()


def test_gc_cleans_stale_temp_files(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    stale = tmp_path / "tmp" / "dead-writer.tmp"
    stale.write_bytes(b"partial")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    collect_garbage(store)
    assert not stale.exists()


# --- open_store ---


def test_open_store_memory_spec_gives_a_memory_store() -> None:
    assert isinstance(open_store(":memory:"), MemoryStore)


def test_open_store_path_gives_a_directory_store(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s")
    assert isinstance(store, DirectoryStore)
    assert store.location == str(tmp_path / "s")
    assert open_store(str(tmp_path / "s")).location == store.location


def test_open_store_returns_an_existing_store_as_is() -> None:
    store = MemoryStore()
    assert open_store(store) is store


def test_open_store_none_uses_hivegen_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVEGEN_STORE", str(tmp_path / "env-store"))
    store = open_store(None)
    assert isinstance(store, DirectoryStore)
    assert store.root == tmp_path / "env-store"


def test_default_store_path_falls_back_to_hivegen_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HIVEGEN_STORE", raising=False)
    monkeypatch.setenv("HIVEGEN_HOME", str(tmp_path))
    assert default_store_path() == tmp_path / "store"
