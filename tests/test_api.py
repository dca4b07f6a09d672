"""The OpenAI-compatible API end to end: a real `hivegen api serve` process in front of a real local cluster,
driven by the official `openai` package and by raw HTTP for what a well-behaved client never sends."""

from __future__ import annotations

import http.client
import json
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import grpc
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hivegen.cluster import LocalCluster
from hivegen.model.checkpoint import ModelCheckpoint
from hivegen.model.tiny_chat import make_tiny_chat_model
from hivegen.proto import node_pb2_grpc
from tests.conftest import ClusterFactory, wait_for
from tests.wire import info as stub_info

KEY = "sk-test-hivegen"
SPANS = [(0, 2), (2, 4)]
HELLO = [{"role": "user", "content": "Hello! How are you today?"}]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="module")
def orphan_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second model the API serves but no node does: its requests have no route."""
    return make_tiny_chat_model(tmp_path_factory.mktemp("orphan-chat"), seed=1)


@pytest.fixture(scope="module")
def cluster(
    chat_model: Path, orphan_model: Path, start_cluster: ClusterFactory, tmp_path_factory: pytest.TempPathFactory
) -> LocalCluster:
    store = tmp_path_factory.mktemp("api-store")
    args = ["--api-key", KEY, "--store", str(store), "--model", str(orphan_model), "--max-concurrency", "8"]
    return start_cluster(chat_model, spans=SPANS, api_port=0, api_args=args)


@pytest.fixture(scope="module")
def client(cluster: LocalCluster) -> openai.OpenAI:
    assert cluster.api is not None
    return openai.OpenAI(base_url=cluster.api.url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(chat_model: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(chat_model, attn_implementation="sdpa", dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(chat_model: Path) -> Any:
    return AutoTokenizer.from_pretrained(chat_model)


def transformers_answer(reference: Any, tokenizer: Any, prompt_ids: list[int], new: int) -> tuple[list[int], str]:
    """transformers' own greedy answer (stopping at the model's eos, as the API does) and its text."""
    out = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=new, do_sample=False)
    tokens = out[0, len(prompt_ids) :].tolist()
    return tokens, tokenizer.decode(tokens, skip_special_tokens=True)


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


def raw(cluster: LocalCluster, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
        key: str | None = KEY) -> tuple[int, dict[str, str], Any]:  # fmt: skip
    """One HTTP request to the API without the openai package: (status, headers, parsed JSON or text)."""
    assert cluster.api is not None
    url = urlparse(cluster.api.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    payload = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    sent = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {}),
            **(headers or {})}  # fmt: skip
    try:
        connection.request(method, url.path + path, body=payload, headers=sent)
        response = connection.getresponse()
        data = response.read().decode()
        got = {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()
    try:
        return response.status, got, json.loads(data)
    except json.JSONDecodeError:
        return response.status, got, data


def info(address: str) -> Any:
    with grpc.insecure_channel(address) as channel:
        return stub_info(node_pb2_grpc.NodeStub(channel))


def node_steps(cluster: LocalCluster) -> int:
    return sum(info(node.address).counters.steps for node in cluster.nodes)


def test_models_lists_what_the_server_serves_with_its_weights_digest(
    client: openai.OpenAI, chat_model: Path, orphan_model: Path
) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {ModelCheckpoint.open(chat_model).name, ModelCheckpoint.open(orphan_model).name}
    checkpoint = ModelCheckpoint.open(chat_model)
    assert models[checkpoint.name].model_extra["fingerprint"] == f"{checkpoint.name}@{checkpoint.digest}"


def test_greedy_chat_equals_transformers_and_reports_usage(
    client: openai.OpenAI, chat_model: Path, reference: Any, tokenizer: Any
) -> None:
    prompt = chat_ids(tokenizer, HELLO)
    tokens, text = transformers_answer(reference, tokenizer, prompt, 12)
    raw_answer = client.chat.completions.with_raw_response.create(
        model=chat_model.name, messages=HELLO, max_tokens=12, temperature=0
    )
    answer = raw_answer.parse()
    assert answer.choices[0].message.content == text
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == ("stop" if tokenizer.eos_token_id in tokens else "length")
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), len(tokens))
    checkpoint = ModelCheckpoint.open(chat_model)
    assert answer.system_fingerprint == f"{checkpoint.name}@{checkpoint.digest}"
    assert raw_answer.headers["x-hivegen-ref"] and raw_answer.headers["x-hivegen-cost"] == "0"


def test_the_same_request_again_is_replayed_without_touching_a_node(
    client: openai.OpenAI, cluster: LocalCluster, chat_model: Path
) -> None:
    messages = [{"role": "user", "content": "Once upon a time"}]
    first = client.chat.completions.with_raw_response.create(
        model=chat_model.name, messages=messages, max_tokens=6, temperature=0.8, seed=11
    )
    assert first.headers["x-hivegen-replayed"] == "false"
    steps = node_steps(cluster)
    again = client.chat.completions.with_raw_response.create(
        model=chat_model.name, messages=messages, max_tokens=6, temperature=0.8, seed=11
    )
    assert again.headers["x-hivegen-replayed"] == "true"
    assert again.headers["x-hivegen-ref"] == first.headers["x-hivegen-ref"]
    assert again.headers["x-hivegen-cost"] == "0"
    assert again.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert node_steps(cluster) == steps  # over the wire: no node ran a step for the replay


def test_streamed_chat_sends_the_same_text_as_the_whole_answer(client: openai.OpenAI, chat_model: Path) -> None:
    messages = [{"role": "user", "content": "Credits pay the nodes"}]
    whole = client.chat.completions.create(model=chat_model.name, messages=messages, max_tokens=10, seed=5)
    chunks = list(
        client.chat.completions.create(
            model=chat_model.name, messages=messages, max_tokens=10, seed=5, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_streams_end_with_done(cluster: LocalCluster, chat_model: Path) -> None:
    status, headers, body = raw(cluster, "POST", "/completions", {"model": chat_model.name, "prompt": "Hello",
                                                                  "max_tokens": 3, "stream": True})  # fmt: skip
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in body.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    assert all(json.loads(e)["object"] == "text_completion" for e in events[:-1])


def test_completions_take_a_list_of_prompts_and_n_choices_each(
    client: openai.OpenAI, chat_model: Path, reference: Any, tokenizer: Any
) -> None:
    prompts = ["The quick brown fox", "Hello! How"]
    answer = client.completions.create(model=chat_model.name, prompt=prompts, max_tokens=5, n=2, temperature=0)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    for p, prompt in enumerate(prompts):
        _, text = transformers_answer(reference, tokenizer, tokenizer(prompt)["input_ids"], 5)
        assert [answer.choices[2 * p + j].text for j in range(2)] == [text, text]  # greedy: both the same


def test_seeded_choices_differ_and_replay(client: openai.OpenAI, chat_model: Path) -> None:
    ask = {"model": chat_model.name, "prompt": "Once upon a time", "max_tokens": 8, "n": 3, "seed": 2,
           "temperature": 1.5}  # fmt: skip
    first = client.completions.with_raw_response.create(**ask)
    again = client.completions.with_raw_response.create(**ask)
    texts = [c.text for c in first.parse().choices]
    assert len(set(texts)) > 1  # choice i samples with seed + i
    assert [c.text for c in again.parse().choices] == texts
    assert again.headers["x-hivegen-replayed"] == "true"


def test_a_stop_string_ends_the_answer_before_it(client: openai.OpenAI, chat_model: Path) -> None:
    ask = {"model": chat_model.name, "prompt": "Credits pay", "max_tokens": 12, "temperature": 0}
    full = client.completions.create(**ask).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), full
    cut = client.completions.create(**ask, stop=[stop]).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    streamed = client.completions.create(**ask, stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.text


def test_concurrent_requests_each_get_their_own_answer(
    client: openai.OpenAI, chat_model: Path, reference: Any, tokenizer: Any
) -> None:
    prompts = [f"{word} the quick brown fox" for word in ("Once", "Hello", "Credits", "A", "The", "0", "How", "GPU")]
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        answers[i] = (
            client.completions.create(model=chat_model.name, prompt=prompts[i], max_tokens=6, temperature=0)
            .choices[0]
            .text
        )

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    expected = {i: transformers_answer(reference, tokenizer, tokenizer(p)["input_ids"], 6)[1]
                for i, p in enumerate(prompts)}  # fmt: skip
    assert answers == expected


def test_a_client_leaving_mid_stream_stops_its_generation(
    client: openai.OpenAI, cluster: LocalCluster, chat_model: Path
) -> None:
    new_tokens = 250  # the context is 256
    before = [info(n.address).counters.steps for n in cluster.nodes]
    stream = client.completions.create(model=chat_model.name, prompt="GPU", max_tokens=new_tokens, seed=9, stream=True)
    next(iter(stream))
    stream.close()
    wait_for(lambda: all(info(n.address).active_sessions == 0 for n in cluster.nodes), 30, "sessions to close")
    ran = [info(n.address).counters.steps - b for n, b in zip(cluster.nodes, before, strict=True)]
    assert all(0 < steps < new_tokens // 2 for steps in ran), ran
    assert client.completions.create(model=chat_model.name, prompt="GPU", max_tokens=2).choices  # still serving


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"top_p": 2}, "top_p"),
        ({"temperature": -1}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"n": 9}, "n"),
        ({"seed": -5}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logprobs": True}, "logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_invalid_parameters_are_400_naming_the_parameter(
    cluster: LocalCluster, chat_model: Path, body: dict[str, Any], param: str
) -> None:
    request = {"model": chat_model.name, "messages": HELLO, "max_tokens": 4, **body}
    status, _, answer = raw(cluster, "POST", "/chat/completions", request)
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["param"] == param
    assert param.split(".")[0].split("[")[0] in answer["error"]["message"]


def test_the_openai_package_sees_a_bad_request(client: openai.OpenAI, chat_model: Path) -> None:
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.chat.completions.create(model=chat_model.name, messages=HELLO, top_p=2)


def test_malformed_and_oversized_bodies_are_refused(cluster: LocalCluster) -> None:
    status, _, answer = raw(cluster, "POST", "/chat/completions", b"{not json")
    assert status == 400 and answer["error"]["type"] == "invalid_request_error"
    status, _, answer = raw(cluster, "POST", "/completions", b"x" * (5 << 20))
    assert status == 413 and answer["error"]["param"] == "body"


def test_without_the_api_key_requests_are_401(cluster: LocalCluster, chat_model: Path) -> None:
    for key in (None, "sk-wrong"):
        status, _, answer = raw(cluster, "GET", "/models", key=key)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        assert cluster.api is not None
        openai.OpenAI(base_url=cluster.api.url, api_key="sk-wrong", max_retries=0).models.list()


def test_an_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info_:
        client.chat.completions.create(model="gpt-5", messages=HELLO)
    assert info_.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_a_model_no_node_serves_is_503_naming_the_missing_blocks(cluster: LocalCluster, orphan_model: Path) -> None:
    for stream in (False, True):
        request = {"model": orphan_model.name, "messages": HELLO, "max_tokens": 2, "stream": stream}
        status, _, answer = raw(cluster, "POST", "/chat/completions", request)
        assert status == 503, answer
        assert answer["error"]["code"] == "no_route" and answer["error"]["missing_blocks"] == [0, 1, 2, 3]


def test_chat_in_the_terminal_keeps_the_conversation_and_resets_it(
    cluster: LocalCluster, chat_model: Path, reference: Any, tokenizer: Any, tmp_path: Path
) -> None:
    import subprocess
    import sys

    turns = "Hello!\nHow are you?\n/reset\nHello!\n/exit\n"
    done = subprocess.run(
        [sys.executable, "-m", "hivegen", "chat", "--model", str(chat_model), "--max-new-tokens", "6",
         "--store", str(tmp_path / "store"), "--initial-peers", *cluster.initial_peers],
        input=turns, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    answers = [line.removeprefix("assistant> ") for line in done.stdout.splitlines() if line.startswith("assistant> ")]
    history = [{"role": "user", "content": "Hello!"}]
    first = transformers_answer(reference, tokenizer, chat_ids(tokenizer, history), 6)[1]
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "How are you?"}]
    second = transformers_answer(reference, tokenizer, chat_ids(tokenizer, history), 6)[1]
    assert answers == [first, second, first]  # after /reset the model sees only the new question
    assert "(conversation reset)" in done.stderr


def test_idle_and_stalled_connections_do_not_block_others(client: openai.OpenAI, cluster: LocalCluster) -> None:
    import socket

    assert cluster.api is not None
    url = urlparse(cluster.api.url)
    hostile: list[socket.socket] = []
    try:
        for i in range(64):  # half send nothing, half stall inside a request body
            s = socket.create_connection((url.hostname, url.port), timeout=10)
            if i % 2:
                s.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"model":')
            hostile.append(s)
        models = client.models.list()  # answered while all 64 hang on
        assert models.data
    finally:
        for s in hostile:
            s.close()
