"""Records that lie about where and how fast a node is cannot stop a generation while honest nodes cover every
block: a stranger with its own valid key announces spans at closed ports and black holes, claiming a huge
throughput, on a real cluster."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import hivemind
import pytest
import torch

from hivegen.client import RemoteModelForCausalLM
from hivegen.cluster import LocalCluster
from hivegen.credits.identity import Identity
from hivegen.dht import SpanRecord, announce_span, fetch_spans, node_id, start_dht
from hivegen.errors import NoRouteError
from tests.conftest import ClusterFactory, TinyFactory, greedy_reference, wait_for

PROMPT = [7, 3, 11, 19, 23]
NEW = 6


@pytest.fixture(scope="module")
def model_path(tiny_model: TinyFactory) -> Path:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def cluster(model_path: Path, start_cluster: ClusterFactory) -> LocalCluster:
    return start_cluster(model_path, spans=[(0, 3), (3, 6)])


@pytest.fixture(scope="module")
def expected(model_path: Path) -> list[int]:
    return greedy_reference(model_path, PROMPT, NEW)


@pytest.fixture(scope="module")
def attacker(cluster: LocalCluster) -> Iterator[hivemind.DHT]:
    dht = start_dht(cluster.initial_peers)
    try:
        yield dht
    finally:
        dht.shutdown()


@pytest.fixture
def black_hole() -> Iterator[str]:
    """An address that accepts TCP connections and then never says a word (a hung or malicious peer)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"  # closed again when this returns


def announce_fake(attacker: hivemind.DHT, cluster: LocalCluster, address: str, start: int = 0, end: int = 6) -> str:
    """Announce a record signed by a fresh key of the attacker's: valid, but lying about everything."""
    identity = Identity.generate()
    record = SpanRecord(
        node_id=node_id(attacker, identity.public_key_hex),
        address=address,
        start=start,
        end=end,
        throughput=1e9,
        cache_tokens_free=1 << 30,
        dtype="float32",
        version="9.9.9",
    )
    announce_span(attacker, cluster.model_key, record, ttl=120.0, identity=identity)
    return record.node_id


def generate(model: RemoteModelForCausalLM) -> list[int]:
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, do_sample=False, eos_token_id=[])
    return list(out[0, len(PROMPT) :].tolist())


def test_eight_fake_fast_records_do_not_stop_a_generation(
    cluster: LocalCluster, attacker: hivemind.DHT, expected: list[int], model_path: Path, black_hole: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    fakes = [announce_fake(attacker, cluster, closed_port()) for _ in range(4)]
    fakes += [announce_fake(attacker, cluster, black_hole, *span) for span in [(0, 6), (0, 3), (3, 6), (0, 6)]]
    assert cluster.dht is not None
    wait_for(lambda: set(fakes) <= set(fetch_spans(cluster.dht, cluster.model_key, 6)), 30, "the fake records")
    with RemoteModelForCausalLM.from_pretrained(
        model_path, cluster.initial_peers, bans=tmp_path / "bans.json", verify="off"
    ) as model:
        assert generate(model) == expected
        failed = {f for f in fakes if (h := model.swarm.health.get(f)) is not None and h.failures}
        assert model.swarm.health.excluded() >= failed and failed  # tried once, then left alone
        assert generate(model) == expected  # the next generation does not try them again
        assert all(model.swarm.health.get(f) is None or model.swarm.health.get(f).failures <= 1 for f in fakes)  # type: ignore[union-attr]
    assert {h.node_id for h in model.last_route} <= {n.node_id for n in cluster.nodes}


def test_a_black_hole_costs_one_open_deadline(
    cluster: LocalCluster, attacker: hivemind.DHT, expected: list[int], model_path: Path, black_hole: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    fake = announce_fake(attacker, cluster, black_hole)
    assert cluster.dht is not None
    wait_for(lambda: fake in fetch_spans(cluster.dht, cluster.model_key, 6), 30, "the fake record")
    with RemoteModelForCausalLM.from_pretrained(
        model_path, cluster.initial_peers, bans=tmp_path / "bans.json", verify="off"
    ) as model:
        assert generate(model) == expected
        health = model.swarm.health.get(fake)
    assert health is not None and "DEADLINE_EXCEEDED" in health.last_error and "2.0 s" in health.last_error


def test_a_dead_nodes_blocks_with_no_replacement_are_reported_at_once(
    cluster: LocalCluster, model_path: Path, tmp_path: Path
) -> None:
    only_head = [cluster.nodes[0].node_id, cluster.nodes[1].node_id]
    with RemoteModelForCausalLM.from_pretrained(
        model_path, cluster.initial_peers, bans=tmp_path / "bans.json", allowed_nodes=only_head, route_wait=10.0
    ) as model:
        session = model.inference_session(max_length=16)
        session.spans[1].close()  # the tail node's stream breaks: as if it died; nobody else serves 3:6
        model.swarm.allowed_nodes = {cluster.nodes[0].node_id}
        began = time.monotonic()
        with pytest.raises(NoRouteError) as error:
            session.step(model.head.embed(torch.tensor([PROMPT])), torch.arange(len(PROMPT))[None],
                         torch.ones(1, len(PROMPT), dtype=torch.int64))  # fmt: skip
        elapsed = time.monotonic() - began
        session.close()
    assert error.value.missing_blocks == [3, 4, 5]
    assert elapsed < 5.0  # not route_wait (10 s): waiting only makes sense for nodes that are starting up
