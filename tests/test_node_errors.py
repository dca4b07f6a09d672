"""A node refuses malformed or impossible requests with a precise gRPC status, and keeps serving everyone else.

All tests talk raw gRPC to one real node process serving every block of a tiny Llama.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from hivegen.cluster import LocalCluster
from hivegen.credits.attestation import StepClaim, history_digests, step_input_digest, tensor_digest, verify_claim
from hivegen.proto import node_pb2, node_pb2_grpc
from hivegen.proto.options import DEFAULT_MAX_MESSAGE_BYTES, grpc_options
from hivegen.proto.tensors import deserialize, serialize
from tests.wire import Request, Stream, exchange, info, new_id, open_request, refusal, step_request

CACHE_TOKENS = 1024  # small enough that a legal session (batch <= 64, max_length <= 256) can overfill it
TinyFactory = Callable[..., Path]  # the conftest fixtures' types
ClusterFactory = Callable[..., LocalCluster]


@pytest.fixture(scope="module")
def cluster(tiny_model: TinyFactory, start_cluster: ClusterFactory) -> LocalCluster:
    return start_cluster(tiny_model("llama"), spans=[(0, 6)], node_args=["--cache-tokens", str(CACHE_TOKENS)])


@pytest.fixture(scope="module")
def channel(cluster: LocalCluster) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(cluster.nodes[0].address, options=grpc_options()) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> node_pb2_grpc.NodeStub:
    return node_pb2_grpc.NodeStub(channel)


@pytest.fixture(scope="module")
def hidden_size(stub: node_pb2_grpc.NodeStub) -> int:
    return info(stub).hidden_size


# --- helpers -------------------------------------------------------------------------------------------------------


def wait_for_free_cache(stub: node_pb2_grpc.NodeStub, deadline_s: float = 10.0) -> node_pb2.NodeInfo:
    """Sessions close after their stream ends, asynchronously: poll until every cache token is free again."""
    deadline = time.monotonic() + deadline_s
    while (current := info(stub)).cache_tokens_free != current.cache_tokens_total and time.monotonic() < deadline:
        time.sleep(0.05)
    return current


# --- a valid session ------------------------------------------------------------------------------------------------


def test_a_session_opens_and_runs_prefill_then_decode(
    stub: node_pb2_grpc.NodeStub, cluster: LocalCluster, hidden_size: int
) -> None:
    sid = new_id()
    responses, error = exchange(
        stub,
        [
            open_request(cluster.model_key, sid),
            step_request(sid, 0, hidden_size, new=5),
            step_request(sid, 1, hidden_size, new=1, past=5),
        ],
    )
    assert error is None
    opened, prefill, decode = responses
    assert opened.opened.session_id == sid
    assert (opened.opened.start_block, opened.opened.end_block) == (0, 6)
    assert opened.opened.dtype == "float32"
    for result, step_id, new in [(prefill.result, 0, 5), (decode.result, 1, 1)]:
        assert result.session_id == sid
        assert result.step_id == step_id
        assert result.hidden_states.dtype == "float32"
        assert list(result.hidden_states.shape) == [1, new, hidden_size]


def test_counters_grow_with_sessions_steps_and_tokens(
    stub: node_pb2_grpc.NodeStub, cluster: LocalCluster, hidden_size: int
) -> None:
    before = info(stub).counters
    sid = new_id()
    batch = 2
    _, error = exchange(
        stub,
        [
            open_request(cluster.model_key, sid, batch_size=batch),
            step_request(sid, 0, hidden_size, new=5, batch=batch),
            step_request(sid, 1, hidden_size, new=1, past=5, batch=batch),
        ],
    )
    assert error is None
    after = info(stub).counters
    assert after.sessions_opened == before.sessions_opened + 1
    assert after.steps == before.steps + 2
    assert after.tokens_processed == before.tokens_processed + (5 + 1) * batch
    assert after.errors == before.errors


# --- refused steps --------------------------------------------------------------------------------------------------


def test_a_step_for_another_session_is_not_found(
    stub: node_pb2_grpc.NodeStub, cluster: LocalCluster, hidden_size: int
) -> None:
    sid, other = new_id(), new_id()
    error = refusal(stub, [open_request(cluster.model_key, sid), step_request(other, 0, hidden_size)])
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert f"unknown session {other}" in error.details()


def test_a_step_before_open_is_not_found(stub: node_pb2_grpc.NodeStub, hidden_size: int) -> None:
    sid = new_id()
    error = refusal(stub, [step_request(sid, 0, hidden_size)])
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "send `open` first" in error.details()


def test_hidden_states_of_the_wrong_width_are_invalid(
    stub: node_pb2_grpc.NodeStub, cluster: LocalCluster, hidden_size: int
) -> None:
    sid = new_id()
    error = refusal(stub, [open_request(cluster.model_key, sid), step_request(sid, 0, hidden_size - 1)])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"expected [1, new_tokens>=1, {hidden_size}]" in error.details()


def test_hidden_states_in_another_dtype_are_invalid(
    stub: node_pb2_grpc.NodeStub, cluster: LocalCluster, hidden_size: int
) -> None:
    sid = new_id()
    step = step_request(sid, 0, hidden_size, dtype=torch.float16)
    error = refusal(stub, [open_request(cluster.model_key, sid), step])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "this node runs float32" in error.details()


def test_hidden_states_with_nan_are_refused_so_the_node_cannot_be_blamed_for_them(
    stub: node_pb2_grpc.NodeStub, cluster: LocalCluster, hidden_size: int
) -> None:
    sid = new_id()
    step = step_request(sid, 0, hidden_size, new=3)
    poisoned = deserialize(step.step.hidden_states).clone()
    poisoned[0, 1, 0] = float("nan")
    step.step.hidden_states.CopyFrom(serialize(poisoned))
    error = refusal(stub, [open_request(cluster.model_key, sid), step])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "NaN or infinite" in error.details()


def test_every_answer_is_signed_by_the_node_key_over_its_whole_input_history(
    stub: node_pb2_grpc.NodeStub, cluster: LocalCluster, hidden_size: int
) -> None:
    sid = new_id()
    steps = [step_request(sid, 0, hidden_size, new=4), step_request(sid, 1, hidden_size, new=1, past=4)]
    responses, error = exchange(stub, [open_request(cluster.model_key, sid), *steps])
    assert error is None
    key = responses[0].opened.node_key
    assert cluster.nodes[0].node_id.endswith("@" + key)  # the key that owns the node's DHT records
    histories = history_digests([step_input_digest(s.step) for s in steps])
    for request, response, history in zip(steps, responses[1:], histories, strict=True):
        result = response.result
        claim = StepClaim(cluster.model_key, sid, request.step.step_id, 0, 6, step_input_digest(request.step),
                          tensor_digest(result.hidden_states), history)  # fmt: skip
        assert verify_claim(key, claim, result.signature)
        assert not verify_claim(key, StepClaim(**{**vars(claim), "history_digest": "0" * 64}), result.signature)


def test_positions_past_max_length_are_out_of_range(
    stub: node_pb2_grpc.NodeStub, cluster: LocalCluster, hidden_size: int
) -> None:
    sid = new_id()
    error = refusal(
        stub, [open_request(cluster.model_key, sid, max_length=4), step_request(sid, 0, hidden_size, new=5)]
    )
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "max_length 4" in error.details()


def test_tensor_bytes_one_float_short_are_invalid(
    stub: node_pb2_grpc.NodeStub, cluster: LocalCluster, hidden_size: int
) -> None:
    sid = new_id()
    step = step_request(sid, 0, hidden_size, new=2)
    step.step.hidden_states.data = step.step.hidden_states.data[:-4]
    error = refusal(stub, [open_request(cluster.model_key, sid), step])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"got {(2 * hidden_size - 1) * 4} bytes" in error.details()


def test_tensor_bytes_beyond_the_shape_are_invalid(
    stub: node_pb2_grpc.NodeStub, cluster: LocalCluster, hidden_size: int
) -> None:
    sid = new_id()
    step = step_request(sid, 0, hidden_size, new=2)
    step.step.hidden_states.data += b"\0" * 8
    error = refusal(stub, [open_request(cluster.model_key, sid), step])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"got {(2 * hidden_size + 2) * 4} bytes" in error.details()


def test_steps_out_of_order_are_a_failed_precondition(
    stub: node_pb2_grpc.NodeStub, cluster: LocalCluster, hidden_size: int
) -> None:
    sid = new_id()
    error = refusal(stub, [open_request(cluster.model_key, sid), step_request(sid, 1, hidden_size)])
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "expected step 0, got step 1" in error.details()


def test_a_message_over_the_size_limit_is_resource_exhausted(cluster: LocalCluster) -> None:
    """The node itself refuses it: this client may send twice the node's limit."""
    sid = new_id()
    too_big = DEFAULT_MAX_MESSAGE_BYTES + (1 << 20)
    step = Request(
        step=node_pb2.Step(
            session_id=sid,
            hidden_states=node_pb2.Tensor(data=bytes(too_big), dtype="float32", shape=[1, too_big // 4]),
        )
    )
    options = grpc_options(2 * DEFAULT_MAX_MESSAGE_BYTES)
    with grpc.insecure_channel(cluster.nodes[0].address, options=options) as big_channel:
        error = refusal(node_pb2_grpc.NodeStub(big_channel), [open_request(cluster.model_key, sid), step])
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "SERVER: Received message larger than max" in error.details()


# --- refused opens --------------------------------------------------------------------------------------------------


def test_another_model_key_is_a_failed_precondition(stub: node_pb2_grpc.NodeStub, cluster: LocalCluster) -> None:
    error = refusal(stub, [open_request("someone/else-model", new_id())])
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"this node serves model {cluster.model_key}, not someone/else-model" in error.details()


def test_blocks_outside_the_nodes_span_are_out_of_range(stub: node_pb2_grpc.NodeStub, cluster: LocalCluster) -> None:
    error = refusal(stub, [open_request(cluster.model_key, new_id(), start=2, end=7)])
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "blocks 2:7 are not inside this node's span 0:6" in error.details()


def test_batch_size_zero_is_invalid(stub: node_pb2_grpc.NodeStub, cluster: LocalCluster) -> None:
    error = refusal(stub, [open_request(cluster.model_key, new_id(), batch_size=0)])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "batch_size must be in 1.." in error.details()


def test_a_session_id_already_open_is_refused(stub: node_pb2_grpc.NodeStub, cluster: LocalCluster) -> None:
    sid = new_id()
    with Stream(stub) as first:
        assert first.send(open_request(cluster.model_key, sid)).opened.session_id == sid
        error = refusal(stub, [open_request(cluster.model_key, sid)])
        first.end()
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert f"session {sid} is already open" in error.details()


def test_a_session_larger_than_the_cache_is_refused_as_full(
    stub: node_pb2_grpc.NodeStub, cluster: LocalCluster
) -> None:
    total = info(stub).cache_tokens_total
    assert total == CACHE_TOKENS
    max_length = 256  # the tiny model's max_position_embeddings
    batch = total // max_length + 1
    error = refusal(stub, [open_request(cluster.model_key, new_id(), max_length=max_length, batch_size=batch)])
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "node is full" in error.details()


# --- the node after refusals ----------------------------------------------------------------------------------------


def test_a_refusal_leaves_other_sessions_serving(
    stub: node_pb2_grpc.NodeStub, cluster: LocalCluster, hidden_size: int
) -> None:
    errors_before = info(stub).counters.errors
    sid, bad = new_id(), new_id()
    with Stream(stub) as healthy:
        healthy.send(open_request(cluster.model_key, sid))
        prefill = healthy.send(step_request(sid, 0, hidden_size, new=3)).result
        assert list(prefill.hidden_states.shape) == [1, 3, hidden_size]
        error = refusal(stub, [open_request(cluster.model_key, bad), step_request(bad, 0, hidden_size - 1)])
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "hidden_states shape" in error.details()
        error = refusal(stub, [open_request("someone/else-model", new_id())])
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "this node serves model" in error.details()
        result = healthy.send(step_request(sid, 1, hidden_size, new=1, past=3)).result
        assert (result.step_id, list(result.hidden_states.shape)) == (1, [1, 1, hidden_size])
        healthy.end()
    assert info(stub).counters.errors == errors_before + 2
    assert cluster.nodes[0].process.poll() is None


def test_an_ended_stream_frees_its_cache_tokens(
    stub: node_pb2_grpc.NodeStub, cluster: LocalCluster, hidden_size: int
) -> None:
    total = wait_for_free_cache(stub).cache_tokens_total
    sid = new_id()
    with Stream(stub) as stream:
        stream.send(open_request(cluster.model_key, sid, max_length=32, batch_size=2))
        stream.send(step_request(sid, 0, hidden_size, new=4, batch=2))
        during = info(stub)
        assert (during.cache_tokens_free, during.active_sessions) == (total - 2 * 32, 1)
        stream.end()
    after = wait_for_free_cache(stub)
    assert (after.cache_tokens_free, after.active_sessions) == (total, 0)


def test_a_cancelled_stream_frees_its_cache_tokens(
    stub: node_pb2_grpc.NodeStub, cluster: LocalCluster, hidden_size: int
) -> None:
    total = wait_for_free_cache(stub).cache_tokens_total
    sid = new_id()
    with Stream(stub) as stream:
        stream.send(open_request(cluster.model_key, sid, max_length=32))
        stream.send(step_request(sid, 0, hidden_size, new=4))
        assert info(stub).cache_tokens_free == total - 32
    after = wait_for_free_cache(stub)
    assert (after.cache_tokens_free, after.active_sessions) == (total, 0)


def test_a_client_cancelling_its_stream_mid_step_is_not_logged_as_an_error(
    stub: node_pb2_grpc.NodeStub, cluster: LocalCluster, hidden_size: int
) -> None:
    """Clients end streams by cancelling them (a finished generation, a user who left): the node's answer to a
    step already running then has nowhere to go, which is normal and must not be logged as an internal error."""
    before = info(stub).counters
    for i in range(40):  # cancel at different moments of the step: before, during and as it answers
        sid = new_id()
        with Stream(stub) as stream:
            stream.send(open_request(cluster.model_key, sid, max_length=128))
            stream._requests.put(step_request(sid, 0, hidden_size, new=128))  # the answer is never read
            time.sleep(0.0005 * i)
    wait_for_free_cache(stub)
    log = cluster.nodes[0].log_file.read_text()
    assert "internal error" not in log and "Traceback" not in log
    after = info(stub).counters
    assert after.errors == before.errors and after.steps > before.steps  # steps ran; their answers found no one
    with Stream(stub) as stream:  # and the node serves on
        assert stream.send(open_request(cluster.model_key, new_id())).HasField("opened")
