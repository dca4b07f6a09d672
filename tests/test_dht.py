"""DHT records, announcements and lookups, on a real three-peer hivemind swarm on 127.0.0.1.

Records are owner-signed: the honest peers run hivegen's validator; `raw_peer` is a plain hivemind peer with no
validator, i.e. what an attacker runs, which tries to overwrite, forge and replay records.
"""

from __future__ import annotations

import dataclasses
import pickle
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import hivemind
import pytest
from hivemind.dht.routing import DHTID
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer, get_dht_time

from hivegen.credits.identity import Identity
from hivegen.dht import (
    Announcer,
    ModelInfo,
    OwnerSignatureValidator,
    SpanRecord,
    SwarmError,
    announce_model,
    announce_span,
    block_key,
    fetch_models,
    fetch_spans,
    missing_blocks,
    node_id,
    owned_subkey,
    sign_value,
    start_dht,
    verify_value,
    visible_maddrs,
    withdraw_span,
)
from hivegen.dht.models import MODELS_KEY
from hivegen.dht.signing import dht_key_id, signed_bytes
from hivegen.dht.swarm import LOCAL_P2P_FLAGS, run_on_dht

NUM_BLOCKS = 6
OWNER = Identity.generate()  # owns the records of most tests; each test uses its own model key


@dataclass
class Swarm:
    bootstrap: hivemind.DHT
    peer_a: hivemind.DHT
    peer_b: hivemind.DHT

    @property
    def honest(self) -> list[hivemind.DHT]:
        return [self.bootstrap, self.peer_a, self.peer_b]


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


@pytest.fixture(scope="module")
def raw_peer(swarm: Swarm) -> Iterator[hivemind.DHT]:
    """A plain hivemind peer without hivegen's validator, connected to every honest peer."""
    peers = [maddr for dht in swarm.honest for maddr in visible_maddrs(dht)]
    dht = hivemind.DHT(initial_peers=peers, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], **LOCAL_P2P_FLAGS)
    try:
        yield dht
    finally:
        dht.shutdown()


@pytest.fixture
def model_key() -> str:
    """A fresh model key per test, so tests sharing the swarm never see each other's records."""
    return f"test-model-{uuid.uuid4().hex[:8]}"


def nid(name: str, owner: Identity = OWNER) -> str:
    """A node id with a readable peer-id part."""
    return owned_subkey(name, owner.public_key_hex)


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


def forge(signer: Identity, key: str, subkey: str, value: dict[str, Any], expiration: float) -> dict[str, Any]:
    """`value` signed by `signer`, whoever owns `subkey` (what sign_value refuses to do)."""
    return {**value, "sig": signer.sign(signed_bytes(dht_key_id(key), subkey, value, expiration)).hex()}


async def _store_at(
    _dht: Any, node: Any, *, peers: list[str], key: str, subkey: str | None, value: Any, expiration: float
) -> list[list[bool] | None]:
    """Runs in the raw peer's DHT process: ask each peer, one by one, to store the entry."""
    results = []
    for peer in peers:
        stored = await node.protocol.call_store(
            PeerID.from_base58(peer),
            [DHTID.generate(source=key)],
            [MSGPackSerializer.dumps(value)],
            [expiration],
            subkeys=[subkey],
        )
        results.append(None if stored is None else [bool(ok) for ok in stored])
    return results


def store_at_honest_peers(
    raw: hivemind.DHT, swarm: Swarm, key: str, subkey: str | None, value: Any, expiration: float
) -> list[list[bool] | None]:
    """What each honest peer answers when the raw peer asks it directly to store the entry."""
    peers = [dht.peer_id.to_base58() for dht in swarm.honest]
    coro = partial(_store_at, peers=peers, key=key, subkey=subkey, value=value, expiration=expiration)
    return run_on_dht(raw, coro)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


# --- records and signatures, no swarm --------------------------------------------------------------------------


def test_record_round_trips_through_dict() -> None:
    record = make_record(nid("node1"), 3, 7, state="offline")
    assert SpanRecord.from_dict(record.node_id, record.to_dict()) == record


def test_record_owner_is_the_public_key_in_its_node_id() -> None:
    assert make_record(nid("Qm1")).owner == OWNER.public_key_hex


@pytest.mark.parametrize(
    "bad_id",
    ["node-1", "", f"@{OWNER.public_key_hex}", f"Qm1@{OWNER.public_key_hex.upper()}", f"Qm 1@{OWNER.public_key_hex}",
     f"Qm1@{OWNER.public_key_hex[:-2]}", f"Qm1@{OWNER.public_key_hex}@"],
)  # fmt: skip
def test_record_rejects_a_node_id_without_an_owner_key(bad_id: str) -> None:
    with pytest.raises(ValueError, match="is not '<peer id>@<64 hex public key>'"):
        make_record(bad_id)


def test_block_key_names_model_and_block() -> None:
    assert block_key("smollm2-135m", 4) == "smollm2-135m.block.4"


VALID = make_record(nid("n")).to_dict()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1, 2], "must be a dict"),
        ({k: v for k, v in VALID.items() if k != "address"}, "missing field 'address'"),
        ({**VALID, "start": "0"}, "field 'start' must be int"),
        ({**VALID, "end": True}, "field 'end' must be int"),
        ({**VALID, "throughput": "fast"}, "field 'throughput' must be float"),
        ({**VALID, "start": 4, "end": 4}, "start 4 >= end 4"),
        ({**VALID, "start": -1}, "negative start"),
        ({**VALID, "cache_tokens_free": -5}, "negative cache_tokens_free"),
        ({**VALID, "throughput": 0.0}, "positive number"),
        ({**VALID, "state": "sleeping"}, "unknown state 'sleeping'"),
        ({**VALID, "address": "localhost"}, "not host:port"),
    ],
)
def test_from_dict_rejects_malformed_data_with_specific_message(data: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SpanRecord.from_dict(nid("n"), data)


def test_signature_covers_key_subkey_value_and_expiration() -> None:
    key, subkey, expiration = "m.block.0", nid("n"), 1000.5
    signed = sign_value(OWNER, key, subkey, VALID, expiration)
    assert verify_value(dht_key_id(key), subkey, signed, expiration)
    assert not verify_value(dht_key_id("m.block.1"), subkey, signed, expiration)
    assert not verify_value(dht_key_id(key), nid("other"), signed, expiration)
    assert not verify_value(dht_key_id(key), subkey, {**signed, "address": "10.0.0.1:1"}, expiration)
    assert not verify_value(dht_key_id(key), subkey, signed, expiration + 1)
    assert not verify_value(dht_key_id(key), subkey, VALID, expiration)  # unsigned


def test_nobody_signs_under_a_subkey_owned_by_another_key() -> None:
    with pytest.raises(ValueError, match="not owned by this identity"):
        sign_value(Identity.generate(), "m.block.0", nid("n"), VALID, 1000.0)


def test_validator_holds_no_key_so_it_pickles_into_the_dht_process() -> None:
    assert isinstance(pickle.loads(pickle.dumps(OwnerSignatureValidator())), OwnerSignatureValidator)


def test_missing_blocks_names_blocks_no_online_span_covers() -> None:
    spans = [make_record(nid("a"), 0, 2), make_record(nid("b"), 4, 5), make_record(nid("c"), 2, 4, state="offline")]
    assert missing_blocks(spans, NUM_BLOCKS) == [2, 3, 5]


# --- honest announcements -----------------------------------------------------------------------------------------


def test_node_id_joins_the_peer_id_and_the_owner_key(swarm: Swarm) -> None:
    assert node_id(swarm.peer_a, OWNER.public_key_hex) == f"{swarm.peer_a.peer_id.to_base58()}@{OWNER.public_key_hex}"


def test_record_signed_by_its_owner_is_stored_and_read_back(swarm: Swarm, model_key: str) -> None:
    record = make_record(node_id(swarm.peer_a, OWNER.public_key_hex))
    announce_span(swarm.peer_a, model_key, record, ttl=30, identity=OWNER)
    spans = fetch_spans(swarm.peer_b, model_key, NUM_BLOCKS)
    assert spans == {record.node_id: record}
    assert spans[record.node_id].owner == OWNER.public_key_hex
    assert missing_blocks(spans.values(), NUM_BLOCKS) == []


def test_announcing_a_record_owned_by_another_key_fails(swarm: Swarm, model_key: str) -> None:
    with pytest.raises(ValueError, match="not by this identity"):
        announce_span(swarm.peer_a, model_key, make_record(nid("n")), ttl=30, identity=Identity.generate())


def test_one_owner_may_run_several_nodes(swarm: Swarm, model_key: str) -> None:
    first, second = make_record(nid("first"), 0, 3), make_record(nid("second"), 3, 6)
    announce_span(swarm.peer_a, model_key, first, ttl=30, identity=OWNER)
    announce_span(swarm.peer_b, model_key, second, ttl=30, identity=OWNER)
    assert fetch_spans(swarm.bootstrap, model_key, NUM_BLOCKS) == {first.node_id: first, second.node_id: second}


def test_latest_announcement_of_a_node_wins(swarm: Swarm, model_key: str) -> None:
    announce_span(swarm.peer_a, model_key, make_record(nid("mover"), 0, 3), ttl=30, identity=OWNER)
    moved = make_record(nid("mover"), 2, 6)
    announce_span(swarm.peer_a, model_key, moved, ttl=30, identity=OWNER)
    assert fetch_spans(swarm.peer_b, model_key, NUM_BLOCKS) == {moved.node_id: moved}


def test_withdrawal_signed_by_the_owner_makes_lookups_stop_returning_the_node(swarm: Swarm, model_key: str) -> None:
    leaving, staying = make_record(nid("leaving"), 0, 3), make_record(nid("staying"), 3, 6)
    announce_span(swarm.peer_a, model_key, leaving, ttl=30, identity=OWNER)
    announce_span(swarm.peer_a, model_key, staying, ttl=30, identity=OWNER)
    withdraw_span(swarm.peer_a, model_key, leaving, identity=OWNER)
    assert fetch_spans(swarm.peer_b, model_key, NUM_BLOCKS) == {staying.node_id: staying}


def test_record_expires_after_its_ttl_without_refresh(swarm: Swarm, model_key: str) -> None:
    announce_span(swarm.peer_a, model_key, make_record(nid("shortlived")), ttl=2, identity=OWNER)
    assert nid("shortlived") in fetch_spans(swarm.peer_b, model_key, NUM_BLOCKS)
    assert wait_until(lambda: not fetch_spans(swarm.peer_b, model_key, NUM_BLOCKS))


def test_announcer_refreshes_record_past_its_ttl(swarm: Swarm, model_key: str) -> None:
    announcer = Announcer(swarm.peer_a, model_key, lambda: make_record(nid("refreshed")), OWNER, ttl=2, period=0.5)
    announcer.start()
    try:
        time.sleep(4)
        assert nid("refreshed") in fetch_spans(swarm.peer_b, model_key, NUM_BLOCKS)
    finally:
        announcer.stop()


def test_announcer_stop_withdraws_the_record(swarm: Swarm, model_key: str) -> None:
    announcer = Announcer(swarm.peer_a, model_key, lambda: make_record(nid("stopping")), OWNER, ttl=30)
    announcer.start()
    assert nid("stopping") in fetch_spans(swarm.peer_b, model_key, NUM_BLOCKS)
    announcer.stop()
    assert fetch_spans(swarm.peer_b, model_key, NUM_BLOCKS) == {}


def test_announce_now_publishes_the_current_record(swarm: Swarm, model_key: str) -> None:
    free = [4096]
    busy = nid("busy")
    announcer = Announcer(swarm.peer_a, model_key, lambda: make_record(busy, cache_tokens_free=free[0]), OWNER, ttl=30)
    announcer.start()
    try:
        free[0] = 128
        announcer.announce_now()
        assert wait_until(lambda: fetch_spans(swarm.peer_b, model_key, NUM_BLOCKS)[busy].cache_tokens_free == 128)
    finally:
        announcer.stop()


def test_signed_but_malformed_values_are_skipped_and_valid_ones_returned(swarm: Swarm, model_key: str) -> None:
    good = make_record(nid("good"))
    announce_span(swarm.peer_a, model_key, good, ttl=30, identity=OWNER)
    key, expiration = block_key(model_key, 0), get_dht_time() + 30
    for subkey, value in {nid("badrange"): {**good.to_dict(), "start": 5, "end": 1}, nid("nofields"): {}}.items():
        assert swarm.peer_a.store(key, sign_value(OWNER, key, subkey, value, expiration), expiration, subkey=subkey)
    assert fetch_spans(swarm.peer_b, model_key, NUM_BLOCKS) == {good.node_id: good}


def test_honest_peers_refuse_plain_values_and_unowned_subkeys(swarm: Swarm, model_key: str) -> None:
    key, expiration = block_key(model_key, 1), get_dht_time() + 30
    assert not swarm.peer_a.store(key, ["not", "records"], expiration)
    assert not swarm.peer_a.store(key, VALID, expiration, subkey="plain-subkey")


# --- a raw hivemind peer attacks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("forgery", ["later_expiration", "changed_address", "marked_offline", "unsigned_offline"])
def test_raw_peer_cannot_overwrite_a_live_record(
    swarm: Swarm, raw_peer: hivemind.DHT, model_key: str, forgery: str
) -> None:
    victim = make_record(nid("victim"), 0, 1, address="127.0.0.1:7000")  # one block: its only entry is attacked
    announce_span(swarm.peer_a, model_key, victim, ttl=30, identity=OWNER)
    key = block_key(model_key, 0)
    genuine = raw_peer.get(key, latest=True).value[victim.node_id]  # what the attacker can read and replay
    later = genuine.expiration_time + 60
    value = {
        "later_expiration": genuine.value,
        "changed_address": {**genuine.value, "address": "10.66.6.6:666"},
        "marked_offline": {**genuine.value, "state": "offline"},
        "unsigned_offline": dataclasses.replace(victim, state="offline").to_dict(),
    }[forgery]
    assert store_at_honest_peers(raw_peer, swarm, key, victim.node_id, value, later) == [[False]] * 3
    raw_peer.store(key, value, later, subkey=victim.node_id)  # the usual way too: nearest peers, caches
    for reader in swarm.honest:
        assert fetch_spans(reader, model_key, NUM_BLOCKS) == {victim.node_id: victim}


@pytest.mark.parametrize(
    "forgery", ["signed_by_another_key", "unsigned", "replayed_on_another_block", "replayed_later"]
)
def test_raw_peer_records_under_a_fresh_owner_key_need_that_keys_signature(
    swarm: Swarm, raw_peer: hivemind.DHT, model_key: str, forgery: str
) -> None:
    attacker = Identity.generate()
    subkey, record = nid("fresh", attacker), make_record(nid("fresh", attacker)).to_dict()
    key, expiration = block_key(model_key, 0), get_dht_time() + 30
    signed_for_block_1 = sign_value(attacker, block_key(model_key, 1), subkey, record, expiration)
    key, value, expiration = {
        "signed_by_another_key": (key, forge(Identity.generate(), key, subkey, record, expiration), expiration),
        "unsigned": (key, record, expiration),
        "replayed_on_another_block": (key, signed_for_block_1, expiration),
        "replayed_later": (block_key(model_key, 1), signed_for_block_1, expiration + 60),
    }[forgery]
    assert store_at_honest_peers(raw_peer, swarm, key, subkey, value, expiration) == [[False]] * 3
    raw_peer.store(key, value, expiration, subkey=subkey)
    assert fetch_spans(swarm.peer_b, model_key, NUM_BLOCKS) == {}
    assert fetch_spans(raw_peer, model_key, NUM_BLOCKS) == {}  # lookups re-verify: safe even without the validator


def test_withdrawal_forged_by_someone_else_does_not_hide_the_node(
    swarm: Swarm, raw_peer: hivemind.DHT, model_key: str
) -> None:
    victim = make_record(nid("victim"), 0, 1)
    announce_span(swarm.peer_a, model_key, victim, ttl=30, identity=OWNER)
    attacker = Identity.generate()
    with pytest.raises(ValueError, match="not by this identity"):
        withdraw_span(raw_peer, model_key, victim, identity=attacker)
    key, later = block_key(model_key, 0), get_dht_time() + 90
    offline = forge(attacker, key, victim.node_id, dataclasses.replace(victim, state="offline").to_dict(), later)
    assert store_at_honest_peers(raw_peer, swarm, key, victim.node_id, offline, later) == [[False]] * 3
    raw_peer.store(key, offline, later, subkey=victim.node_id)
    assert fetch_spans(swarm.peer_b, model_key, NUM_BLOCKS) == {victim.node_id: victim}


def test_attacker_with_its_own_key_can_announce_its_own_records(
    swarm: Swarm, raw_peer: hivemind.DHT, model_key: str
) -> None:
    attacker = Identity.generate()
    liar = make_record(node_id(raw_peer, attacker.public_key_hex), throughput=1e6)  # routing deals with liars
    announce_span(raw_peer, model_key, liar, ttl=30, identity=attacker)
    assert fetch_spans(swarm.peer_b, model_key, NUM_BLOCKS) == {liar.node_id: liar}
    assert liar.owner == attacker.public_key_hex


# --- the model registry -------------------------------------------------------------------------------------------


def test_model_registry_ignores_unsigned_and_wrongly_signed_entries(
    swarm: Swarm, raw_peer: hivemind.DHT, model_key: str
) -> None:
    info = ModelInfo(model_key, "tiny", NUM_BLOCKS)
    assert announce_model(swarm.peer_a, info, ttl=30, identity=OWNER)
    attacker, expiration = Identity.generate(), get_dht_time() + 30
    fake = {"name": "fake", "num_blocks": 3}
    forgeries = {
        owned_subkey(f"{model_key}-unsigned", attacker.public_key_hex): fake,
        owned_subkey(f"{model_key}-wrongkey", attacker.public_key_hex): forge(
            Identity.generate(), MODELS_KEY, owned_subkey(f"{model_key}-wrongkey", attacker.public_key_hex),
            fake, expiration,
        ),
        owned_subkey(model_key, attacker.public_key_hex): {**fake, "sig": "00" * 64},
        f"{model_key}-plain": fake,
    }  # fmt: skip
    for subkey, value in forgeries.items():
        assert store_at_honest_peers(raw_peer, swarm, MODELS_KEY, subkey, value, expiration) == [[False]] * 3
        raw_peer.store(MODELS_KEY, value, expiration, subkey=subkey)
    for reader in [swarm.peer_b, raw_peer]:  # the raw peer holds the forgeries itself: fetch_models re-verifies
        models = fetch_models(reader)
        assert models[model_key] == info
        assert not [key for key in models if key.startswith(model_key) and key != model_key]


def test_model_registry_keeps_what_most_owners_say(swarm: Swarm, model_key: str) -> None:
    info = ModelInfo(model_key, "tiny", NUM_BLOCKS)
    assert announce_model(swarm.peer_a, info, ttl=30, identity=OWNER)
    assert announce_model(swarm.peer_b, info, ttl=30, identity=Identity.generate())
    assert announce_model(swarm.peer_a, ModelInfo(model_key, "lie", 1000), ttl=60, identity=Identity.generate())
    assert fetch_models(swarm.bootstrap)[model_key] == info


def test_start_dht_with_bogus_initial_peer_raises_swarm_error() -> None:
    bogus = "/ip4/127.0.0.1/tcp/1/p2p/QmXfptdHU6hqG95JswxYVUH4bphcK8y18mhFcgUQFe6fCN"
    with pytest.raises(SwarmError, match="--initial-peers"):
        start_dht([bogus])
