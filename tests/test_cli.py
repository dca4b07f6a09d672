"""The `hivegen` command as a user runs it: node serve, cluster up, and their shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from hivegen.credits.identity import Identity, default_identity_path, default_node_identity_path, is_account
from hivegen.dht import fetch_spans, start_dht
from hivegen.model.checkpoint import ModelCheckpoint
from tests.conftest import TinyFactory, wait_for

HIVEGEN = [sys.executable, "-m", "hivegen"]


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; killed (with their children) even if the test fails."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
        proc.wait()


def descendants(pid: int) -> list[int]:
    """Every process below `pid`: nodes, hivemind's DHT children and their p2pd daemons."""
    return [child.pid for child in psutil.Process(pid).children(recursive=True)]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_blocks_argument_is_validated() -> None:
    result = subprocess.run(
        [*HIVEGEN, "node", "serve", "--model", ".", "--blocks", "5"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "START:END" in result.stderr


def test_missing_model_dir_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [*HIVEGEN, "node", "serve", "--model", str(tmp_path / "nope"), "--blocks", "0:1"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "hivegen: error:" in result.stderr and "Traceback" not in result.stderr


def serve(path: Path, ready: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*HIVEGEN, "node", "serve", "--model", str(path), "--blocks", "0:4", "--num-threads", "1", "--ready-file",
         str(ready), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def test_node_serve_without_peers_starts_a_swarm_others_can_join(
    tiny_model: TinyFactory, processes: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    path = tiny_model("llama")
    ready = tmp_path / "node.json"
    node = serve(path, ready)
    processes.append(node)
    wait_for(ready.exists, what="the node's ready file")
    info = json.loads(ready.read_text())
    assert info["blocks"] == [0, 4] and info["pid"] == node.pid
    checkpoint = ModelCheckpoint.open(path)
    dht = start_dht(info["initial_peers"], client_mode=True)
    try:
        spans = wait_for(lambda: fetch_spans(dht, checkpoint.model_key, checkpoint.num_blocks), what="announcement")
        assert [(s.start, s.end, s.address) for s in spans.values()] == [(0, 4, info["address"])]
    finally:
        dht.shutdown()
    node.send_signal(signal.SIGTERM)
    assert node.wait(30) == 0
    output = node.stdout.read() if node.stdout else ""
    assert "--initial-peers " + " ".join(info["initial_peers"]) in output  # how others join the new swarm
    # The node's own key, not the client's: a user who runs both never pays himself. It says which it uses.
    node_key = default_node_identity_path()
    node_account = Identity.load(node_key).account
    assert f"node account {node_account} (key {node_key})" in output
    assert node_account != Identity.load_or_create(default_identity_path()).account


def test_node_withdraws_its_blocks_on_sigterm(
    tiny_model: TinyFactory, processes: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    path = tiny_model("llama")
    checkpoint = ModelCheckpoint.open(path)
    swarm = start_dht()
    try:
        node = serve(path, tmp_path / "node.json", "--initial-peers", *[str(a) for a in swarm.get_visible_maddrs()])
        processes.append(node)
        wait_for(lambda: fetch_spans(swarm, checkpoint.model_key, checkpoint.num_blocks), what="announcement")
        node.send_signal(signal.SIGTERM)
        assert node.wait(30) == 0
        assert fetch_spans(swarm, checkpoint.model_key, checkpoint.num_blocks) == {}
        output = node.stdout.read() if node.stdout else ""
        assert "withdrawn" in output
    finally:
        swarm.shutdown()


def cluster_up(
    model: Path, nodes: int, tmp_path: Path, processes: list[subprocess.Popen[str]], *extra: str
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """Run `hivegen cluster up` and return it with its ready file's contents once written."""
    ready = tmp_path / "cluster.json"
    cluster = subprocess.Popen(
        [*HIVEGEN, "cluster", "up", "--model", str(model), "--nodes", str(nodes), "--node-threads", "1",
         "--ready-file", str(ready), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    processes.append(cluster)
    wait_for(ready.exists, timeout=180, what="the cluster's ready file")
    return cluster, json.loads(ready.read_text())


def test_cluster_up_writes_ready_file_and_sigterm_stops_every_process(
    tiny_model: TinyFactory, processes: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    cluster, info = cluster_up(tiny_model("llama"), 3, tmp_path, processes, "--api-port", "0")
    assert info["initial_peers"] and info["initial_peers"][0].startswith("/ip4/127.0.0.1/")
    with urllib.request.urlopen(info["api_url"] + "/models", timeout=10) as reply:  # --api-port: the API runs too
        assert [m["id"] for m in json.load(reply)["data"]] == ["llama-6-00"]
    with urllib.request.urlopen(info["status_url"] + "/status", timeout=10) as reply:  # the cluster's coordinator
        (model,) = json.load(reply)["models"]
    assert model["covered"] and len(model["nodes"]) == 3 and info["coordinator"].startswith("127.0.0.1:")
    assert [n["blocks"] for n in info["nodes"]] == [[0, 2], [2, 4], [4, 6]]
    pids = [n["pid"] for n in info["nodes"]]
    assert all(psutil.pid_exists(p) and not gone(p) for p in pids)
    assert all(n["address"].startswith("127.0.0.1:") for n in info["nodes"])
    accounts = [n["account"] for n in info["nodes"]]  # each node has its own identity, paid by the coordinator
    assert len(set(accounts)) == 3 and all(is_account(a) for a in accounts)
    tree = descendants(cluster.pid)
    assert set(pids) < set(tree)  # the nodes, plus DHT processes and p2pd daemons
    cluster.send_signal(signal.SIGTERM)
    assert cluster.wait(60) == 0
    wait_for(lambda: all(gone(p) for p in tree), timeout=30, what="every process the cluster started to exit")
    output = cluster.stdout.read() if cluster.stdout else ""
    assert output.count("node pid") == 3 and "cluster stopped" in output
    assert f"OpenAI-compatible API at {info['api_url']}" in output
    logs = output.split("logs: ", 1)[1].split("/node-*/node.log (removed when the cluster stops", 1)[0]
    assert Path(logs).name.startswith("hivegen-cluster-") and not Path(logs).exists()  # said where, then cleaned


def test_nodes_exit_when_the_cluster_process_is_killed(
    tiny_model: TinyFactory, processes: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    cluster, info = cluster_up(tiny_model("llama"), 2, tmp_path, processes, "--api-port", "0")
    tree = descendants(cluster.pid)  # the API server among them
    assert {n["pid"] for n in info["nodes"]} < set(tree)
    os.kill(cluster.pid, signal.SIGKILL)
    cluster.wait()
    wait_for(lambda: all(gone(p) for p in tree), timeout=30, what="every orphaned process to exit")
