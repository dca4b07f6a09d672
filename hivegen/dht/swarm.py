"""Start a hivemind DHT peer, join a swarm, and call into the DHT's process safely."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import hivemind

from hivegen.dht.signing import OwnerSignatureValidator, owned_subkey
from hivegen.errors import HivegenError
from hivegen.peers import check_peers

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Local and test swarms: no NAT traversal, no relays; peers talk to each other directly.
LOCAL_P2P_FLAGS: dict[str, bool] = {
    "nat_port_map": False,
    "auto_nat": False,
    "use_relay": False,
    "use_auto_relay": False,
}

# How long one call into the DHT may take before we give up on it.
DHT_CALL_TIMEOUT = 30.0


class SwarmError(HivegenError):
    """The DHT could not be started, joined, written or read."""


def start_dht(
    initial_peers: Sequence[str] | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    client_mode: bool = False,
) -> hivemind.DHT:
    """Start a DHT peer listening on host:port (0 = any free port), joining `initial_peers` if given.

    Every peer (node, client, coordinator) installs the owner-signature validator: it refuses to store, and
    ignores when reading, any record not signed by the owner of its subkey.
    """
    peers = check_peers([str(peer) for peer in initial_peers or ()])  # before the daemon: a typo is one line
    proto = "ip6" if ":" in host else "ip4"
    try:
        return hivemind.DHT(
            initial_peers=peers or None,
            start=True,
            client_mode=client_mode,
            host_maddrs=[f"/{proto}/{host}/tcp/{port}"],
            record_validators=[OwnerSignatureValidator()],
            **LOCAL_P2P_FLAGS,
        )
    except Exception as e:
        if peers:
            # p2pd's own text ("Daemon failed to start: <timestamp> failed to connect to bootstrap peers") says
            # less than this, and in its own format: name what happened instead.
            why = "no peer answered there" if "bootstrap peers" in str(e) else str(e).splitlines()[0][:300]
            raise SwarmError(
                f"could not join the swarm via {', '.join(peers)}: {why}; check --initial-peers (each must be the "
                "multiaddr of a running peer, /ip4/HOST/tcp/PORT/p2p/PEER_ID, as the cluster or a node prints it)"
            ) from e
        raise SwarmError(f"could not start a DHT peer on {host}:{port}: {e}") from e


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    """The multiaddrs (with /p2p/PEER_ID) that other peers pass as initial peers to join through this one."""
    return [str(maddr) for maddr in run_on_dht(dht, _get_visible_maddrs)]


def node_id(dht: hivemind.DHT, public_key_hex: str) -> str:
    """The id of a node on this DHT peer owned by `public_key_hex`: "<peer id base58>@<public key hex>".

    It is the node's DHT subkey; the key part says who may write under it, the peer id part tells apart
    several nodes of one owner.
    """
    try:
        peer_id = str(dht.peer_id.to_base58())
    except Exception as e:
        raise SwarmError(f"could not read the DHT peer id: {e}") from e
    return owned_subkey(peer_id, public_key_hex)


def run_on_dht(dht: hivemind.DHT, coro: Callable[[Any, Any], Awaitable[T]], timeout: float = DHT_CALL_TIMEOUT) -> T:
    """Run `coro(dht, node)` inside the DHT process; wrap any failure in SwarmError.

    `coro` is pickled to the DHT process, so it must be a module-level function (or a partial of one).
    """
    try:
        future = dht.run_coroutine(coro, return_future=True)
    except Exception as e:
        raise SwarmError(f"the DHT is not running ({type(e).__name__}: {e}); start it before using it") from e
    try:
        result: T = future.result(timeout=timeout)
        return result
    except Exception as e:
        future.cancel()  # stop the coroutine in the DHT process too
        raise SwarmError(f"DHT call failed: {type(e).__name__}: {e}") from e


async def _get_visible_maddrs(_dht: Any, node: Any) -> list[Any]:
    return list(await node.get_visible_maddrs())
