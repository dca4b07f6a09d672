"""Per-client limits of a node: who a client is (its account, else its address), and how many sessions and
cache tokens each client may hold, so that no stranger can take the whole node."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote

import grpc

from hivegen.node.errors import RequestError

LOOPBACK = ("127.0.0.0/8", "::1/128")  # this machine: the operator's own tools (e.g. an API server), unlimited
IPV6_CLIENT_PREFIX = 64  # one IPv6 client is a /64: whoever has one address has the 2**64 around it too

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def peer_host(peer: str) -> str:
    """The address in a gRPC peer string: "ipv4:10.0.0.5:54321" -> "10.0.0.5", "ipv6:[::1]:54321" (or its
    percent-encoded form "ipv6:%5B::1%5D:54321") -> "::1"; other forms ("unix:/path") are returned whole."""
    kind, _, rest = unquote(peer).partition(":")
    if kind not in ("ipv4", "ipv6") or ":" not in rest:
        return peer
    host = rest.rpartition(":")[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def parse_networks(specs: Iterable[str]) -> tuple[Network, ...]:
    """CIDR strings ("10.0.0.0/8", "::1/128", a bare address) as networks; ValueError names a bad one."""
    networks = []
    for spec in specs:
        try:
            networks.append(ipaddress.ip_network(spec.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"{spec!r} is not a network: use CIDR notation such as 10.0.0.0/8 or ::1/128") from exc
    return tuple(networks)


def client_of(peer: str, account: str = "", unlimited: tuple[Network, ...] = ()) -> str | None:
    """Who the per-client limits count a session against: "account <id>" on a paid node (the account the
    session is charged to, proven by its key), else the peer's IP address (an IPv6 peer's /64). None for a
    peer inside an `unlimited` network, which no per-client limit applies to."""
    if account:
        return f"account {account}"
    host = peer_host(peer)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"peer {peer}"  # not an IP address (a unix socket): the peer string is all there is
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip.version == net.version and ip in net for net in unlimited):
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        return f"address {ipaddress.ip_network(f'{ip}/{IPV6_CLIENT_PREFIX}', strict=False)}"
    return f"address {ip}"


@dataclass
class _Held:
    sessions: int = 0
    tokens: int = 0


class ClientQuotas:
    """Open sessions and reserved cache tokens per client, refused past `max_sessions` / `max_tokens`.

    Thread-safe: sessions are admitted on worker threads and released on the event loop."""

    def __init__(self, max_sessions: int, max_tokens: int) -> None:
        if max_sessions < 1 or max_tokens < 1:
            raise ValueError(f"per-client limits must be >= 1, got {max_sessions} sessions and {max_tokens} tokens")
        self.max_sessions = max_sessions
        self.max_tokens = max_tokens
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()

    def check(self, client: str, tokens: int) -> None:
        """Refuse (RESOURCE_EXHAUSTED) if `client` may not open one more session of `tokens` cache tokens."""
        with self._lock:
            self._check(client, tokens)

    def acquire(self, client: str, tokens: int) -> None:
        """Count one more session of `tokens` cache tokens against `client`, or refuse as check does."""
        with self._lock:
            held = self._check(client, tokens)
            self._held[client] = _Held(held.sessions + 1, held.tokens + tokens)

    def _check(self, client: str, tokens: int) -> _Held:
        held = self._held.get(client, _Held())
        if held.sessions + 1 > self.max_sessions:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"per-client session limit: {client} already has {held.sessions} open sessions on this node, "
                f"the most one client may hold (--max-sessions-per-client {self.max_sessions}); end a session's "
                "stream before opening another, or use another node",
            )
        if held.tokens + tokens > self.max_tokens:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"per-client cache limit: {client} holds {held.tokens} cache tokens on this node and this session "
                f"needs {tokens} more (batch x max_length), over the {self.max_tokens} one client may reserve "
                "(--max-cache-tokens-per-client); end other sessions, open a smaller one (batch_size or "
                "max_length), or use another node",
            )
        return held

    def release(self, client: str, tokens: int) -> None:
        """Give back one session of `tokens` counted by acquire."""
        with self._lock:
            held = self._held.get(client)
            if held is None:
                return
            held.sessions -= 1
            held.tokens -= tokens
            if held.sessions <= 0:
                del self._held[client]

    def held(self, client: str) -> tuple[int, int]:
        """(open sessions, reserved cache tokens) of `client`."""
        with self._lock:
            held = self._held.get(client, _Held())
            return held.sessions, held.tokens
