"""Raw gRPC helpers for tests that talk to a node process directly, below the client."""

from __future__ import annotations

import queue
import uuid

import grpc
import torch

from hivegen.cluster import LocalCluster
from hivegen.coordinator.client import open_request as signed_open
from hivegen.credits.identity import Identity
from hivegen.proto import ledger_pb2, node_pb2, node_pb2_grpc
from hivegen.proto.options import grpc_options
from hivegen.proto.tensors import serialize

RPC_TIMEOUT = 60.0  # a deadline on every call, so a node that never answers fails the test instead of hanging it

Request = node_pb2.InferenceRequest


def info(stub: node_pb2_grpc.NodeStub) -> node_pb2.NodeInfo:
    return stub.Info(node_pb2.InfoRequest(), timeout=RPC_TIMEOUT)


def node_infos(cluster: LocalCluster) -> list[node_pb2.NodeInfo]:
    """Every cluster node's Info, in the order of `cluster.nodes`."""
    infos = []
    for node in cluster.nodes:
        with grpc.insecure_channel(node.address, options=grpc_options()) as channel:
            infos.append(info(node_pb2_grpc.NodeStub(channel)))
    return infos


def new_id() -> str:
    return uuid.uuid4().hex


def open_request(
    model_key: str,
    session_id: str,
    max_length: int = 16,
    batch_size: int = 1,
    start: int = 0,
    end: int = 6,
    client: Identity | None = None,
) -> Request:
    """Open a session; with `client`, as that paying identity (with its signed OpenAccount for the ledger)."""
    return Request(
        open=node_pb2.OpenSession(
            session_id=session_id,
            model_key=model_key,
            start_block=start,
            end_block=end,
            max_length=max_length,
            batch_size=batch_size,
            client_account=client.account if client else "",
            client_key=client.public_key_hex if client else "",
            ledger_open=signed_open(client) if client else None,
        )
    )


def step_request(
    session_id: str,
    step_id: int,
    hidden_size: int,
    new: int = 1,
    past: int = 0,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    receipt: ledger_pb2.Receipt | None = None,
) -> Request:
    """A valid step of `new` positions after `past` ones; tests then break one field of it."""
    hidden = torch.randn(batch, new, hidden_size, generator=torch.Generator().manual_seed(step_id)).to(dtype)
    return Request(
        step=node_pb2.Step(
            session_id=session_id,
            step_id=step_id,
            hidden_states=serialize(hidden),
            position_ids=serialize(torch.arange(past, past + new).expand(batch, new).contiguous()),
            attention_mask=serialize(torch.ones(batch, new, dtype=torch.int64)),
            receipt=receipt,
        )
    )


def exchange(
    stub: node_pb2_grpc.NodeStub, requests: list[Request]
) -> tuple[list[node_pb2.InferenceResponse], grpc.RpcError | None]:
    """Send every request on one stream, then half-close it; return the answers and the error that ended it."""
    responses: list[node_pb2.InferenceResponse] = []
    try:
        for response in stub.Inference(iter(requests), timeout=RPC_TIMEOUT):
            responses.append(response)
    except grpc.RpcError as exc:
        return responses, exc
    return responses, None


def refusal(stub: node_pb2_grpc.NodeStub, requests: list[Request]) -> grpc.RpcError:
    """The error status that ends a stream of `requests`; fails if the node accepted them all."""
    responses, error = exchange(stub, requests)
    assert error is not None, f"the node accepted every request: {responses}"
    return error


class Stream:
    """An Inference stream driven one request at a time, so that streams can be interleaved."""

    def __init__(self, stub: node_pb2_grpc.NodeStub) -> None:
        self._requests: queue.Queue[Request | None] = queue.Queue()
        self._call = stub.Inference(iter(self._requests.get, None), timeout=RPC_TIMEOUT)

    def send(self, request: Request) -> node_pb2.InferenceResponse:
        self._requests.put(request)
        return next(self._call)

    def end(self) -> None:
        """Half-close the stream and wait until the node ends it too."""
        self._requests.put(None)
        for _ in self._call:
            pass

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self._requests.put(None)
        self._call.cancel()
