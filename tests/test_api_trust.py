"""A lying node behind the HTTP API: text already streamed cannot be taken back, so a stream whose tokens
verification retracts ends with an error that says what to do, and the same request again gets the corrected
answer from the store; nothing wrong is ever stored or sent as a whole answer."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hivegen.cluster import ClusterNode, LocalCluster
from hivegen.model.tiny_chat import make_tiny_chat_model
from hivegen.store.directory import open_store
from hivegen.store.inspect import generations
from tests.conftest import ClusterFactory

HONEST = [(0, 2), (0, 2), (2, 4), (2, 4)]
ADVERSARY = Path(__file__).with_name("adversary.py")
PROMPT = "Once upon a time, in a land far away"
NEW = 12


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_chat_model(tmp_path_factory.mktemp("trust-chat"))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("api-store")


@pytest.fixture(scope="module")
def cluster(chat_model: Path, store: Path, start_cluster: ClusterFactory) -> LocalCluster:
    return start_cluster(chat_model, spans=HONEST)


@pytest.fixture(scope="module")
def cheater(cluster: LocalCluster, chat_model: Path, store: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A node on blocks 0:2 that adds noise to every answer and claims to be the fastest, so routes go through it;
    then the API server, which re-executes every hop elsewhere (--verify all)."""
    control = tmp_path_factory.mktemp("adversary") / "control.json"
    control.write_text(json.dumps({"mode": "noise"}))
    node = cluster.add_node(0, 2, launcher=[sys.executable, str(ADVERSARY), str(control)])
    cluster.start_api(0, ["--verify", "all", "--store", str(store)])
    return node


@pytest.fixture(scope="module")
def expected(chat_model: Path) -> str:
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    model = AutoModelForCausalLM.from_pretrained(chat_model, attn_implementation="sdpa", dtype=torch.float32)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=NEW, do_sample=False)
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def test_a_stream_retracted_by_verification_ends_with_an_error_and_the_retry_is_correct(
    cluster: LocalCluster, cheater: ClusterNode, chat_model: Path, store: Path, expected: str
) -> None:
    assert cluster.api is not None
    api = openai.OpenAI(base_url=cluster.api.url, api_key="unused", max_retries=0, timeout=120)
    ask = {"model": chat_model.name, "prompt": PROMPT, "max_tokens": NEW, "temperature": 0}
    streamed = ""
    with pytest.raises(openai.APIError, match="send the same request again"):
        for chunk in api.completions.create(**ask, stream=True):
            streamed += chunk.choices[0].text if chunk.choices else ""
    assert streamed and streamed != expected  # the cheater's tokens were shown, then voided
    again = api.completions.with_raw_response.create(**ask)
    assert again.parse().choices[0].text == expected
    assert again.headers["x-hivegen-replayed"] == "true"  # the corrected run was stored while the stream ended
    assert [g.text for g in generations(open_store(store))] == [expected]  # nothing wrong was ever stored
