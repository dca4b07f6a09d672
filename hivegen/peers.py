"""Initial peers as users give them: `--initial-peers` flags, or `$HIVEGEN_INITIAL_PEERS`, checked before anything
starts (no torch, no hivemind), so a typo is one line at once instead of a daemon's error seconds later; and the
`--coordinator` flag every command shares, defaulting to `$HIVEGEN_COORDINATOR`."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from typing import Any

from hivegen.errors import HivegenError

PEERS_ENV = "HIVEGEN_INITIAL_PEERS"
COORDINATOR_ENV = "HIVEGEN_COORDINATOR"
PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{40,64}")  # base58: libp2p peer ids (Qm..., 12D3KooW...)
EXAMPLE = "/ip4/HOST/tcp/PORT/p2p/PEER_ID"


class InvalidPeerAddress(HivegenError):
    """An initial peer is not the full multiaddr of a peer."""


def check_peer(text: str) -> str:
    """`text` if it is a multiaddr that names a peer: /ip4|ip6|dns|dns4|dns6/HOST/tcp|udp/PORT/.../p2p/PEER_ID."""
    parts = text.split("/")
    why = _problem(parts) if text.startswith("/") else "it must begin with /"
    if why:
        raise InvalidPeerAddress(f"initial peer {text[:200]!r} is not a peer's multiaddr: {why}; expected {EXAMPLE} "
                                 "(the cluster, coordinator and nodes print theirs)")  # fmt: skip
    return text


def _problem(parts: list[str]) -> str:
    if len(parts) < 7 or parts[-2] != "p2p":
        return "it must end in /p2p/PEER_ID"
    if not PEER_ID.fullmatch(parts[-1]):
        return f"{parts[-1][:80]!r} is not a peer id"
    kind, host, transport, port = parts[1:5]
    if kind in ("ip4", "ip6"):
        try:
            ipaddress.IPv4Address(host) if kind == "ip4" else ipaddress.IPv6Address(host)
        except ValueError:
            return f"{host[:80]!r} is not an {kind} address"
    elif kind not in ("dns", "dns4", "dns6") or not host:
        return f"it must start with /ip4/, /ip6/ or /dns/, not /{kind[:20]}/"
    if transport not in ("tcp", "udp") or not port.isdigit() or not 0 < int(port) < 65536:
        return "it must name a /tcp/PORT (or /udp/PORT) between 1 and 65535"
    return ""


def env_peers() -> list[str]:
    """$HIVEGEN_INITIAL_PEERS split on commas and spaces."""
    return [p for p in re.split(r"[,\s]+", os.environ.get(PEERS_ENV, "")) if p]


def add_peers_argument(parser: Any, required: bool, help: str) -> None:
    """An `--initial-peers` flag whose default is $HIVEGEN_INITIAL_PEERS; required only when that is unset too."""
    default = env_peers()
    parser.add_argument(
        "--initial-peers", nargs="+" if required else "*", default=default, required=required and not default,
        metavar="MULTIADDR", help=f"{help} (default: ${PEERS_ENV}, comma- or space-separated)",
    )  # fmt: skip


def add_coordinator_argument(parser: Any, help: str, metavar: str = "HOST:PORT") -> None:
    """A `--coordinator` flag whose default is $HIVEGEN_COORDINATOR (None when both are unset)."""
    parser.add_argument("--coordinator", metavar=metavar, default=os.environ.get(COORDINATOR_ENV) or None,
                        help=f"{help} (default: ${COORDINATOR_ENV})")  # fmt: skip


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a process this one starts with explicit peers and coordinator: the user's
    $HIVEGEN_INITIAL_PEERS and $HIVEGEN_COORDINATOR must not leak into it as defaults."""
    env = {k: v for k, v in os.environ.items() if k not in (PEERS_ENV, COORDINATOR_ENV)}
    return {**env, **extra}


def check_peers(peers: Sequence[str]) -> list[str]:
    return [check_peer(p) for p in peers]
