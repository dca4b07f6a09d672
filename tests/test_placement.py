"""Automatic placement: a node without --blocks serves where the swarm is weakest, and moves only when it pays."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hivegen.client import RemoteModelForCausalLM
from hivegen.cluster import LocalCluster
from hivegen.dht import SpanRecord, fetch_spans, owned_subkey
from hivegen.node.placement import better_span, block_capacities, choose_span, should_move
from tests.conftest import ClusterFactory, TinyFactory, greedy_reference, wait_for

BLOCKS = 30


def node(name: str, start: int, end: int, throughput: float = 10.0, state: str = "online") -> SpanRecord:
    return SpanRecord(owned_subkey(name, "ab" * 32), "127.0.0.1:5000", start, end, throughput, 1000, "float32", "0",
                      state)  # fmt: skip


def test_the_first_node_takes_the_first_blocks_and_the_next_ones_fill_the_gaps() -> None:
    records: list[SpanRecord] = []
    for i in range(4):
        start, end = choose_span(block_capacities(records, BLOCKS), 8)
        records.append(node(f"n{i}", start, end))
    assert [(r.start, r.end) for r in records] == [(0, 8), (8, 16), (16, 24), (22, 30)]
    assert min(block_capacities(records, BLOCKS)) > 0  # every block served


def test_a_node_joins_where_the_swarm_is_least_served() -> None:
    records = [node("a", 0, 15, 10.0), node("b", 15, 30, 10.0), node("c", 0, 15, 10.0), node("offline", 15, 30, 99.0,
                                                                                            "offline")]  # fmt: skip
    assert choose_span(block_capacities(records, BLOCKS), 10) == (15, 25)


def test_a_span_longer_than_the_model_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        choose_span([0.0] * 4, 5)


def test_a_node_duplicating_anothers_span_moves_to_the_gap_left_by_a_dead_one() -> None:
    me = node("me", 0, 10)
    records = [me, node("a", 0, 10), node("b", 20, 30)]  # blocks 10..19: their node died
    move = better_span(records, BLOCKS, me)
    assert move is not None and (move.start, move.end) == (10, 20)
    assert move.now == 0.0 and move.after == 10.0


def test_of_two_nodes_that_would_fill_the_same_gap_only_the_one_with_the_smaller_id_moves() -> None:
    a, b = node("a", 0, 10), node("b", 0, 10)
    records = [a, b, node("c", 0, 10), node("d", 20, 30)]
    assert better_span(records, BLOCKS, a) is not None and better_span(records, BLOCKS, b) is not None
    move = should_move(records, BLOCKS, a)
    assert move is not None and (move.start, move.end) == (10, 20)
    assert should_move(records, BLOCKS, b) is None  # a goes first; b checks again once a's move shows


def test_a_node_that_alone_serves_its_blocks_stays() -> None:
    me = node("me", 10, 20)
    records = [me, node("a", 0, 10), node("b", 20, 30), node("c", 0, 10)]
    assert better_span(records, BLOCKS, me) is None


def test_a_small_gain_is_not_worth_a_move() -> None:
    me = node("me", 0, 10, 10.0)
    records = [me, node("a", 0, 10, 10.0), node("b", 10, 20, 9.0), node("c", 20, 30, 18.0)]
    # Blocks 10..19 are the weakest (9); moving there would leave 0..9 at 10: a bottleneck of 10 for 9 (1.11x).
    assert better_span(records, BLOCKS, me) is None
    move = better_span(records, BLOCKS, me, margin=1.05)
    assert move is not None and (move.start, move.end, move.now, move.after) == (10, 20, 9.0, 10.0)


# --- nodes started without --blocks, on a real swarm -------------------------------------------------------------

AUTO = ["--num-blocks", "10", "--rebalance-interval", "1", "--announce-ttl", "6", "--drain-seconds", "5"]
PROMPT = [5, 17, 99, 3, 42, 8, 61]
NEW = 16


@pytest.fixture(scope="module")
def model_path(tiny_model: TinyFactory) -> Path:
    return tiny_model("llama", num_layers=BLOCKS)


@pytest.fixture(scope="module")
def cluster(model_path: Path, start_cluster: ClusterFactory) -> LocalCluster:
    cluster = start_cluster(model_path, spans=[])  # the DHT alone; the nodes come one by one and choose
    for _ in range(4):
        cluster.add_node(None, None, extra_args=AUTO)
    return cluster


def served(cluster: LocalCluster) -> dict[str, SpanRecord]:
    assert cluster.dht is not None
    return fetch_spans(cluster.dht, cluster.model_key, BLOCKS)


def coverage(cluster: LocalCluster) -> list[int]:
    """How many nodes serve each block."""
    return [sum(r.start <= b < r.end for r in served(cluster).values()) for b in range(BLOCKS)]


def test_nodes_without_blocks_cover_the_whole_model_evenly(cluster: LocalCluster) -> None:
    counts = wait_for(lambda: (c := coverage(cluster)) and min(c) >= 1 and c, 60, "every block to be served")
    assert max(counts) <= 2, counts  # 4 nodes x 10 blocks over 30: no block served by more than two
    assert sorted(r.end - r.start for r in served(cluster).values()) == [10, 10, 10, 10]


def test_a_killed_node_leaves_a_gap_another_node_moves_into_while_a_client_generates(
    cluster: LocalCluster, model_path: Path
) -> None:
    counts = wait_for(lambda: (c := coverage(cluster)) and min(c) >= 1 and c, 60, "every block to be served")
    records = served(cluster)
    alone = next(  # a node that serves blocks nobody else serves: killing it leaves a gap
        i for i, n in enumerate(cluster.nodes)
        if n.process.poll() is None and n.node_id in records
        and any(counts[b] == 1 for b in range(records[n.node_id].start, records[n.node_id].end))
    )  # fmt: skip
    expected = greedy_reference(model_path, PROMPT, NEW)

    class KillAfterFiveTokens:
        def __init__(self) -> None:
            self.tokens = 0

        def put(self, value: torch.Tensor) -> None:
            self.tokens += 1
            if self.tokens == 6:  # the prompt, then 5 tokens
                cluster.stop_node(alone, signal.SIGKILL)

        def end(self) -> None:
            pass

    began = time.monotonic()
    with RemoteModelForCausalLM.from_pretrained(model_path, cluster.initial_peers, verify="off", heal_wait=90) as model:
        out = model.generate(
            torch.tensor([PROMPT]), max_new_tokens=NEW, eos_token_id=[], streamer=KillAfterFiveTokens()
        )
    healed = time.monotonic() - began
    assert out[0, len(PROMPT) :].tolist() == expected
    wait_for(lambda: min(coverage(cluster)) >= 1, 60, "every block to be served again")
    assert healed < 90
    moved = [n for n in cluster.nodes if n.process.poll() is None and json.loads(n.ready_file.read_text())["moves"]]
    assert moved, "no node moved into the gap"


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--memory", "1000"], "one block of this model needs 144.5 KiB as float32, more than the 1000 bytes --memory"),
        (["--num-blocks", "31"], "--num-blocks 31: the model has 30 blocks (1..30)"),
        (["--blocks", "0:2", "--num-blocks", "2"], "not allowed with argument --blocks"),
    ],
)
def test_a_node_that_cannot_place_itself_says_why_before_joining_anything(
    model_path: Path, flags: list[str], says: str
) -> None:
    done = subprocess.run([sys.executable, "-m", "hivegen", "node", "serve", "--model", str(model_path), *flags],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode != 0
    assert says in done.stderr
    assert "Traceback" not in done.stderr
