"""The real demo model, SmolLM2-135M-Instruct, over a 3-node local cluster.

The model is prepared once into $HIVEGEN_HOME (default ~/.hivegen), as `hivegen models prepare smollm2` does.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hivegen.client import RemoteModelForCausalLM
from hivegen.cluster import LocalCluster
from hivegen.model.demo import prepare_model
from tests.conftest import ClusterFactory

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return prepare_model("smollm2", progress=False)


@pytest.fixture(scope="module")
def cluster(smollm2: Path, start_cluster: ClusterFactory) -> LocalCluster:
    return start_cluster(smollm2, spans=None)


def chat_ids(path: Path) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return encoded["input_ids"]


def test_cluster_splits_30_blocks_over_3_nodes(cluster: LocalCluster) -> None:
    assert [n.blocks for n in cluster.nodes] == [(0, 10), (10, 20), (20, 30)]


def test_greedy_answer_matches_transformers_token_for_token(smollm2: Path, cluster: LocalCluster) -> None:
    input_ids = chat_ids(smollm2)
    local = AutoModelForCausalLM.from_pretrained(smollm2, attn_implementation="sdpa", dtype=torch.float32)
    expected = local.generate(input_ids=input_ids, max_new_tokens=16, do_sample=False)
    with RemoteModelForCausalLM.from_pretrained("smollm2", cluster.initial_peers) as model:  # the name, as Client
        produced = model.generate(input_ids, max_new_tokens=16, do_sample=False)
        hops = len(model.last_route)
    assert hops == 3
    assert produced.tolist() == expected.tolist()
    answer = AutoTokenizer.from_pretrained(smollm2).decode(produced[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def summary_ref(stderr: str) -> str:
    """The generation ref on the line `hivegen generate` prints under its answer."""
    return stderr.strip().splitlines()[-1].rsplit("ref ", 1)[1]


def test_cli_generate_streams_the_answer_and_replays_it(smollm2: Path, cluster: LocalCluster, tmp_path: Path) -> None:
    command = [
        *(sys.executable, "-m", "hivegen", "generate", "--model", str(smollm2), "--store", str(tmp_path)),
        *("--initial-peers", *cluster.initial_peers, "--prompt", QUESTION, "--max-new-tokens", "12"),
    ]
    first = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert first.returncode == 0, first.stderr
    assert "Paris" in first.stdout and "network steps" in first.stderr
    assert "verified 0/3 (3 with no other node to re-run them)" in first.stderr  # no replicas in this cluster
    # The same command again: answered from the store before torch, transformers or hivemind are even imported.
    again = subprocess.run([sys.executable, "-X", "importtime", *command[1:]], capture_output=True, text=True,
                           timeout=180)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout and "replayed from the store" in again.stderr
    assert (
        first.stderr.strip().splitlines()[-1].split("ref ")[1] == again.stderr.strip().splitlines()[-1].split("ref ")[1]
    )
    imported = {line.rsplit("|", 1)[1].strip() for line in again.stderr.splitlines() if line.startswith("import time:")}
    assert imported and not imported & {"torch", "transformers", "hivemind"}
    # With another prompt the full path runs (and says it is joining the swarm while it does).
    other = subprocess.run([*command[:-3], "What is the capital of Italy?", *command[-2:]], capture_output=True,
                           text=True, timeout=180)  # fmt: skip
    assert other.returncode == 0 and "joining the swarm ..." in other.stderr and "network steps" in other.stderr


def test_cli_models_prepare_prints_the_checkpoint_dir_last(smollm2: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hivegen", "models", "prepare", "smollm2"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(smollm2)
