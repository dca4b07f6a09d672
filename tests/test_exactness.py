"""Distributed greedy generation equals transformers' own generate, token for token.

For each architecture one cluster runs five nodes with unequal spans; restricting the
client to subsets of them gives chains of 1, 2 and 3 nodes over the same weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hivegen.client import RemoteModelForCausalLM
from hivegen.cluster import LocalCluster
from tests.conftest import ClusterFactory, TinyFactory

ARCHITECTURES = ["llama", "gemma3"]  # every other architecture: tests/test_architectures.py
SPANS = [(0, 6), (0, 1), (1, 3), (3, 6), (1, 6)]  # full; 1 + 2 + 3 blocks; 5 blocks
CHAINS = {1: [0], 2: [1, 4], 3: [1, 2, 3]}  # chain length -> the nodes the client may use, in route order
NEW_TOKENS = 20  # prompt 12 + 20 > the tiny sliding window of 6


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch_cluster(
    request: pytest.FixtureRequest, tiny_model: TinyFactory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, LocalCluster]]:
    path = tiny_model(request.param)
    cluster = LocalCluster(path, spans=SPANS, node_threads=1, work_dir=tmp_path_factory.mktemp("cluster"))
    try:
        yield path, cluster.start()
    finally:
        cluster.stop()


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 12 and 8 tokens, the shorter left-padded."""
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(3, 256, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :4] = 0
    attention_mask[1, :4] = 0
    return input_ids, attention_mask


def local_generate(path: Path, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
    return model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
    )


@pytest.mark.parametrize("hops", sorted(CHAINS))
def test_greedy_batch_matches_transformers(arch_cluster: tuple[Path, LocalCluster], hops: int) -> None:
    path, cluster = arch_cluster
    input_ids, attention_mask = prompts()
    expected = local_generate(path, input_ids, attention_mask)
    allowed = [cluster.nodes[i].node_id for i in CHAINS[hops]]
    with RemoteModelForCausalLM.from_pretrained(path, cluster.initial_peers, allowed_nodes=allowed) as model:
        produced = model.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
        )
        route = model.last_route
    assert len(route) == hops
    assert [(h.node_id, h.start, h.end) for h in route] == [
        (cluster.nodes[i].node_id, *cluster.nodes[i].blocks) for i in CHAINS[hops]
    ]
    assert produced.tolist() == expected.tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_chain_matches_transformers_in_that_dtype(
    dtype: torch.dtype, tiny_model: TinyFactory, start_cluster: ClusterFactory
) -> None:
    """Nodes and client run `dtype`; hidden states cross the wire in it; tokens equal a local run in it."""
    path = tiny_model("llama")
    name = str(dtype).removeprefix("torch.")
    cluster = start_cluster(path, spans=[(0, 2), (2, 6)], dtype=name)
    input_ids, attention_mask = prompts()
    local = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=dtype)
    expected = local.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
    )
    with RemoteModelForCausalLM.from_pretrained(path, cluster.initial_peers, dtype=dtype) as model:
        produced = model.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
        )
        assert [h.dtype for h in model.last_route] == [name, name]
    assert produced.tolist() == expected.tolist()
