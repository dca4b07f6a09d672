"""A node stays up for honest clients whatever idle or greedy streams do: streams that never open, sessions that
go silent (or whose client is SIGSTOPped), clients that want the whole cache; and its DHT record tells the truth
about its free cache throughout.

Real node processes of a tiny Llama, with short timeouts and small per-client limits so the module runs fast;
every client here is on 127.0.0.1, so the strict node limits loopback clients too (--unlimited-networks '').
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from hivegen.client import RemoteModelForCausalLM
from hivegen.cluster import ClusterNode, LocalCluster
from hivegen.dht import fetch_spans
from hivegen.node.limits import LOOPBACK, client_of, parse_networks
from hivegen.proto import node_pb2, node_pb2_grpc
from hivegen.proto.options import grpc_options
from tests.conftest import ClusterFactory, TinyFactory, greedy_reference
from tests.wire import Request, Stream, info, new_id, open_request, step_request

CACHE_TOKENS = 2048
OPEN_TIMEOUT = 2.0
IDLE_TIMEOUT = 3.0
CLIENT_SESSIONS = 3
CLIENT_TOKENS = 512
STRICT = [
    "--cache-tokens", str(CACHE_TOKENS), "--open-timeout", str(OPEN_TIMEOUT),
    "--session-idle-timeout", str(IDLE_TIMEOUT), "--max-sessions-per-client", str(CLIENT_SESSIONS),
    "--max-cache-tokens-per-client", str(CLIENT_TOKENS), "--unlimited-networks", "",
]  # fmt: skip
IDLE_STREAMS = 200
PROMPT = [5, 17, 99, 3, 42, 8, 61]
NEW = 8


@pytest.fixture(scope="module")
def model_path(tiny_model: TinyFactory) -> Path:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def cluster(model_path: Path, start_cluster: ClusterFactory) -> LocalCluster:
    """One strict node (nodes[0]); test 1 adds a patient one that holds idle streams longer than it runs."""
    return start_cluster(model_path, spans=[(0, 6)], node_args=STRICT)


@pytest.fixture(scope="module")
def strict(cluster: LocalCluster) -> ClusterNode:
    return cluster.nodes[0]


@pytest.fixture(scope="module")
def stub(strict: ClusterNode) -> Iterator[node_pb2_grpc.NodeStub]:
    with grpc.insecure_channel(strict.address, options=grpc_options()) as channel:
        yield node_pb2_grpc.NodeStub(channel)


@pytest.fixture(scope="module")
def hidden_size(stub: node_pb2_grpc.NodeStub) -> int:
    return info(stub).hidden_size


@pytest.fixture
def idle_node(stub: node_pb2_grpc.NodeStub) -> node_pb2.NodeInfo:
    """Each test starts on a node with its whole cache free (sessions of earlier tests close asynchronously)."""
    return wait_for_free_cache(stub)


# --- helpers -------------------------------------------------------------------------------------------------------


def wait_for_free_cache(stub: node_pb2_grpc.NodeStub, deadline_s: float = 10.0) -> node_pb2.NodeInfo:
    deadline = time.monotonic() + deadline_s
    while (current := info(stub)).cache_tokens_free != current.cache_tokens_total and time.monotonic() < deadline:
        time.sleep(0.05)
    assert current.cache_tokens_free == current.cache_tokens_total, f"cache never freed: {current}"
    return current


class SilentStream:
    """An Inference stream that sends only what it is told to (nothing, by default) and keeps the node's answer."""

    def __init__(self, stub: node_pb2_grpc.NodeStub, timeout: float = 60.0) -> None:
        self.requests: queue.Queue[Request | None] = queue.Queue()
        self.call = stub.Inference(iter(self.requests.get, None), timeout=timeout)

    def next(self) -> node_pb2.InferenceResponse:
        return next(self.call)

    def error(self) -> grpc.RpcError:
        """Wait for the node to end the stream; return how it ended it."""
        try:
            for response in self.call:
                raise AssertionError(f"the node answered a stream that asked nothing: {response}")
        except grpc.RpcError as exc:
            return exc
        raise AssertionError("the node ended the stream without an error")

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()


class SourceProxy:
    """Forwards TCP connections to `target` from another loopback address, so the node sees a second client on
    this machine (gRPC cannot pick a channel's source address)."""

    def __init__(self, target: str, source: str = "127.0.0.2") -> None:
        host, port = target.rsplit(":", 1)
        self.target, self.source = (host, int(port)), source
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.stopping = threading.Event()
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            upstream = socket.create_connection(self.target, timeout=10, source_address=(self.source, 0))
            upstream.settimeout(None)
            self.sockets += [conn, upstream]
            for src, dst in ((conn, upstream), (upstream, conn)):
                thread = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                thread.start()
                self.threads.append(thread)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.stopping.set()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self.threads:
            thread.join(5)
        for sock in [self.listener, *self.sockets]:
            sock.close()


@contextlib.contextmanager
def other_client(strict: ClusterNode) -> Iterator[node_pb2_grpc.NodeStub]:
    """A stub whose streams reach the node from 127.0.0.2: another client, as the node counts them."""
    proxy = SourceProxy(strict.address)
    try:
        with grpc.insecure_channel(proxy.address, options=grpc_options()) as channel:
            yield node_pb2_grpc.NodeStub(channel)
    finally:
        proxy.close()


# --- idle streams ---------------------------------------------------------------------------------------------------


def test_200_idle_streams_starve_neither_info_nor_an_honest_generation(cluster: LocalCluster, model_path: Path) -> None:
    """The attack that stopped the thread-per-stream node: streams that connect and never send `open`."""
    patient = cluster.add_node(0, 6, extra_args=["--open-timeout", "120"])
    expected = greedy_reference(model_path, PROMPT, NEW)
    channels = [grpc.insecure_channel(patient.address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(4)]  # fmt: skip
    idle: list[SilentStream] = []
    try:
        stubs = [node_pb2_grpc.NodeStub(channel) for channel in channels]
        idle = [SilentStream(stubs[i % len(stubs)], timeout=120) for i in range(IDLE_STREAMS)]
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=30)
        time.sleep(1.0)  # let every stream reach the node
        began = time.monotonic()
        node_info = stubs[0].Info(node_pb2.InfoRequest(), timeout=10)  # a thread-per-stream node never answers
        assert time.monotonic() - began < 2.0, "Info was slow to answer beside idle streams"
        assert node_info.cache_tokens_free == node_info.cache_tokens_total
        with RemoteModelForCausalLM.from_pretrained(
            model_path, cluster.initial_peers, dht=cluster.dht, allowed_nodes=[patient.node_id], verify="off"
        ) as model:
            out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, do_sample=False, eos_token_id=[])
            route = model.last_route
        assert [h.node_id for h in route] == [patient.node_id]
        assert out[0, len(PROMPT) :].tolist() == expected
        assert not any(stream.call.done() for stream in idle), "the node dropped idle streams it should hold"
        assert stubs[0].Info(node_pb2.InfoRequest(), timeout=10).counters.steps >= NEW
    finally:
        for stream in idle:
            stream.close()
        for channel in channels:
            channel.close()


def test_a_stream_that_never_opens_is_closed_after_the_open_timeout(
    stub: node_pb2_grpc.NodeStub, idle_node: node_pb2.NodeInfo
) -> None:
    began = time.monotonic()
    stream = SilentStream(stub)
    try:
        error = stream.error()
    finally:
        stream.close()
    elapsed = time.monotonic() - began
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert f"no `open` within {OPEN_TIMEOUT:g} s" in error.details()
    assert "--open-timeout" in error.details()
    assert OPEN_TIMEOUT - 0.5 <= elapsed <= OPEN_TIMEOUT + 5


# --- idle sessions --------------------------------------------------------------------------------------------------


def test_an_idle_session_is_closed_after_the_idle_timeout_and_its_cache_freed(
    stub: node_pb2_grpc.NodeStub, strict: ClusterNode, cluster: LocalCluster, hidden_size: int,
    idle_node: node_pb2.NodeInfo,
) -> None:  # fmt: skip
    total, sid = idle_node.cache_tokens_total, new_id()
    stream = SilentStream(stub)
    try:
        stream.requests.put(open_request(cluster.model_key, sid, max_length=64))
        assert stream.next().opened.session_id == sid
        stream.requests.put(step_request(sid, 0, hidden_size, new=4))
        assert stream.next().result.step_id == 0
        went_silent = time.monotonic()
        assert (info(stub).cache_tokens_free, info(stub).active_sessions) == (total - 64, 1)
        error = stream.error()
    finally:
        stream.close()
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert f"session {sid} was idle for {IDLE_TIMEOUT:g} s" in error.details()
    assert "--session-idle-timeout" in error.details()
    assert IDLE_TIMEOUT - 0.5 <= time.monotonic() - went_silent <= IDLE_TIMEOUT + 5
    after = wait_for_free_cache(stub, deadline_s=5)
    assert (after.cache_tokens_free, after.active_sessions) == (total, 0)


STOPPED_CLIENT = textwrap.dedent(
    """
    import sys, queue, threading, grpc
    from hivegen.proto import node_pb2, node_pb2_grpc
    address, model_key, sid = sys.argv[1:4]
    requests = queue.Queue()
    channel = grpc.insecure_channel(address)
    call = node_pb2_grpc.NodeStub(channel).Inference(iter(requests.get, None))
    requests.put(node_pb2.InferenceRequest(open=node_pb2.OpenSession(
        session_id=sid, model_key=model_key, start_block=0, end_block=6, max_length=128, batch_size=2)))
    print(next(call).opened.session_id, flush=True)
    threading.Event().wait()
    """
)


def test_a_sigstopped_clients_reservation_is_freed_after_the_idle_timeout(
    stub: node_pb2_grpc.NodeStub, strict: ClusterNode, cluster: LocalCluster, idle_node: node_pb2.NodeInfo
) -> None:
    """The client process is frozen with its connection open: nothing ends the stream but the node's timeout."""
    total, sid = idle_node.cache_tokens_total, new_id()
    client = subprocess.Popen(
        [sys.executable, "-c", STOPPED_CLIENT, strict.address, cluster.model_key, sid],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout is not None
        answered: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: answered.put(client.stdout.readline() if client.stdout else ""),
                         daemon=True).start()  # fmt: skip
        assert answered.get(timeout=60).strip() == sid
        os.kill(client.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        assert info(stub).cache_tokens_free == total - 2 * 128
        deadline = stopped + IDLE_TIMEOUT + 5
        while info(stub).cache_tokens_free != total and time.monotonic() < deadline:
            time.sleep(0.1)
        freed = time.monotonic() - stopped
        after = info(stub)
        assert (after.cache_tokens_free, after.active_sessions) == (total, 0)
        assert freed >= IDLE_TIMEOUT - 0.5
        assert client.poll() is None  # the node freed the cache on its own: the client is still there, frozen
    finally:
        client.kill()  # SIGKILL ends a stopped process too
        client.wait(30)


# --- per-client limits ----------------------------------------------------------------------------------------------


def test_the_per_client_session_limit_refuses_while_others_are_served(
    stub: node_pb2_grpc.NodeStub, strict: ClusterNode, cluster: LocalCluster, idle_node: node_pb2.NodeInfo
) -> None:
    total = idle_node.cache_tokens_total
    with contextlib.ExitStack() as held:
        for stream in [held.enter_context(Stream(stub)) for _ in range(CLIENT_SESSIONS)]:
            sid = new_id()
            assert stream.send(open_request(cluster.model_key, sid, max_length=16)).opened.session_id == sid
        refused = SilentStream(stub)
        refused.requests.put(open_request(cluster.model_key, new_id(), max_length=16))
        error = refused.error()
        refused.close()
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "per-client session limit" in error.details()
        assert f"--max-sessions-per-client {CLIENT_SESSIONS}" in error.details()
        assert "end a session's stream before opening another" in error.details()
        assert info(stub).cache_tokens_free == total - CLIENT_SESSIONS * 16  # the cache is there for others
        with other_client(strict) as other, Stream(other) as stream:
            sid = new_id()
            assert stream.send(open_request(cluster.model_key, sid, max_length=16)).opened.session_id == sid
            assert info(stub).active_sessions == CLIENT_SESSIONS + 1
            stream.end()


def test_the_per_client_cache_limit_refuses_while_others_are_served(
    stub: node_pb2_grpc.NodeStub, strict: ClusterNode, cluster: LocalCluster, idle_node: node_pb2.NodeInfo
) -> None:
    total = idle_node.cache_tokens_total
    with Stream(stub) as big:
        sid = new_id()
        opened = big.send(open_request(cluster.model_key, sid, max_length=CLIENT_TOKENS // 4, batch_size=4))
        assert opened.opened.session_id == sid
        refused = SilentStream(stub)
        refused.requests.put(open_request(cluster.model_key, new_id(), max_length=16))
        error = refused.error()
        refused.close()
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "per-client cache limit" in error.details()
        assert f"holds {CLIENT_TOKENS} cache tokens" in error.details()
        assert "--max-cache-tokens-per-client" in error.details()
        assert info(stub).cache_tokens_free == total - CLIENT_TOKENS
        with other_client(strict) as other, Stream(other) as stream:
            sid = new_id()
            opened = stream.send(open_request(cluster.model_key, sid, max_length=CLIENT_TOKENS // 4, batch_size=4))
            assert opened.opened.session_id == sid
            assert info(stub).cache_tokens_free == total - 2 * CLIENT_TOKENS
            stream.end()
        big.end()


def test_one_session_larger_than_a_clients_share_is_refused(
    stub: node_pb2_grpc.NodeStub, cluster: LocalCluster, idle_node: node_pb2.NodeInfo
) -> None:
    stream = SilentStream(stub)
    stream.requests.put(open_request(cluster.model_key, new_id(), max_length=CLIENT_TOKENS + 1))
    error = stream.error()
    stream.close()
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"needs {CLIENT_TOKENS + 1} more" in error.details()
    assert info(stub).cache_tokens_free == idle_node.cache_tokens_total


@pytest.mark.parametrize(
    ("peer", "account", "client"),
    [
        ("ipv4:203.0.113.7:54321", "", "address 203.0.113.7"),
        ("ipv6:%5B2001:db8::5%5D:443", "", "address 2001:db8::/64"),  # one IPv6 client is its /64
        ("ipv6:[::ffff:203.0.113.7]:5", "", "address 203.0.113.7"),
        ("ipv4:127.0.0.1:5", "", None),  # this machine: unlimited by default
        ("ipv6:%5B::1%5D:5", "", None),
        ("ipv4:127.0.0.1:5", "acct1", "account acct1"),  # on a paid node, the account, wherever it connects from
    ],
)
def test_a_client_is_its_account_on_a_paid_node_else_its_address(peer: str, account: str, client: str | None) -> None:
    assert client_of(peer, account, parse_networks(LOOPBACK)) == client


# --- the DHT record -------------------------------------------------------------------------------------------------


def test_the_dht_record_advertises_the_free_cache_info_reports(
    stub: node_pb2_grpc.NodeStub, strict: ClusterNode, cluster: LocalCluster, idle_node: node_pb2.NodeInfo
) -> None:
    assert cluster.dht is not None
    dht = cluster.dht

    def advertised() -> int:
        return fetch_spans(dht, cluster.model_key, cluster.num_blocks)[strict.node_id].cache_tokens_free

    def settle_on(expected: int, deadline_s: float = 5.0) -> int:
        deadline = time.monotonic() + deadline_s
        while (seen := advertised()) != expected and time.monotonic() < deadline:
            time.sleep(0.2)
        return seen

    total = idle_node.cache_tokens_total
    assert settle_on(total) == total
    with Stream(stub) as first, Stream(stub) as second:
        first.send(open_request(cluster.model_key, new_id(), max_length=100))
        second.send(open_request(cluster.model_key, new_id(), max_length=50, batch_size=2))
        reserved = info(stub).cache_tokens_free
        assert reserved == total - (112 + 2 * 64)  # whole pages of 16 positions: 100 -> 112, 50 -> 64 a row
        assert settle_on(reserved) == reserved  # well before the record's periodic refresh (every ttl / 3 = 10 s)
        first.end()
        second.end()
    assert wait_for_free_cache(stub).cache_tokens_free == total
    assert settle_on(total) == total
