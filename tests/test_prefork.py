"""Cluster nodes forked from the prefork process: they serve exactly like fresh processes, their exit codes and
failures reach the cluster, and HIVEGEN_NO_PREFORK=1 starts fresh processes instead."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from hivegen.client import RemoteModelForCausalLM
from hivegen.cluster import ClusterError, LocalCluster
from hivegen.prefork import DISABLE_ENV, ForkedProcess, Preforker
from tests.conftest import ClusterFactory, TinyFactory, greedy_reference

PROMPT = [5, 17, 99, 3, 42]


@pytest.fixture(scope="module")
def model_path(tiny_model: TinyFactory) -> Path:
    return tiny_model("llama")


def test_forked_and_fresh_nodes_serve_one_chain_exactly(
    model_path: Path, start_cluster: ClusterFactory, monkeypatch: Any
) -> None:
    cluster = start_cluster(model_path, spans=[])
    forked = cluster.add_node(0, 3)
    assert isinstance(forked.process, ForkedProcess)
    helper = psutil.Process(forked.pid).parent()
    assert helper is not None and helper.pid != os.getpid() and "hivegen.prefork" in helper.cmdline()
    assert psutil.Process(forked.pid).name() == "hivegen-node"  # not "python": ps and top tell the nodes apart
    monkeypatch.setenv(DISABLE_ENV, "1")
    fresh = cluster.add_node(3, 6)
    assert not isinstance(fresh.process, ForkedProcess) and psutil.Process(fresh.pid).ppid() == os.getpid()
    with RemoteModelForCausalLM.from_pretrained(model_path, cluster.initial_peers) as model:
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False, eos_token_id=[])
        assert {h.node_id for h in model.last_route} == {forked.node_id, fresh.node_id}
    assert out[0, len(PROMPT) :].tolist() == greedy_reference(model_path, PROMPT, 6)
    cluster.stop_node(0, signal.SIGKILL)
    assert forked.process.poll() == -signal.SIGKILL  # reaped by the prefork process, its status passed on
    cluster.stop_node(1)
    assert fresh.process.poll() == 0  # withdrew and exited cleanly on SIGTERM


def test_a_forked_node_that_fails_to_start_is_reported_with_its_code_and_log(model_path: Path, tmp_path: Path) -> None:
    cluster = LocalCluster(
        model_path, spans=[(0, 6)], node_threads=1, work_dir=tmp_path, node_args=["--cache-tokens", "-5"]
    )
    with pytest.raises(ClusterError) as info:
        cluster.start()
    message = str(info.value)
    assert "node for blocks 0:6 exited with code 2" in message
    assert "argument --cache-tokens: must be a finite number > 0, got -5" in message  # its log, not ours
    assert isinstance(cluster.nodes[0].process, ForkedProcess)


def test_the_helper_survives_ctrl_c_and_reports_each_childs_own_exit(tmp_path: Path) -> None:
    """Ctrl-C reaches the whole process group: the helper must outlive it (the cluster stops the nodes itself)."""
    helper = Preforker.shared()
    os.kill(helper.process.pid, signal.SIGINT)
    log = tmp_path / "child.log"
    ok = helper.spawn(["status", "--help"], dict(os.environ), str(log))
    bad = helper.spawn(["status", "--no-such-flag"], dict(os.environ), str(log))
    assert (ok.wait(60), bad.wait(60)) == (0, 2)
    assert helper.running
    text = log.read_text()
    assert "usage: hivegen status" in text and "unrecognized arguments: --no-such-flag" in text
