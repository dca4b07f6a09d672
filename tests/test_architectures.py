"""Every architecture of hivegen.model.tiny.ARCHITECTURES runs over the swarm exactly as transformers runs it.

One cluster per architecture: 3 node processes with unequal spans (blocks 0:1, 1:3, 3:4). A single
prompt and a left-padded batch of 2, greedy and seeded sampling, each equal token for token to
transformers' own `generate` in float32 (for sampling, `generate` draws with hivegen's sampler as its
logits processor, so both sides sample the same way from their own logits).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList, PreTrainedModel

from hivegen.client import RemoteModelForCausalLM
from hivegen.client.sampling import SamplingParams, choose_next
from hivegen.cluster import LocalCluster
from hivegen.model.tiny import ARCHITECTURES, make_tiny_checkpoint
from hivegen.proto import node_pb2, node_pb2_grpc

SPANS = [(0, 1), (1, 3), (3, 4)]
NEW_TOKENS = 16  # 12-token prompts + 16 > the tiny sliding windows
SAMPLING = SamplingParams(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, seed=2024)


@pytest.fixture(scope="module", params=[arch.name for arch in ARCHITECTURES])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, LocalCluster]]:
    path = make_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param), num_layers=4)
    cluster = LocalCluster(path, spans=SPANS, node_threads=1, work_dir=tmp_path_factory.mktemp("cluster"))
    try:
        yield path, cluster.start()
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def remote(served: tuple[Path, LocalCluster]) -> Iterator[RemoteModelForCausalLM]:
    path, cluster = served
    with RemoteModelForCausalLM.from_pretrained(path, cluster.initial_peers, verify="off") as model:
        yield model


@pytest.fixture(scope="module")
def local(served: tuple[Path, LocalCluster]) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(served[0], dtype=torch.float32)


class HivegenSampler(LogitsProcessor):
    """Makes transformers' greedy search pick the token hivegen's sampler draws from transformers' own logits."""

    def __init__(self, params: SamplingParams, prompt_length: int) -> None:
        self.params, self.prompt_length = params, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        tokens = choose_next(scores, self.params, input_ids.shape[1] - self.prompt_length)
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(1, tokens[:, None], 0.0)  # type: ignore[return-value]


def prompts(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt of 12 tokens, or that and one of 8 left-padded to 12."""
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(3, 256, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :4], attention_mask[1, :4] = 0, 0
    return (input_ids[:1], attention_mask[:1]) if kind == "single" else (input_ids, attention_mask)


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
@pytest.mark.parametrize("batch", ["single", "padded-batch"])
def test_generation_equals_transformers(
    remote: RemoteModelForCausalLM, local: PreTrainedModel, batch: str, sampling: str
) -> None:
    input_ids, attention_mask = prompts(batch)
    common = {"attention_mask": attention_mask, "max_new_tokens": NEW_TOKENS, "pad_token_id": 0}
    if sampling == "greedy":
        expected = local.generate(input_ids, do_sample=False, eos_token_id=None, **common)
        produced = remote.generate(input_ids, do_sample=False, eos_token_id=[], **common)
    else:
        sampler = LogitsProcessorList([HivegenSampler(SAMPLING, input_ids.shape[1])])
        expected = local.generate(input_ids, do_sample=False, eos_token_id=None, logits_processor=sampler, **common)
        produced = remote.generate(
            input_ids, do_sample=True, temperature=SAMPLING.temperature, top_k=SAMPLING.top_k,
            top_p=SAMPLING.top_p, seed=SAMPLING.seed, eos_token_id=[], **common,
        )  # fmt: skip
    assert [(h.start, h.end) for h in remote.last_route] == SPANS
    assert produced.tolist() == expected.tolist()


def test_each_node_holds_its_blocks_share_of_the_parameters(
    served: tuple[Path, LocalCluster], remote: RemoteModelForCausalLM, local: PreTrainedModel
) -> None:
    """Nodes load only their blocks, every expert of them included, from the on-disk (unfused) checkpoint."""
    _, cluster = served
    blocks = remote.head.skeleton.layers_name  # e.g. model.layers, transformer.h
    layers = local.get_submodule(blocks)
    held = []
    for node in cluster.nodes:
        with grpc.insecure_channel(node.address) as channel:
            info = node_pb2_grpc.NodeStub(channel).Info(node_pb2.InfoRequest(), timeout=10)
        start, end = node.blocks
        expected = sum(p.numel() for i in range(start, end) for p in layers[i].parameters())
        assert info.num_parameters == expected
        held.append(info.num_parameters)
    assert sum(held) == sum(p.numel() for p in layers.parameters())
