"""Load-aware routing on a real swarm: sessions spread over the replicas that serve the same blocks, by what the
client has open itself and by the load other clients' sessions put in the nodes' DHT records."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from hivegen.client import RemoteModelForCausalLM
from hivegen.client.session import InferenceSession
from hivegen.cluster import LocalCluster
from hivegen.dht import fetch_spans
from tests.conftest import ClusterFactory, TinyFactory, wait_for
from tests.wire import node_infos

SPANS = [(0, 3), (0, 3), (3, 6), (3, 6)]  # two replicas of each half
MAX_LENGTH = 32


@pytest.fixture(scope="module")
def model_path(tiny_model: TinyFactory) -> Path:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def cluster(model_path: Path, start_cluster: ClusterFactory) -> LocalCluster:
    return start_cluster(model_path, spans=SPANS)


@pytest.fixture
def models(model_path: Path, cluster: LocalCluster) -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack
    wait_for(lambda: all(n.active_sessions == 0 for n in node_infos(cluster)), 30, "every session to close")


def open_model(stack: ExitStack, model_path: Path, cluster: LocalCluster, **kwargs: object) -> RemoteModelForCausalLM:
    return stack.enter_context(
        RemoteModelForCausalLM.from_pretrained(model_path, cluster.initial_peers, verify="off", **kwargs)
    )


def hold_sessions(stack: ExitStack, model: RemoteModelForCausalLM, count: int) -> None:
    for _ in range(count):
        stack.enter_context(InferenceSession(model.swarm, MAX_LENGTH, 1))


def test_one_client_spreads_its_sessions_over_the_replicas(
    model_path: Path, cluster: LocalCluster, models: ExitStack
) -> None:
    model = open_model(models, model_path, cluster)
    hold_sessions(models, model, 8)
    active = [n.active_sessions for n in node_infos(cluster)]
    assert active[0] + active[1] == 8 and active[2] + active[3] == 8, active
    assert min(active) >= 2, f"sessions per node {active}: one replica took (nearly) all of them"


def test_a_new_client_avoids_the_replicas_other_clients_load(
    model_path: Path, cluster: LocalCluster, models: ExitStack
) -> None:
    first, second = cluster.nodes[0], cluster.nodes[2]
    # Someone else's sessions, all on one replica of each half: the new client only learns of them from the DHT.
    busy = open_model(models, model_path, cluster, allowed_nodes=[first.node_id, second.node_id])
    hold_sessions(models, busy, 12)
    wait_for(
        lambda: all(
            s.active_sessions == 12
            for node, s in fetch_spans(busy.swarm.dht, busy.swarm.model_key, 6).items()
            if node in (first.node_id, second.node_id)
        ),
        30,
        "the busy nodes' records to show their load",
    )
    newcomer = open_model(models, model_path, cluster)
    hold_sessions(models, newcomer, 4)
    active = [n.active_sessions for n in node_infos(cluster)]
    assert active == [12, 4, 12, 4], f"sessions per node {active}: the newcomer's went to the loaded replicas"
