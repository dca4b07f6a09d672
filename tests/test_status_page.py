"""The swarm as people and monitoring see it, on a real cluster with a coordinator: the status page rendered by a
real headless Chromium, the nodes' Prometheus metrics moving with real generations, and `hivegen status`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from html import unescape
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from hivegen.client import RemoteModelForCausalLM
from hivegen.cluster import LocalCluster
from hivegen.credits.identity import Identity
from hivegen.dht import ModelInfo, announce_model
from hivegen.proto import node_pb2, node_pb2_grpc
from tests.browser import rendered_dom
from tests.conftest import ClusterFactory, TinyFactory, wait_for

SPANS = [(0, 2), (2, 4), (4, 6), (0, 3)]
HOSTILE = "<img src=x onerror=\"document.title='pwned'\">"


@pytest.fixture(scope="module")
def cluster(tiny_model: TinyFactory, start_cluster: ClusterFactory) -> LocalCluster:
    return start_cluster(tiny_model("llama"), spans=SPANS, coordinator=True, node_args=["--metrics-port", "0"])


def scrape(node_ready: Path) -> dict[str, float]:
    """A node's metrics, by sample name."""
    url = json.loads(node_ready.read_text())["metrics_url"]
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels
            or s.name.endswith(("_count", "_sum"))}  # fmt: skip


def steps_over_the_wire(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return int(node_pb2_grpc.NodeStub(channel).Info(node_pb2.InfoRequest(), timeout=10).counters.steps)


def page_text(dom: str) -> str:
    body = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", dom, flags=re.S)
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", body)).split())


def test_node_metrics_move_with_a_generation(cluster: LocalCluster) -> None:
    before = [scrape(n.ready_file) for n in cluster.nodes]
    wire = [steps_over_the_wire(n.address) for n in cluster.nodes]
    with RemoteModelForCausalLM.from_pretrained(cluster.model, cluster.initial_peers, verify="off") as model:
        model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=4, eos_token_id=[])
    after = [scrape(n.ready_file) for n in cluster.nodes]
    ran = [steps_over_the_wire(n.address) - w for n, w in zip(cluster.nodes, wire, strict=True)]
    assert sum(ran) >= 4  # the generation went through the nodes
    for b, a, steps in zip(before, after, ran, strict=True):
        assert a["hivegen_node_steps_total"] - b["hivegen_node_steps_total"] == steps  # as the node says over gRPC
        assert a["hivegen_node_step_seconds_count"] - b["hivegen_node_step_seconds_count"] == steps
        assert a["hivegen_node_cache_tokens_total"] == 65536
        if steps:
            assert a["hivegen_node_sessions_opened_total"] > b["hivegen_node_sessions_opened_total"]
            assert a["hivegen_node_tokens_processed_total"] - b["hivegen_node_tokens_processed_total"] >= steps


def test_the_status_page_in_a_browser_names_every_node_and_shows_a_coverage_gap(cluster: LocalCluster) -> None:
    assert cluster.coordinator is not None and cluster.coordinator.dht is not None
    attacker = Identity.generate()
    announce_model(cluster.coordinator.dht, ModelInfo("0-hostile", HOSTILE, 1), ttl=120, identity=attacker)
    cluster.stop_node(2)  # blocks 4:6: nobody else serves them
    url = cluster.coordinator.status_url + "/"

    def rendered() -> str | None:
        text = page_text(rendered_dom(url))
        return text if "coverage gap: blocks 4-5" in text else None

    text = wait_for(rendered, 60, "the page to show the gap")
    live = [n for i, n in enumerate(cluster.nodes) if i != 2]
    for node in live:
        assert node.address in text and node.account in text
    assert cluster.nodes[2].address not in text  # withdrawn
    assert "every block is served" not in text
    dom = rendered_dom(url)
    assert "<title>hivegen swarm status</title>" in dom  # the hostile name's handler never ran
    assert HOSTILE in page_text(dom)  # it is shown as text


def test_hivegen_status_prints_the_swarm_as_a_table_and_as_json(cluster: LocalCluster) -> None:
    assert cluster.coordinator_address is not None
    run = [sys.executable, "-m", "hivegen", "status", "--coordinator", cluster.coordinator_address]
    table = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert "COVERAGE GAP: blocks 4-5" in table.stdout
    for node in (n for i, n in enumerate(cluster.nodes) if i != 2):
        assert node.address in table.stdout and node.account in table.stdout
    as_json = subprocess.run([*run, "--json"], capture_output=True, text=True, timeout=60)
    models = {m["model_key"]: m for m in json.loads(as_json.stdout)["models"]}
    assert models[cluster.model_key]["missing_blocks"] == [4, 5]


def test_hivegen_status_without_a_reachable_coordinator_says_so_in_one_line() -> None:
    done = subprocess.run([sys.executable, "-m", "hivegen", "status", "--coordinator", "http://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith("hivegen: error: cannot read http://127.0.0.1:9/status")
    assert len(done.stderr.strip().splitlines()) == 1
