"""Shared fixtures: tiny random checkpoints and real local clusters (DHT + node processes)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from hivegen.cluster import LocalCluster
from hivegen.credits.identity import IDENTITY_ENV
from hivegen.model.demo import hivegen_home
from hivegen.model.tiny import make_tiny_checkpoint

torch.set_num_threads(1)
T = TypeVar("T")

TinyFactory = Callable[..., Path]
ClusterFactory = Callable[..., LocalCluster]


def greedy_reference(model: Path, prompt: list[int], new: int, dtype: torch.dtype = torch.float32) -> list[int]:
    """The tokens transformers' own generate gives greedily for `prompt` (eos off): the bar for exactness."""
    from transformers import AutoModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(model, attn_implementation="sdpa", dtype=dtype)
    out = local.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    return list(out[0, len(prompt) :].tolist())


def wait_for(predicate: Callable[[], T], timeout: float = 120.0, what: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy (returned), or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="session", autouse=True)
def private_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Tests never touch the user's ~/.hivegen: a private HIVEGEN_HOME (ban list, evidence, default store) and a
    throwaway HIVEGEN_IDENTITY. Prepared demo models are shared with the real home (a symlink), so the SmolLM2
    conversion is not redone for every run."""
    home = tmp_path_factory.mktemp("hivegen-home")
    real_models = hivegen_home() / "models"
    real_models.mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(real_models, target_is_directory=True)
    saved = {name: os.environ.get(name) for name in ("HIVEGEN_HOME", IDENTITY_ENV)}
    os.environ["HIVEGEN_HOME"] = str(home)
    os.environ[IDENTITY_ENV] = str(home / "identity")
    try:
        yield home
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyFactory:
    """tiny_model(arch, num_layers=6, seed=0) -> checkpoint dir, built once per session."""
    built: dict[tuple[str, int, int], Path] = {}

    def make(arch: str, num_layers: int = 6, seed: int = 0) -> Path:
        key = (arch, num_layers, seed)
        if key not in built:
            built[key] = make_tiny_checkpoint(
                arch, tmp_path_factory.mktemp(f"{arch}-{num_layers}-{seed}"), num_layers, seed
            )
        return built[key]

    return make


@pytest.fixture(scope="module")
def start_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterFactory]:
    """start_cluster(model, spans=[(0, 3), (3, 6)], ...) -> a started LocalCluster, stopped after the module."""
    clusters: list[LocalCluster] = []

    def start(model: Path, spans: list[tuple[int, int]] | None = None, **kwargs: object) -> LocalCluster:
        cluster = LocalCluster(
            model,
            spans=spans,
            node_threads=1,
            work_dir=tmp_path_factory.mktemp("cluster"),
            **kwargs,  # type: ignore[arg-type]
        )
        clusters.append(cluster)
        return cluster.start()

    try:
        yield start
    finally:
        for cluster in clusters:
            cluster.stop()
