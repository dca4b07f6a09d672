"""End to end on one real cluster with overlapping spans: routing, isolation, streaming, sampling, fail-over."""

from __future__ import annotations

import queue
import signal
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from hivegen.client import RemoteModelForCausalLM
from hivegen.cluster import LocalCluster
from hivegen.errors import NoRouteError
from hivegen.proto import node_pb2, node_pb2_grpc
from tests.conftest import ClusterFactory, TinyFactory

SPANS = [(0, 6), (0, 3), (3, 6)]
# Every node advertises the same speed: timed at start beside the others starting, one could claim to be several
# times slower than it is, and which chain is cheapest would depend on that draw, not on the hops.
THROUGHPUT = "200"


@pytest.fixture(scope="module")
def model_path(tiny_model: TinyFactory) -> Path:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def cluster(model_path: Path, start_cluster: ClusterFactory) -> LocalCluster:
    return start_cluster(model_path, spans=SPANS, node_args=["--throughput", THROUGHPUT])


@pytest.fixture(scope="module")
def reference(model_path: Path) -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa", dtype=torch.float32)


def prompt(seed: int, length: int = 10) -> torch.Tensor:
    return torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(seed))


def greedy_reference(reference: AutoModelForCausalLM, input_ids: torch.Tensor, new: int) -> list[int]:
    out = reference.generate(
        input_ids=input_ids, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0].tolist()


def test_overlapping_spans_route_through_the_single_full_node(cluster: LocalCluster, model_path: Path) -> None:
    """Equal claims: one hop beats two (RoutingCosts.hop_seconds outweighs the random spread of compute times)."""
    with RemoteModelForCausalLM.from_pretrained(model_path, cluster.initial_peers) as model:
        model.generate(prompt(0), max_new_tokens=2, do_sample=False)
        route = model.last_route
        claims = {span.throughput for span in model.swarm.spans().values()}
    assert claims == {float(THROUGHPUT)}  # --throughput is what the records advertise
    assert [(h.node_id, h.start, h.end) for h in route] == [(cluster.nodes[0].node_id, 0, 6)]


def test_unserved_blocks_raise_no_route_error(cluster: LocalCluster, model_path: Path) -> None:
    only_tail = [cluster.nodes[2].node_id]  # serves 3:6
    with (
        RemoteModelForCausalLM.from_pretrained(
            model_path, cluster.initial_peers, allowed_nodes=only_tail, route_wait=0
        ) as model,
        pytest.raises(NoRouteError) as info,
    ):
        model.generate(prompt(0), max_new_tokens=2)
    assert info.value.missing_blocks == [0, 1, 2]


def test_node_holds_only_its_blocks_parameters(cluster: LocalCluster, reference: AutoModelForCausalLM) -> None:
    layers = reference.model.layers
    for node in cluster.nodes:
        with grpc.insecure_channel(node.address) as channel:
            info = node_pb2_grpc.NodeStub(channel).Info(node_pb2.InfoRequest(), timeout=10)
        start, end = node.blocks
        expected = sum(p.numel() for i in range(start, end) for p in layers[i].parameters())
        assert (info.start_block, info.end_block) == (start, end)
        assert info.num_parameters == expected


def test_concurrent_clients_get_their_own_exact_outputs(
    cluster: LocalCluster, model_path: Path, reference: AutoModelForCausalLM
) -> None:
    prompts = [prompt(1, 9), prompt(2, 14)]
    expected = [greedy_reference(reference, p, 24) for p in prompts]
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(prompts))

    def run(index: int) -> None:
        try:
            with RemoteModelForCausalLM.from_pretrained(model_path, cluster.initial_peers) as model:
                barrier.wait()
                out = model.generate(prompts[index], max_new_tokens=24, do_sample=False, eos_token_id=[])
                results[index] = out[0].tolist()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert [results[0], results[1]] == expected


def test_streamed_tokens_equal_generated_tokens(cluster: LocalCluster, model_path: Path) -> None:
    class Collect:
        def __init__(self) -> None:
            self.chunks: list[list[int]] = []
            self.ended = False

        def put(self, value: torch.Tensor) -> None:
            self.chunks.append(value.reshape(-1).tolist())

        def end(self) -> None:
            self.ended = True

    streamer = Collect()
    with RemoteModelForCausalLM.from_pretrained(model_path, cluster.initial_peers) as model:
        out = model.generate(prompt(3), max_new_tokens=8, do_sample=False, eos_token_id=[], streamer=streamer)
        streamed = [
            int(t) for t in model.generate_stream(prompt(3), max_new_tokens=8, do_sample=False, eos_token_id=[])
        ]
    assert streamer.chunks[0] == prompt(3)[0].tolist()
    assert sum(streamer.chunks[1:], []) == out[0, 10:].tolist() == streamed  # noqa: RUF017 - a few short lists
    assert streamer.ended


def test_sampling_with_a_seed_is_reproducible(cluster: LocalCluster, model_path: Path) -> None:
    kwargs = {
        "max_new_tokens": 16,
        "do_sample": True,
        "temperature": 1.5,
        "top_k": 50,
        "top_p": 0.95,
        "eos_token_id": [],
    }
    with RemoteModelForCausalLM.from_pretrained(model_path, cluster.initial_peers) as model:
        first = model.generate(prompt(4), seed=7, **kwargs)
        again = model.generate(prompt(4), seed=7, **kwargs)
        other = model.generate(prompt(4), seed=8, **kwargs)
    assert first.tolist() == again.tolist()
    assert first.tolist() != other.tolist()


def test_full_node_refuses_the_session_and_is_routed_around(
    cluster: LocalCluster, model_path: Path, reference: AutoModelForCausalLM
) -> None:
    """The client's (cached) view says the full node has room; it refuses at open, and the client re-routes."""
    full = cluster.nodes[0]
    channel = grpc.insecure_channel(full.address)
    stub = node_pb2_grpc.NodeStub(channel)
    info = stub.Info(node_pb2.InfoRequest(), timeout=10)
    hogs: list[queue.Queue[node_pb2.InferenceRequest | None]] = []
    streams = []
    with RemoteModelForCausalLM.from_pretrained(model_path, cluster.initial_peers, spans_ttl=600) as model:
        model.swarm.spans()  # cache the view while the node still advertises free cache
        per_session = 64 * 256  # the largest session the tiny model allows
        for i in range(info.cache_tokens_free // per_session):
            requests: queue.Queue[node_pb2.InferenceRequest | None] = queue.Queue()
            requests.put(node_pb2.InferenceRequest(open=node_pb2.OpenSession(
                session_id=f"hog-{i}", model_key=cluster.model_key, start_block=0, end_block=6,
                max_length=256, batch_size=64)))  # fmt: skip
            stream = stub.Inference(iter(requests.get, None), timeout=120)
            next(stream)  # opened
            hogs.append(requests)
            streams.append(stream)
        try:
            out = model.generate(prompt(6), max_new_tokens=8, do_sample=False, eos_token_id=[])
            route = model.last_route
        finally:
            for requests in hogs:
                requests.put(None)
            for stream in streams:
                stream.cancel()
            channel.close()
    assert [(h.start, h.end) for h in route] == [(0, 3), (3, 6)]
    assert out[0].tolist() == greedy_reference(reference, prompt(6), 8)
    with grpc.insecure_channel(full.address) as check:
        after = node_pb2_grpc.NodeStub(check).Info(node_pb2.InfoRequest(), timeout=10)
    assert after.counters.errors > info.counters.errors  # it did refuse the open


def test_killed_node_is_replaced_and_tokens_are_unchanged(
    cluster: LocalCluster, model_path: Path, reference: AutoModelForCausalLM
) -> None:
    """Runs last: it kills the full node mid-generation; the client re-routes over 0:3 + 3:6 and replays."""
    expected = greedy_reference(reference, prompt(5), 16)[10:]
    tokens: list[int] = []
    with RemoteModelForCausalLM.from_pretrained(model_path, cluster.initial_peers) as model:
        for token in model.generate_stream(prompt(5), max_new_tokens=16, do_sample=False, eos_token_id=[]):
            tokens.append(int(token))
            if len(tokens) == 5:
                doomed = [cluster.nodes[0].pid, *(c.pid for c in psutil.Process(cluster.nodes[0].pid).children(True))]
                cluster.stop_node(0, signal.SIGKILL)
        route = model.last_route
    assert tokens == expected
    assert [(h.start, h.end) for h in route] == [(0, 3), (3, 6)]
    assert len(doomed) >= 3  # the node, its DHT process and that one's p2pd
    deadline = time.monotonic() + 30
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in doomed):
        assert time.monotonic() < deadline, "the killed node left processes behind"
        time.sleep(0.2)


def test_a_model_no_node_serves_is_reported_without_waiting_for_nodes_that_never_come(
    cluster: LocalCluster, tiny_model: TinyFactory
) -> None:
    """route_wait lets nodes that are starting fill the gaps of a model; when not a single node of the model is
    announced, the answer comes within seconds, not after route_wait."""
    other = tiny_model("llama", seed=7)  # other weights: another model key, served by nobody
    began = time.monotonic()
    with (
        RemoteModelForCausalLM.from_pretrained(other, cluster.initial_peers, route_wait=600) as model,
        pytest.raises(NoRouteError) as info,
    ):
        model.generate(prompt(0), max_new_tokens=2)
    assert info.value.missing_blocks == list(range(6))
    assert time.monotonic() - began < 120  # far below the 600 s it would wait for nodes of a model being started
