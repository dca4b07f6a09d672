"""DHT records, announcements and lookups, on a real three-peer hivemind swarm on 127.0.0.1."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import hivemind
import pytest
from hivemind.utils import get_dht_time

from hivegen.dht import (
    Announcer,
    SpanRecord,
    SwarmError,
    announce_span,
    block_key,
    fetch_spans,
    missing_blocks,
    node_id,
    start_dht,
    visible_maddrs,
    withdraw_span,
)

NUM_BLOCKS = 6


@dataclass
class Swarm:
    bootstrap: hivemind.DHT
    peer_a: hivemind.DHT
    peer_b: hivemind.DHT


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    dhts: list[hivemind.DHT] = []
    try:
        dhts.append(start_dht())
        dhts.append(start_dht(visible_maddrs(dhts[0])))
        dhts.append(start_dht(visible_maddrs(dhts[0])))
        yield Swarm(*dhts)
    finally:
        for dht in dhts:
            dht.shutdown()


@pytest.fixture
def model_key() -> str:
    """A fresh model key per test, so tests sharing the swarm never see each other's records."""
    return f"test-model-{uuid.uuid4().hex[:8]}"


def make_record(node: str, start: int = 0, end: int = NUM_BLOCKS, **changes: Any) -> SpanRecord:
    fields: dict[str, Any] = dict(
        node_id=node,
        address="127.0.0.1:50051",
        start=start,
        end=end,
        throughput=12.5,
        cache_tokens_free=4096,
        dtype="float32",
        version="0.1.0",
    )
    fields.update(changes)
    return SpanRecord(**fields)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def test_record_round_trips_through_dict() -> None:
    record = make_record("node-1", 3, 7, state="offline")
    assert SpanRecord.from_dict("node-1", record.to_dict()) == record


def test_block_key_names_model_and_block() -> None:
    assert block_key("smollm2-135m", 4) == "smollm2-135m.block.4"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1, 2], "must be a dict"),
        ({k: v for k, v in make_record("n").to_dict().items() if k != "address"}, "missing field 'address'"),
        ({**make_record("n").to_dict(), "start": "0"}, "field 'start' must be int"),
        ({**make_record("n").to_dict(), "end": True}, "field 'end' must be int"),
        ({**make_record("n").to_dict(), "throughput": "fast"}, "field 'throughput' must be float"),
        ({**make_record("n").to_dict(), "start": 4, "end": 4}, "start 4 >= end 4"),
        ({**make_record("n").to_dict(), "start": -1}, "negative start"),
        ({**make_record("n").to_dict(), "cache_tokens_free": -5}, "negative cache_tokens_free"),
        ({**make_record("n").to_dict(), "throughput": 0.0}, "positive number"),
        ({**make_record("n").to_dict(), "state": "sleeping"}, "unknown state 'sleeping'"),
        ({**make_record("n").to_dict(), "address": "localhost"}, "not host:port"),
    ],
)
def test_from_dict_rejects_malformed_data_with_specific_message(data: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SpanRecord.from_dict("n", data)


def test_announce_from_one_peer_is_visible_from_another(swarm: Swarm, model_key: str) -> None:
    record = make_record(node_id(swarm.peer_a))
    announce_span(swarm.peer_a, model_key, record, ttl=30)
    spans = fetch_spans(swarm.peer_b, model_key, NUM_BLOCKS)
    assert spans == {record.node_id: record}
    assert missing_blocks(spans.values(), NUM_BLOCKS) == []


def test_missing_blocks_names_blocks_no_online_span_covers() -> None:
    spans = [make_record("a", 0, 2), make_record("b", 4, 5), make_record("c", 2, 4, state="offline")]
    assert missing_blocks(spans, NUM_BLOCKS) == [2, 3, 5]


def test_latest_announcement_of_a_node_wins(swarm: Swarm, model_key: str) -> None:
    announce_span(swarm.peer_a, model_key, make_record("mover", 0, 3), ttl=30)
    moved = make_record("mover", 2, 6)
    announce_span(swarm.peer_a, model_key, moved, ttl=30)
    assert fetch_spans(swarm.peer_b, model_key, NUM_BLOCKS) == {"mover": moved}


def test_withdraw_makes_lookups_stop_returning_the_node(swarm: Swarm, model_key: str) -> None:
    leaving, staying = make_record("leaving", 0, 3), make_record("staying", 3, 6)
    announce_span(swarm.peer_a, model_key, leaving, ttl=30)
    announce_span(swarm.peer_a, model_key, staying, ttl=30)
    withdraw_span(swarm.peer_a, model_key, leaving)
    assert fetch_spans(swarm.peer_b, model_key, NUM_BLOCKS) == {"staying": staying}


def test_record_expires_after_its_ttl_without_refresh(swarm: Swarm, model_key: str) -> None:
    announce_span(swarm.peer_a, model_key, make_record("short-lived"), ttl=2)
    assert "short-lived" in fetch_spans(swarm.peer_b, model_key, NUM_BLOCKS)
    assert wait_until(lambda: not fetch_spans(swarm.peer_b, model_key, NUM_BLOCKS))


def test_announcer_refreshes_record_past_its_ttl(swarm: Swarm, model_key: str) -> None:
    announcer = Announcer(swarm.peer_a, model_key, lambda: make_record("refreshed"), ttl=2, period=0.5)
    announcer.start()
    try:
        time.sleep(4)
        assert "refreshed" in fetch_spans(swarm.peer_b, model_key, NUM_BLOCKS)
    finally:
        announcer.stop()


def test_announcer_stop_withdraws_the_record(swarm: Swarm, model_key: str) -> None:
    announcer = Announcer(swarm.peer_a, model_key, lambda: make_record("stopping"), ttl=30)
    announcer.start()
    assert "stopping" in fetch_spans(swarm.peer_b, model_key, NUM_BLOCKS)
    announcer.stop()
    assert fetch_spans(swarm.peer_b, model_key, NUM_BLOCKS) == {}


def test_announce_now_publishes_the_current_record(swarm: Swarm, model_key: str) -> None:
    free = [4096]
    announcer = Announcer(swarm.peer_a, model_key, lambda: make_record("busy", cache_tokens_free=free[0]), ttl=30)
    announcer.start()
    try:
        free[0] = 128
        announcer.announce_now()
        assert wait_until(lambda: fetch_spans(swarm.peer_b, model_key, NUM_BLOCKS)["busy"].cache_tokens_free == 128)
    finally:
        announcer.stop()


def test_malformed_values_are_skipped_and_valid_ones_returned(swarm: Swarm, model_key: str) -> None:
    good = make_record("good")
    announce_span(swarm.peer_a, model_key, good, ttl=30)
    expiration = get_dht_time() + 30
    bad_values = {"no-dict": "garbage", "bad-range": {**good.to_dict(), "start": 5, "end": 1}}
    for subkey, value in bad_values.items():
        assert swarm.peer_a.store(block_key(model_key, 0), value, expiration, subkey=subkey)
    assert swarm.peer_a.store(block_key(model_key, 1), ["not", "records"], expiration + 1)  # plain value, no subkey
    assert fetch_spans(swarm.peer_b, model_key, NUM_BLOCKS) == {"good": good}


def test_start_dht_with_bogus_initial_peer_raises_swarm_error() -> None:
    bogus = "/ip4/127.0.0.1/tcp/1/p2p/QmXfptdHU6hqG95JswxYVUH4bphcK8y18mhFcgUQFe6fCN"
    with pytest.raises(SwarmError, match="--initial-peers"):
        start_dht([bogus])
