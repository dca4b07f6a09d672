"""Client + store end to end on a real cluster: records, replay without the network, prefix reuse,
continuation equivalence under sampling, resampling and traces. Node work is read over gRPC."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from hivegen.client.client import Client
from hivegen.cluster import LocalCluster
from hivegen.errors import TraceDivergenceError
from hivegen.proto import node_pb2, node_pb2_grpc
from hivegen.store import DirectoryStore, MemoryStore, open_store
from hivegen.store.index import GenerationIndex
from tests.conftest import ClusterFactory, TinyFactory

PROMPT = [5, 17, 99, 42, 7, 128, 64, 3]


@pytest.fixture(scope="module")
def model_path(tiny_model: TinyFactory) -> Path:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def cluster(model_path: Path, start_cluster: ClusterFactory) -> LocalCluster:
    return start_cluster(model_path, spans=[(0, 3), (3, 6)])


def node_steps(cluster: LocalCluster) -> list[int]:
    """Steps each node has served, read over the wire."""
    steps = []
    for node in cluster.nodes:
        with grpc.insecure_channel(node.address) as channel:
            steps.append(node_pb2_grpc.NodeStub(channel).Info(node_pb2.InfoRequest(), timeout=10).counters.steps)
    return steps


def client(model_path: Path, cluster: LocalCluster, store: object = None) -> Client:
    return Client(model_path, cluster.initial_peers, store=store or MemoryStore(), eos_token_ids=())


def test_greedy_generation_matches_transformers_and_is_committed(model_path: Path, cluster: LocalCluster) -> None:
    reference = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa", dtype=torch.float32)
    expected = reference.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    with client(model_path, cluster) as c:
        g = c.generate(PROMPT, max_new_tokens=12)
        assert list(g.tokens) == expected[0, len(PROMPT) :].tolist()
        assert not g.replayed and g.finish_reason == "length"
        assert c.index.load(g.ref).tokens == g.tokens
        assert [(h["start"], h["end"]) for h in g.route] == [(0, 3), (3, 6)]
        assert g.work["positions"] == len(PROMPT) + 11 and len(g.step_seconds) == 12


def test_replay_contacts_no_node_and_returns_identical_tokens(
    model_path: Path, cluster: LocalCluster, tmp_path: Path
) -> None:
    with client(model_path, cluster, tmp_path / "store") as first:
        original = first.generate(PROMPT, max_new_tokens=10, temperature=0.9, seed=11)
    before = node_steps(cluster)
    with client(model_path, cluster, tmp_path / "store") as again:  # a new process would do the same
        replay = again.generate(PROMPT, max_new_tokens=10, temperature=0.9, seed=11)
        assert again._remote is None  # never even joined the swarm
    assert node_steps(cluster) == before
    assert replay.replayed and replay.tokens == original.tokens and replay.ref == original.ref


def test_continuation_with_sampling_equals_an_uninterrupted_run(model_path: Path, cluster: LocalCluster) -> None:
    kwargs = {"temperature": 1.0, "top_k": 40, "seed": 5}
    with client(model_path, cluster) as c:
        short = c.generate(PROMPT, max_new_tokens=16, **kwargs)
        before = node_steps(cluster)
        longer = c.generate(PROMPT, max_new_tokens=32, **kwargs)
        used = [b - a for a, b in zip(before, node_steps(cluster), strict=True)]
    with client(model_path, cluster) as fresh:
        uninterrupted = fresh.generate(PROMPT, max_new_tokens=32, **kwargs)
    assert longer.tokens[:16] == short.tokens
    assert longer.tokens == uninterrupted.tokens
    assert used == [16, 16]  # one prefill of prompt + 16 stored tokens, then 15 decode steps
    assert longer.parent == short.ref


def test_smaller_request_is_served_from_the_stored_prefix(model_path: Path, cluster: LocalCluster) -> None:
    with client(model_path, cluster) as c:
        full = c.generate(PROMPT, max_new_tokens=12)
        before = node_steps(cluster)
        part = c.generate(PROMPT, max_new_tokens=5)
    assert node_steps(cluster) == before
    assert part.replayed and part.tokens == full.tokens[:5] and part.finish_reason == "length"


def test_unseeded_sampling_records_its_seed(model_path: Path, cluster: LocalCluster) -> None:
    with client(model_path, cluster) as c:
        g = c.generate(PROMPT, max_new_tokens=6, temperature=1.2)
        assert g.request.seed is not None
        again = c.generate(PROMPT, max_new_tokens=6, temperature=1.2, seed=g.request.seed)
    assert again.replayed and again.tokens == g.tokens


def test_resample_keeps_the_first_tokens_and_costs_one_prefill(model_path: Path, cluster: LocalCluster) -> None:
    with client(model_path, cluster) as c:
        g = c.generate(PROMPT, max_new_tokens=20, temperature=1.0, seed=1)
        before = node_steps(cluster)
        r = c.resample(g.ref, from_token=12, seed=2)
        used = [b - a for a, b in zip(before, node_steps(cluster), strict=True)]
        again = c.resample(g.ref, from_token=12, seed=2)
    assert r.tokens[:12] == g.tokens[:12] and len(r.tokens) == 20
    assert used == [8, 8]  # one prefill covering prompt + 12 kept tokens, then 7 decode steps
    assert r.parent == g.ref and r.request.seed == 2
    assert again.replayed and again.tokens == r.tokens


def test_resampling_a_greedy_generation_is_refused(model_path: Path, cluster: LocalCluster) -> None:
    with client(model_path, cluster) as c:
        g = c.generate(PROMPT, max_new_tokens=4)
        with pytest.raises(ValueError, match="temperature"):
            c.resample(g.ref, from_token=2)


def flow(c: Client) -> list[tuple[int, ...]]:
    """User code: three dependent calls, sampling without seeds."""
    a = c.generate(PROMPT, max_new_tokens=4, temperature=1.0)
    b = c.generate(PROMPT + list(a.tokens), max_new_tokens=4, temperature=1.0)
    d = c.generate(PROMPT + list(b.tokens), max_new_tokens=4, temperature=1.0)
    return [a.tokens, b.tokens, d.tokens]


def test_trace_replay_returns_recorded_outputs_without_the_network(model_path: Path, cluster: LocalCluster) -> None:
    store = MemoryStore()
    with client(model_path, cluster, store) as c:
        with c.trace("flow") as recording:
            outputs = flow(c)
        before = node_steps(cluster)
        with c.trace("flow", replay=recording.ref) as replay:
            again = flow(c)
    assert again == outputs
    assert all(g.replayed for g in replay.calls)
    assert node_steps(cluster) == before


def test_rewound_trace_resamples_only_the_dropped_calls(model_path: Path, cluster: LocalCluster) -> None:
    with client(model_path, cluster) as c:
        with c.trace("flow") as recording:
            flow(c)
        rewound = recording.rewind(1)
        before = node_steps(cluster)
        with c.trace("flow", replay=rewound) as replay:
            flow(c)
        used = [b - a for a, b in zip(before, node_steps(cluster), strict=True)]
    assert [g.replayed for g in replay.calls] == [True, True, False]
    assert used == [4, 4]  # only the third call ran
    assert open_store(c.store).get_pointer("traces", "flow") == replay.ref


def test_strict_replay_names_the_first_call_that_differs(model_path: Path, cluster: LocalCluster) -> None:
    with client(model_path, cluster) as c:
        with c.trace("strict") as recording:
            c.generate(PROMPT, max_new_tokens=3)
            c.generate(PROMPT, max_new_tokens=4)
        with pytest.raises(TraceDivergenceError) as info, c.trace("strict", replay=recording.ref, strict=True):
            c.generate(PROMPT, max_new_tokens=3)
            c.generate(PROMPT, max_new_tokens=5)
    assert info.value.index == 1 and "max_new_tokens" in str(info.value)


WRITER = """
import sys
from hivegen.client.client import Client
model, store, peers, index = sys.argv[1], sys.argv[2], sys.argv[3].split(","), int(sys.argv[4])
with Client(model, peers, store=store, eos_token_ids=()) as c:
    for n in range(3):
        print(c.generate([7, index, n, 11], max_new_tokens=4).ref, flush=True)
"""


def test_processes_generating_into_one_store_directory_lose_nothing(
    model_path: Path, cluster: LocalCluster, tmp_path: Path
) -> None:
    store_dir = tmp_path / "shared-store"
    peers = ",".join(cluster.initial_peers)
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(model_path), str(store_dir), peers, str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    refs = []
    for writer in writers:
        out, err = writer.communicate(timeout=240)
        assert writer.returncode == 0, err
        refs += out.split()
    store = DirectoryStore(store_dir)
    index = GenerationIndex(store)
    assert len(set(refs)) == 9
    assert {index.load(ref).request.prompt_ids[1:3] for ref in refs} == {(i, n) for i in range(3) for n in range(3)}
    assert all(index.find(index.load(ref).request).ref == ref for ref in refs)
    assert store.verify() == []
