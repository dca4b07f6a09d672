"""No false alarms: honest nodes pass verification every time, in every dtype, single and batched, greedy and
sampled. Each dtype has its own four nodes (two per hop), so every hop is re-executed on a second node."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hivegen.client import RemoteModelForCausalLM
from hivegen.client.bans import BanList
from hivegen.client.verify import TOLERANCES, VerifyPolicy
from hivegen.cluster import LocalCluster
from tests.conftest import ClusterFactory, TinyFactory

SPANS = [(0, 3), (3, 6), (0, 3), (3, 6)]
DTYPES = ["float32", "bfloat16", "float16"]
RUNS = 6  # generations per dtype and kind


@pytest.fixture(scope="module")
def model_path(tiny_model: TinyFactory) -> Path:
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def cluster(model_path: Path, start_cluster: ClusterFactory) -> LocalCluster:
    cluster = start_cluster(model_path, spans=SPANS)  # float32, the checkpoint's dtype
    for dtype in DTYPES[1:]:
        for start, end in SPANS:
            cluster.nodes.append(cluster.spawn_node(start, end, extra_args=["--dtype", dtype]))
    cluster.wait_ready()
    return cluster


def nodes_of(cluster: LocalCluster, dtype: str) -> list[str]:
    index = DTYPES.index(dtype)
    return [n.node_id for n in cluster.nodes[4 * index : 4 * index + 4]]


def open_model(cluster: LocalCluster, model_path: Path, dtype: str, tmp_path: Path) -> RemoteModelForCausalLM:
    return RemoteModelForCausalLM.from_pretrained(
        model_path,
        cluster.initial_peers,
        dtype=dtype,
        allowed_nodes=nodes_of(cluster, dtype),
        verify=VerifyPolicy(rate=1.0),
        bans=BanList(tmp_path / "bans.json"),
    )


def assert_every_hop_matched(model: RemoteModelForCausalLM, dtype: str) -> None:
    report = model.last_verification
    assert report.verified and not report.liars, report
    assert len(report.hops) == 2
    for hop in report.hops:
        assert hop.max_error is not None and hop.max_error <= TOLERANCES[dtype] / 3, hop  # with room to spare
    assert not model.swarm.bans.owners()


@pytest.mark.parametrize("dtype", DTYPES)
def test_honest_single_greedy_generations_always_pass(
    cluster: LocalCluster, model_path: Path, dtype: str, tmp_path: Path
) -> None:
    with open_model(cluster, model_path, dtype, tmp_path) as model:
        for seed in range(RUNS):
            prompt = torch.randint(3, 256, (1, 6 + seed), generator=torch.Generator().manual_seed(seed))
            model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=[])
            assert_every_hop_matched(model, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_honest_batched_left_padded_generations_always_pass(
    cluster: LocalCluster, model_path: Path, dtype: str, tmp_path: Path
) -> None:
    with open_model(cluster, model_path, dtype, tmp_path) as model:
        for seed in range(RUNS // 2):
            prompts = torch.randint(3, 256, (3, 9), generator=torch.Generator().manual_seed(100 + seed))
            mask = torch.ones_like(prompts)
            mask[1, :3] = 0
            mask[2, :5] = 0
            model.generate(prompts, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=[])
            assert_every_hop_matched(model, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_honest_sampled_generations_always_pass(
    cluster: LocalCluster, model_path: Path, dtype: str, tmp_path: Path
) -> None:
    with open_model(cluster, model_path, dtype, tmp_path) as model:
        for seed in range(RUNS):
            prompt = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(200 + seed))
            model.generate(prompt, max_new_tokens=12, do_sample=True, temperature=1.3, top_p=0.95, seed=seed,
                           eos_token_id=[])  # fmt: skip
            assert_every_hop_matched(model, dtype)
