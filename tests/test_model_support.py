"""What hivegen can serve, said before any swarm starts: `hivegen models check`, refusals, span loading.

No cluster here: checkpoints are tiny and every check runs in this process (or one CLI process).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from hivegen.client import RemoteModelForCausalLM
from hivegen.errors import ModelLoadError, UnsupportedModelError
from hivegen.model.chain import generate_greedy
from hivegen.model.checkpoint import ModelCheckpoint
from hivegen.model.head import ClientHead
from hivegen.model.span import BlockSpan
from hivegen.model.support import check_model
from hivegen.model.tiny import (
    ARCHITECTURES,
    IN_PROCESS,
    REFUSED,
    RefusedArchitecture,
    TinyArchitecture,
    make_tiny_checkpoint,
    readme_section,
)

HIVEGEN = [sys.executable, "-m", "hivegen"]
README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def moe_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-block Mixtral written by save_pretrained in many small shards, experts unfused on disk."""
    path = tmp_path_factory.mktemp("moe")
    config_overrides = {"num_local_experts": 4, "num_experts_per_tok": 2}
    make_tiny_checkpoint("mixtral", path / "unsharded", num_layers=4, **config_overrides)
    model = AutoModelForCausalLM.from_pretrained(path / "unsharded", dtype=torch.float32)
    model.save_pretrained(path / "sharded", max_shard_size="40KB")
    return path / "sharded"


def shard_keys(path: Path) -> dict[str, list[str]]:
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    files: dict[str, list[str]] = {}
    for key, file_name in index.items():
        files.setdefault(file_name, []).append(key)
    return files


def test_a_saved_moe_keeps_its_experts_unfused_on_disk(moe_shards: Path) -> None:
    """The premise of loading through transformers' conversion: disk and memory name experts differently."""
    keys = [key for keys in shard_keys(moe_shards).values() for key in keys]
    assert "model.layers.2.block_sparse_moe.experts.3.w1.weight" in keys
    assert not any("gate_up_proj" in key for key in keys)


def test_a_span_of_a_sharded_moe_reads_only_its_shards_and_equals_transformers(
    moe_shards: Path, tmp_path: Path
) -> None:
    reference = AutoModelForCausalLM.from_pretrained(moe_shards, dtype=torch.float32)
    moe_shards = Path(shutil.copytree(moe_shards, tmp_path / "copy"))
    needed = {f for f, keys in shard_keys(moe_shards).items() if any(k.startswith("model.layers.2.") for k in keys)}
    others = set(shard_keys(moe_shards)) - needed
    assert len(others) > 1
    for file_name in others:  # a span that opened any other shard would fail to parse it
        (moe_shards / file_name).write_bytes(b"not a shard")
    span = BlockSpan(ModelCheckpoint.open(moe_shards), 2, 3)
    expected = dict(reference.model.layers[2].named_parameters())
    loaded = dict(span.layers[0].named_parameters())
    assert sorted(loaded) == sorted(expected)  # fused: experts.gate_up_proj, experts.down_proj
    for name, param in loaded.items():
        assert torch.equal(param, expected[name]), name


def test_models_check_reports_blocks_experts_and_parameters_per_block(moe_shards: Path) -> None:
    reference = AutoModelForCausalLM.from_pretrained(moe_shards, dtype=torch.float32)
    result = subprocess.run([*HIVEGEN, "models", "check", str(moe_shards), "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["servable"] is True
    assert report["model_type"] == "mixtral"
    assert report["num_blocks"] == 4
    assert report["experts"] == 4
    assert report["layer_types"] == {"sliding_attention": 4}
    per_block = [sum(p.numel() for p in layer.parameters()) for layer in reference.model.layers]
    assert report["block_parameters"] == per_block
    total = sum(p.numel() for p in reference.parameters())
    assert report["client_parameters"] == total - sum(per_block)
    text = subprocess.run([*HIVEGEN, "models", "check", str(moe_shards)], capture_output=True, text=True)
    assert text.returncode == 0
    assert "servable    yes" in text.stdout
    assert f"{per_block[0]:,} per block" in text.stdout


def test_every_tested_architecture_is_servable_by_check(tmp_path: Path) -> None:
    """`models check` agrees with the exactness matrix: nothing it runs is called unservable."""
    for arch in [*ARCHITECTURES, *IN_PROCESS]:
        path = make_tiny_checkpoint(arch, tmp_path / arch.name, num_layers=4)
        report = check_model(path)
        assert report.servable, f"{arch.name}: {report.reason}"
        assert report.model_type == arch.type
        assert (report.experts > 0) == arch.moe, arch.name


@pytest.mark.parametrize("arch", REFUSED, ids=lambda arch: arch.name)
def test_unservable_architectures_are_refused_with_their_reason(arch: RefusedArchitecture, tmp_path: Path) -> None:
    path = make_tiny_checkpoint(arch, tmp_path / arch.name, num_layers=4)
    report = check_model(path)
    assert not report.servable
    assert arch.says in report.reason
    with pytest.raises(UnsupportedModelError, match=arch.says):
        BlockSpan(ModelCheckpoint.open(path), 0, 1)
    with pytest.raises(UnsupportedModelError, match=arch.says):
        ClientHead(ModelCheckpoint.open(path))


def test_a_node_refuses_an_unservable_model_in_one_line_before_joining_a_swarm(tmp_path: Path) -> None:
    arch = REFUSED[0]
    path = make_tiny_checkpoint(arch, tmp_path / arch.name, num_layers=4)
    began = time.monotonic()
    result = subprocess.run(
        [*HIVEGEN, "node", "serve", "--model", str(path), "--blocks", "0:2", "--identity", str(tmp_path / "id")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, result.stderr
    assert arch.name in errors[0] and arch.says in errors[0]
    assert "started a new swarm" not in result.stdout
    assert time.monotonic() - began < 60


def test_a_multimodal_checkpoint_is_refused_saying_its_decoder_is_inside_it(tmp_path: Path) -> None:
    fuyu = RefusedArchitecture("fuyu", "Fuyu", "", "", {"patch_size": 4, "num_channels": 3})
    report = check_model(make_tiny_checkpoint(fuyu, tmp_path / "fuyu", num_layers=2))
    assert not report.servable
    assert "'fuyu' checkpoint keeps its text decoder inside the multimodal model" in report.reason


def test_models_check_names_the_weights_a_checkpoint_lacks(tmp_path: Path) -> None:
    path = make_tiny_checkpoint("llama", tmp_path / "llama", num_layers=4)
    weights = path / "model.safetensors"
    with safe_open(str(weights), framework="pt") as shard:
        kept = {k: shard.get_tensor(k) for k in shard.keys() if not k.startswith("model.layers.2.mlp.")}  # noqa: SIM118
    save_file(kept, str(weights), metadata={"format": "pt"})
    report = check_model(path)
    assert not report.servable
    assert "model.layers.2.mlp.down_proj.weight" in report.reason
    result = subprocess.run([*HIVEGEN, "models", "check", str(path)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "the checkpoint has no weights for model.layers.2.mlp" in result.stdout
    with pytest.raises(ModelLoadError, match=r"model\.layers\.2\.mlp"):
        BlockSpan(ModelCheckpoint.open(path), 2, 4)
    BlockSpan(ModelCheckpoint.open(path), 0, 2)  # the blocks it holds still load


def test_an_attention_implementation_the_model_lacks_is_refused_clearly(tmp_path: Path) -> None:
    path = make_tiny_checkpoint("llama", tmp_path / "llama", num_layers=2)
    with pytest.raises(UnsupportedModelError, match="no-such-kernel"):
        BlockSpan(ModelCheckpoint.open(path), 0, 1, attn_implementation="no-such-kernel")
    assert check_model(path, "eager").attn_implementation == "eager"
    assert check_model(path).attn_implementation == "sdpa"


def test_eager_and_sdpa_blocks_compute_the_same_hidden_states(tmp_path: Path) -> None:
    path = make_tiny_checkpoint("mistral", tmp_path / "mistral", num_layers=2)
    checkpoint = ModelCheckpoint.open(path)
    hidden = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(10).expand(2, -1)
    mask = torch.ones(2, 10, dtype=torch.int64)
    outputs = []
    for kernel in ("sdpa", "eager"):
        span = BlockSpan(checkpoint, 0, 2, attn_implementation=kernel)
        assert span.attn_implementation == kernel
        outputs.append(span.forward(hidden, positions, mask, span.new_cache()))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


def test_a_client_refuses_an_unservable_model_before_joining_a_swarm(tmp_path: Path) -> None:
    arch = REFUSED[0]
    path = make_tiny_checkpoint(arch, tmp_path / arch.name, num_layers=4)
    with pytest.raises(UnsupportedModelError, match=arch.says):
        RemoteModelForCausalLM.from_pretrained(path, ["/ip4/127.0.0.1/tcp/1/p2p/QmUnreachable"])


@pytest.mark.parametrize("arch", IN_PROCESS, ids=lambda arch: arch.name)
def test_more_architectures_are_exact_through_spans_in_one_process(arch: TinyArchitecture, tmp_path: Path) -> None:
    """The nodes' and the client's code over spans 0:1, 1:3, 3:4, greedy on a left-padded batch, equals generate."""
    path = make_tiny_checkpoint(arch, tmp_path / arch.name, num_layers=4)
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(3, 256, (2, 12), generator=generator)
    mask = torch.ones_like(input_ids)
    input_ids[1, :4], mask[1, :4] = 0, 0
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    expected = local.generate(
        input_ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert generate_greedy(path, [(0, 1), (1, 3), (3, 4)], input_ids, mask, 16).tolist() == expected.tolist()


def test_one_client_head_serves_concurrent_steps_each_with_its_own_blocks(tmp_path: Path) -> None:
    """Generations in several threads share a head (an API server does): a step's blocks are its own, even when
    another thread's step starts and ends between this step's start and its first block."""
    head = ClientHead(ModelCheckpoint.open(make_tiny_checkpoint("gpt2", tmp_path / "gpt2", num_layers=2)))
    ids, positions = torch.tensor([[5, 6, 7]]), torch.arange(3)[None]
    alone = {scale: head.step(ids, positions, lambda h, s=scale: h * s) for scale in (1.5, 0.5)}
    other_done = threading.Event()
    first = threading.current_thread()

    def hold_first_thread(*_: object) -> None:
        if threading.current_thread() is first:
            assert other_done.wait(30)

    hook = head.model.get_input_embeddings().register_forward_hook(hold_first_thread)
    results: dict[float, torch.Tensor] = {}

    def other() -> None:
        results[0.5] = head.step(ids, positions, lambda h: h * 0.5)
        other_done.set()

    thread = threading.Thread(target=other)
    try:
        thread.start()
        results[1.5] = head.step(ids, positions, lambda h: h * 1.5)  # its blocks are looked up after `other` ended
    finally:
        hook.remove()
        thread.join(30)
    assert torch.equal(results[1.5], alone[1.5])
    assert torch.equal(results[0.5], alone[0.5])
    assert not torch.equal(alone[1.5], alone[0.5])


def test_the_readme_lists_exactly_the_tested_and_refused_architectures() -> None:
    assert readme_section() in README.read_text(), "run: python scripts/architectures.py"
