"""The status page against a hostile swarm: bounded answers in bounded time, escaped strings, safe headers.

A real coordinator (real DHT, real HTTP) and an attacker's own DHT peer, which stores hostile entries signed with
the attacker's own fresh keys: the owner-signature validator accepts them, so only the bounds can stop them.
"""

from __future__ import annotations

import html
import json
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import hivemind
import pytest
from hivemind.utils import get_dht_time
from prometheus_client.parser import text_string_to_metric_families

from hivegen.cli import terminal_safe
from hivegen.coordinator.server import Coordinator, CoordinatorConfig
from hivegen.coordinator.status import (
    MAX_STATUS_MODELS,
    MAX_STATUS_NODES,
    REQUEST_WAIT_S,
    StatusServer,
    swarm_status,
)
from hivegen.credits.identity import Identity
from hivegen.dht import (
    ModelInfo,
    SpanRecord,
    announce_model,
    announce_span,
    block_key,
    owned_subkey,
    sign_value,
    start_dht,
    visible_maddrs,
)
from hivegen.dht.models import MAX_MODEL_KEY_CHARS, MAX_NAME_CHARS, MAX_NUM_BLOCKS, MODELS_KEY
from hivegen.dht.swarm import run_on_dht

TTL = 300.0
HONEST = Identity.generate()


@dataclass
class Swarm:
    coordinator: Coordinator
    attacker: hivemind.DHT  # a peer the attacker runs, joined to the coordinator's DHT
    honest_model: str  # a model announced by an honest node, fully covered


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    coordinator = Coordinator(CoordinatorConfig(data=tmp_path_factory.mktemp("coordinator")))
    coordinator.start()
    attacker: hivemind.DHT | None = None
    try:
        assert coordinator.dht is not None
        attacker = start_dht(visible_maddrs(coordinator.dht))
        model = f"honest-{uuid.uuid4().hex[:8]}"
        announce_model(coordinator.dht, ModelInfo(model, "honest", 2), ttl=TTL, identity=HONEST)
        announce_span(coordinator.dht, model, span(owned_subkey("12D3KooWHonest", HONEST.public_key_hex)), TTL, HONEST)
        yield Swarm(coordinator, attacker, model)
    finally:
        if attacker is not None:
            attacker.shutdown()
        coordinator.stop()


def span(node_id: str, start: int = 0, end: int = 2, **changes: Any) -> SpanRecord:
    fields: dict[str, Any] = dict(
        node_id=node_id, address="127.0.0.1:50051", start=start, end=end, throughput=10.0,
        cache_tokens_free=1024, dtype="float32", version="0.1.0",
    )  # fmt: skip
    return SpanRecord(**{**fields, **changes})


def store_signed(dht: hivemind.DHT, signer: Identity, entries: list[tuple[str, str, dict[str, Any]]]) -> None:
    """Store (key, subkey, value) entries, each signed by `signer` (who owns every subkey), a few per DHT call:
    hivemind's pipe into its DHT process drops messages larger than the OS pipe buffer."""
    expiration = get_dht_time() + TTL
    for first in range(0, len(entries), 32):
        batch = entries[first : first + 32]
        signed = [sign_value(signer, key, subkey, value, expiration) for key, subkey, value in batch]
        keys, subkeys = [key for key, _, _ in batch], [subkey for _, subkey, _ in batch]
        stored = run_on_dht(dht, partial(_store_many, keys=keys, subkeys=subkeys, values=signed, expiration=expiration))
        assert stored, "the attacker's entries were not stored"


async def _store_many(
    _dht: Any, node: Any, *, keys: list[str], subkeys: list[str], values: list[Any], expiration: float
) -> bool:
    """Runs in the attacker's DHT process."""
    return all((await node.store_many(keys, values, expiration, subkeys=subkeys)).values())


async def _stall(_dht: Any, _node: Any, *, seconds: float) -> None:
    """Runs in a DHT process and blocks its event loop: the DHT answers nothing for `seconds`."""
    time.sleep(seconds)


def register(dht: hivemind.DHT, signer: Identity, model_key: str, name: str, num_blocks: int) -> None:
    """A registry entry as an attacker writes it: anything at all, signed with its own key."""
    store_signed(
        dht,
        signer,
        [(MODELS_KEY, owned_subkey(model_key, signer.public_key_hex), {"name": name, "num_blocks": num_blocks})],
    )


@dataclass
class Reply:
    code: int
    headers: Any
    body: bytes
    seconds: float


def http(swarm_or_url: Swarm | str, path: str, method: str = "GET") -> Reply:
    base = swarm_or_url if isinstance(swarm_or_url, str) else swarm_or_url.coordinator.status_url
    started = time.monotonic()
    request = urllib.request.Request(f"{base}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return Reply(reply.status, reply.headers, reply.read(), time.monotonic() - started)
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, exc.headers, exc.read(), time.monotonic() - started)


def models_listed(swarm: Swarm) -> dict[str, dict[str, Any]]:
    reply = http(swarm, "/status")
    assert reply.code == 200, reply.body[:500]
    return {m["model_key"]: m for m in json.loads(reply.body)["models"]}


def test_a_ten_thousand_block_registry_entry_does_not_break_status(swarm: Swarm) -> None:
    hostile, attacker = f"huge-{uuid.uuid4().hex[:8]}", Identity.generate()
    register(swarm.attacker, attacker, hostile, "huge", 10_000)
    found = swarm.coordinator.dht.get(MODELS_KEY, latest=True)  # type: ignore[union-attr]
    assert found is not None and owned_subkey(hostile, attacker.public_key_hex) in found.value  # it is in the DHT
    reply = http(swarm, "/status")
    assert reply.code == 200 and reply.seconds < REQUEST_WAIT_S + 2
    models = {m["model_key"]: m for m in json.loads(reply.body)["models"]}
    assert hostile not in models  # above MAX_NUM_BLOCKS: ignored as invalid
    assert models[swarm.honest_model]["covered"] and models[swarm.honest_model]["nodes_total"] == 1


def test_the_largest_registry_entry_allowed_is_looked_up_without_harm(swarm: Swarm) -> None:
    attacker = Identity.generate()
    hostile = f"max-{uuid.uuid4().hex[:8]}-".ljust(MAX_MODEL_KEY_CHARS, "k")  # 1024 keys of 270 characters each
    register(swarm.attacker, attacker, hostile, "max", MAX_NUM_BLOCKS)
    for _ in range(3):  # the coordinator's DHT process keeps answering, again and again
        models = models_listed(swarm)
        assert models[hostile]["missing_blocks"] == list(range(MAX_NUM_BLOCKS)) and "error" not in models[hostile]
        assert models[swarm.honest_model]["covered"]
    assert swarm.coordinator.dht is not None and swarm.coordinator.dht.is_alive()


def test_swarm_strings_come_back_escaped_in_the_raw_body_and_intact_in_the_json(swarm: Swarm) -> None:
    model, attacker = f"xss-{uuid.uuid4().hex[:8]}", Identity.generate()
    name, address = '<script>alert("name")</script> & co', "<script>alert(1)</script>:443"
    register(swarm.attacker, attacker, model, name, 1)
    node = owned_subkey("12D3KooWXss", attacker.public_key_hex)
    announce_span(swarm.attacker, model, span(node, 0, 1, address=address), TTL, attacker)
    reply = http(swarm, "/status")
    assert reply.code == 200
    assert b"<" not in reply.body and b">" not in reply.body and b"&" not in reply.body
    assert b"\\u003cscript\\u003e" in reply.body
    listed = {m["model_key"]: m for m in json.loads(reply.body)["models"]}[model]
    assert listed["name"] == name and [n["address"] for n in listed["nodes"]] == [address]


def test_every_response_is_nosniff_and_json_says_its_charset(swarm: Swarm) -> None:
    def failing() -> dict[str, Any]:
        raise RuntimeError("<b>boom</b>")

    release = threading.Event()
    side = StatusServer("127.0.0.1", 0, {"/fail": failing, "/slow": lambda: {"ok": release.wait(10)}}, wait_s=0.5)
    side.start()
    try:
        replies = {
            "status": http(swarm, "/status"),
            "leaderboard": http(swarm, "/leaderboard/"),
            "unknown path": http(swarm, "/<script>"),
            "unknown evidence": http(swarm, "/evidence/" + "0" * 64),
            "malformed evidence": http(swarm, "/evidence/not-a-digest"),
            "unsupported method": http(swarm, "/status", method="POST"),
            "failing route": http(f"http://{side.address}", "/fail"),
            "late route": http(f"http://{side.address}", "/slow"),
        }
    finally:
        release.set()
        side.stop()
    codes = {what: reply.code for what, reply in replies.items()}
    assert list(codes.values()) == [200, 200, 404, 404, 400, 501, 500, 503], codes
    for what, reply in replies.items():
        assert reply.headers["X-Content-Type-Options"] == "nosniff", what
        assert reply.headers["Content-Type"] == "application/json; charset=utf-8", what
        json.loads(reply.body)
    assert b"<" not in replies["unknown path"].body + replies["failing route"].body
    assert replies["late route"].seconds < 3 and replies["late route"].headers["Retry-After"]


def test_evidence_and_malformed_requests_are_nosniff_too(swarm: Swarm) -> None:
    from hivegen.coordinator.client import report_node
    from tests.test_reports import make_evidence

    ack = report_node(swarm.coordinator.address, Identity.generate(), make_evidence(Identity.generate()))
    evidence = http(swarm, f"/evidence/{ack.evidence_digest}")
    assert evidence.code == 200 and evidence.headers["X-Content-Type-Options"] == "nosniff"
    assert evidence.headers["Content-Type"] == "application/octet-stream"
    host, port = swarm.coordinator.status_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"GET /<script> x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # four words: bad syntax
        raw = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (chunk := conn.recv(65536)):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 400") and b"X-Content-Type-Options: nosniff" in head
    assert b"<" not in body and "error" in json.loads(body)


def test_oversized_strings_in_registry_entries_and_span_records_are_ignored(swarm: Swarm) -> None:
    attacker = Identity.generate()
    long_name, control_name = f"long-{uuid.uuid4().hex[:8]}", f"ctrl-{uuid.uuid4().hex[:8]}"
    register(swarm.attacker, attacker, long_name, "n" * (MAX_NAME_CHARS + 1), 1)
    register(swarm.attacker, attacker, control_name, "\x1b[2Jcleared", 1)
    model = f"spans-{uuid.uuid4().hex[:8]}"
    register(swarm.attacker, attacker, model, "spans", 1)
    good = span(owned_subkey("12D3KooWGood", attacker.public_key_hex), 0, 1).to_dict()
    bad = {
        "12D3KooWVersion": {**good, "version": "v" * 1000},
        "12D3KooWAddress": {**good, "address": "a" * 10_000 + ":1"},
        "12D3KooWSpaces": {**good, "address": "evil host:1"},
        "12D3KooWControl": {**good, "address": "\x1b]0;owned\x07:1"},
    }
    entries = [(block_key(model, 0), owned_subkey(peer, attacker.public_key_hex), value) for peer, value in bad.items()]
    entries.append((block_key(model, 0), owned_subkey("12D3KooWGood", attacker.public_key_hex), good))
    store_signed(swarm.attacker, attacker, entries)
    models = models_listed(swarm)
    assert long_name not in models and control_name not in models
    assert [n["node_id"].split("@")[0] for n in models[model]["nodes"]] == ["12D3KooWGood"]


def test_a_model_with_too_many_nodes_lists_the_cap_and_says_it_truncated(swarm: Swarm) -> None:
    attacker, model = Identity.generate(), f"crowd-{uuid.uuid4().hex[:8]}"
    register(swarm.attacker, attacker, model, "crowd", 1)
    count = MAX_STATUS_NODES + 20
    nodes = [owned_subkey(f"12D3KooWCrowd{i}", attacker.public_key_hex) for i in range(count)]
    store_signed(swarm.attacker, attacker, [(block_key(model, 0), n, span(n, 0, 1).to_dict()) for n in nodes])
    listed = models_listed(swarm)[model]
    assert len(listed["nodes"]) == MAX_STATUS_NODES and listed["nodes_total"] == count and listed["nodes_truncated"]
    assert listed["covered"] and listed["steps_per_second_bound"] == 10.0


def test_swarm_status_returns_by_its_deadline_when_the_dht_does_not_answer(swarm: Swarm) -> None:
    dht = swarm.coordinator.dht
    assert dht is not None
    stall = dht.run_coroutine(partial(_stall, seconds=4.0), return_future=True)
    try:
        time.sleep(0.2)  # the stall holds the DHT's event loop
        started = time.monotonic()
        answer = swarm_status(dht, deadline_s=1.0, lookup_timeout_s=1.0)
        assert time.monotonic() - started < 2.5
        assert answer["models"] == [] and "could not read the model registry" in answer["error"]
    finally:
        stall.result(timeout=30)


def test_status_answers_promptly_from_its_last_answer_while_the_dht_is_stalled(swarm: Swarm) -> None:
    dht = swarm.coordinator.dht
    assert dht is not None
    assert swarm.honest_model in models_listed(swarm)  # an answer to fall back on
    stall = dht.run_coroutine(partial(_stall, seconds=REQUEST_WAIT_S + 3), return_future=True)
    try:
        time.sleep(0.2)
        reply = http(swarm, "/status")
        assert reply.code == 200 and reply.seconds < REQUEST_WAIT_S + 1.5
        assert int(reply.headers["Age"]) >= int(REQUEST_WAIT_S)  # the earlier answer, and says so
        assert swarm.honest_model in {m["model_key"] for m in json.loads(reply.body)["models"]}
    finally:
        stall.result(timeout=30)


def test_registering_more_models_than_the_cap_truncates_the_list_and_says_so(swarm: Swarm) -> None:
    attacker, prefix = Identity.generate(), f"many-{uuid.uuid4().hex[:8]}"
    store_signed(
        swarm.attacker,
        attacker,
        [
            (MODELS_KEY, owned_subkey(f"{prefix}-{i:03d}", attacker.public_key_hex), {"name": "m", "num_blocks": 1})
            for i in range(MAX_STATUS_MODELS + 1)
        ],
    )
    reply = http(swarm, "/status")
    assert reply.code == 200, reply.body[:500]
    status = json.loads(reply.body)
    assert len(status["models"]) == MAX_STATUS_MODELS and status["models_truncated"]
    assert status["models_total"] > MAX_STATUS_MODELS


def test_announcing_a_model_beyond_the_bounds_is_refused_before_it_is_stored(swarm: Swarm) -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        announce_model(swarm.attacker, ModelInfo("big", "big", MAX_NUM_BLOCKS + 1), ttl=TTL, identity=HONEST)


def test_terminal_safe_escapes_control_and_bidi_characters() -> None:
    assert terminal_safe("node\x1b[31m\u202e\x07 é") == "node\\x1b[31m\\u202e\\x07 é"
    assert terminal_safe("a" * 500).endswith("...") and len(terminal_safe("a" * 500)) == 203


def test_the_status_page_escapes_swarm_strings_and_allows_no_script(swarm: Swarm) -> None:
    model, attacker = f"0page-{uuid.uuid4().hex[:8]}", Identity.generate()  # sorts first: listed under the cap
    name = '<img src=x onerror="document.title=1">"><script>alert(2)</script>'
    register(swarm.attacker, attacker, model, name, 2)
    node = owned_subkey("12D3KooWPage", attacker.public_key_hex)
    announce_span(swarm.attacker, model, span(node, 0, 1, version='"><b>v</b>'), TTL, attacker)
    reply = http(swarm, "/")
    assert reply.code == 200 and reply.headers["Content-Type"] == "text/html; charset=utf-8"
    policy = reply.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src" not in policy  # no script may run, from anywhere
    page = reply.body.decode()
    assert "<script" not in page and "<img" not in page and "<b>v</b>" not in page
    assert html.escape(name, quote=True) in page and "coverage gap: blocks 1 are served by no node" in page


def test_metrics_are_prometheus_text_about_every_model(swarm: Swarm) -> None:
    reply = http(swarm, "/metrics")
    assert reply.code == 200 and reply.headers["Content-Type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(reply.body.decode())}
    covered = {s.labels["model"]: s.value for s in families["hivegen_model_covered"].samples}
    assert covered[swarm.honest_model] == 1.0
    assert families["hivegen_models"].samples[0].value >= 1
