"""`hivegen node serve`: its options, and the command that runs a node until it is stopped."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hivegen.model.demo import resolve_model_path
from hivegen.node.defaults import (
    DEFAULT_BATCH_WAIT,
    DEFAULT_MAX_ROWS,
    DEFAULT_PREFILL_CHUNK,
    MAX_BATCH_WAIT,
    MAX_BATCH_WAIT_SET,
)
from hivegen.peers import add_coordinator_argument, add_peers_argument
from hivegen.process import StopSignals, tie_process_tree


def _blocks(text: str) -> tuple[int, int]:
    try:
        start_text, end_text = text.split(":")
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks takes START:END, e.g. 0:10 (got {text!r})") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"--blocks {text}: need 0 <= START < END")
    return start, end


SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def _size(text: str) -> int:
    """An argparse type: a memory size such as 4GiB, 512MB, 1.5gb or 1000000 (bytes)."""
    number = text.strip().rstrip("bBiIkKmMgGtT")
    unit = text.strip()[len(number) :].lower()
    try:
        value = float(number) * SIZE_UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: write e.g. 4GiB, 512MB or a number of bytes"
        ) from None
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text}")
    return int(value)


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type: `kind` (int or float) of the text, which must be > 0."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
        return value

    return parse


def _batch_wait(text: str) -> float | None:
    """An argparse type: `auto` (None) or seconds in [0, MAX_BATCH_WAIT_SET]."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'auto' nor a number of seconds") from None
    if not (0 <= value <= MAX_BATCH_WAIT_SET):
        raise argparse.ArgumentTypeError(
            f"must be 'auto' or a number of seconds from 0 to {MAX_BATCH_WAIT_SET:g}, got {text}"
        )
    return value


def _networks(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated CIDR networks ('' for none), each checked."""
    from hivegen.node.limits import parse_networks

    specs = tuple(part.strip() for part in text.split(",") if part.strip())
    try:
        parse_networks(specs)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return specs


def cmd_node_serve(args: argparse.Namespace) -> int:
    tie_process_tree()
    import torch

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    from hivegen.node.server import NodeConfig, NodeServer

    start, end = args.blocks or (None, None)
    stop = StopSignals()
    node = NodeServer(
        NodeConfig(
            model=resolve_model_path(args.model), start=start, end=end, num_blocks=args.num_blocks,
            memory=args.memory, throughput=args.throughput, rebalance_interval=args.rebalance_interval,
            drain_seconds=args.drain_seconds,
            announce_ttl=args.announce_ttl, initial_peers=args.initial_peers or [],
            attn_implementation=args.attn_implementation,
            host=args.host, port=args.port, dht_port=args.dht_port, device=args.device, dtype=args.dtype,
            cache_tokens=args.cache_tokens, cache_memory=args.cache_memory, max_batch_rows=args.max_batch_rows,
            prefill_chunk=args.prefill_chunk, batch_wait=args.batch_wait,
            ready_file=Path(args.ready_file) if args.ready_file else None,
            coordinator=args.coordinator, identity=Path(args.identity) if args.identity else None,
            data=Path(args.data) if args.data else None, unpaid_steps=args.unpaid_steps,
            unpaid_credits=args.unpaid_credits, submit_interval=args.submit_interval,
            open_timeout=args.open_timeout, session_idle_timeout=args.session_idle_timeout,
            max_sessions_per_client=args.max_sessions_per_client,
            max_cache_tokens_per_client=args.max_cache_tokens_per_client,
            unlimited_networks=args.unlimited_networks, metrics_port=args.metrics_port,
        )
    )  # fmt: skip
    try:
        node.start()
        chosen = " (placed where the swarm serves the least; it moves when that helps)" if node.placed else ""
        print(
            f"hivegen node: serving blocks {node.start_block}:{node.end_block} of {node.model_key} at "
            f"{node.address}{chosen}",
            flush=True,
        )
        if node.identity is not None:
            print(f"node account {node.identity.account} (key {node.identity_path})", flush=True)
        if node.metrics_url:
            print(f"metrics at {node.metrics_url}", flush=True)
        if node.billing is not None:
            print(f"charging credits to {node.billing.account} (ledger {args.coordinator})", flush=True)
        if not args.initial_peers:
            print("started a new swarm; others join it with:", flush=True)
            print("  --initial-peers " + " ".join(node.join_addresses()), flush=True)
        stop.wait()
    finally:
        node.stop()
    print("hivegen node: stopped and withdrawn from the DHT", flush=True)
    return 0


def add_commands(commands: Any) -> None:
    """`hivegen node serve` and its options."""
    node = commands.add_parser("node", help="run a node that serves blocks").add_subparsers(
        dest="node_cmd", required=True
    )
    serve = node.add_parser("serve", help="serve a span of a model's blocks and announce it in the DHT")
    serve.add_argument("--model", required=True, help="checkpoint directory, or a prepared demo model name")
    where = serve.add_argument_group(
        "which blocks",
        "without --blocks the node chooses: as many blocks as --num-blocks, or its memory, holds, where the swarm "
        "serves the least (blocks nobody serves first); while it runs, it moves when moving raises the swarm's "
        "slowest block by 25% or more, after its open sessions finish (for up to --drain-seconds; the rest fail over)",
    )
    span = where.add_mutually_exclusive_group()
    span.add_argument("--blocks", type=_blocks, help="START:END, the blocks to serve (fixed: the node never moves)")
    span.add_argument("--num-blocks", type=int, metavar="N", help="serve N blocks, placed automatically")
    span.add_argument(
        "--memory", type=_size, metavar="SIZE",
        help="memory the blocks' weights may take, e.g. 8GiB (placed automatically; default: half the free GPU "
        "memory, or half the available RAM on CPU)",
    )  # fmt: skip
    where.add_argument(
        "--rebalance-interval", type=float, default=60.0, metavar="S",
        help="seconds between checks for a better span, when placed automatically (0: never move; default 60)",
    )  # fmt: skip
    where.add_argument(
        "--drain-seconds", type=float, default=30.0, metavar="S",
        help="moving: how long open sessions may go on before they are closed and fail over (default 30)",
    )  # fmt: skip
    where.add_argument(
        "--announce-ttl", type=float, default=30.0, metavar="S",
        help="seconds the node's DHT records live unless refreshed (every S/3): how long a crashed node still "
        "looks alive, and how soon others fill its gap (default 30)",
    )  # fmt: skip
    add_peers_argument(serve, required=False, help="DHT multiaddrs to join (none: start a new swarm)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind and announce")
    serve.add_argument("--port", type=int, default=0, help="gRPC port (0: any free port)")
    serve.add_argument("--dht-port", type=int, default=0, help="DHT port (0: any free port)")
    serve.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    serve.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's")
    memory = serve.add_argument_group(
        "memory and batching",
        "the KV cache is one pool allocated at start; a session reserves batch x max_length positions of it when it "
        "opens (refused if they do not fit), and decode steps of different sessions run as one batched forward",
    )
    budget = memory.add_mutually_exclusive_group()
    budget.add_argument(
        "--cache-memory", type=_size, metavar="SIZE",
        help="KV-cache pool size, e.g. 4GiB or 512MB (default: 80%% of the GPU memory free after loading the "
        "blocks; on CPU, --cache-tokens 65536)",
    )  # fmt: skip
    budget.add_argument(
        "--cache-tokens", type=_positive(int), metavar="TOKENS",
        help="KV-cache pool size in token positions, summed over sessions (batch x max_length)",
    )  # fmt: skip
    memory.add_argument(
        "--max-batch-rows", type=_positive(int), default=DEFAULT_MAX_ROWS, metavar="N",
        help=f"the most sequences one forward runs (default {DEFAULT_MAX_ROWS})",
    )  # fmt: skip
    memory.add_argument(
        "--prefill-chunk", type=_positive(int), default=DEFAULT_PREFILL_CHUNK, metavar="TOKENS",
        help="prompt positions per forward: longer prompts run in chunks between other sessions' steps "
        f"(default {DEFAULT_PREFILL_CHUNK})",
    )  # fmt: skip
    memory.add_argument(
        "--batch-wait", type=_batch_wait, default=DEFAULT_BATCH_WAIT, metavar="SECONDS",
        help="how long a round of forwards may wait for the steps other sessions are due to send, so that they "
        "share its forward: more rows per forward for some latency, worth it where the device, not the CPU, is the "
        f"limit; a lone session never waits ('auto': about one forward's time, at most {MAX_BATCH_WAIT:g} s; at "
        f"most {MAX_BATCH_WAIT_SET:g}; default {DEFAULT_BATCH_WAIT:g}: never wait)",
    )  # fmt: skip
    serve.add_argument(
        "--attn-implementation",
        metavar="NAME",
        help="attention kernel of the blocks: sdpa, eager, flex_attention, flash_attention_2, ... "
        "(default: what transformers picks for the model class, sdpa where it supports it)",
    )
    serve.add_argument(
        "--throughput", type=_positive(float), metavar="STEPS_PER_S",
        help="decode steps per second over the whole span to advertise, instead of timing a few steps at start "
        "(which other processes starting on the same machine can slow); clients still time the node themselves",
    )  # fmt: skip
    serve.add_argument("--num-threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    serve.add_argument("--ready-file", help="write JSON here once serving and announced")
    serve.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics (steps, tokens, "
                       "sessions, errors, step latency, cache use) at http://HOST:PORT/metrics (0: any free port; "
                       "default: off)")  # fmt: skip
    limits = serve.add_argument_group("limits", "keep one client (or a crowd of idle streams) from taking the node")
    limits.add_argument(
        "--open-timeout",
        type=_positive(float),
        default=10.0,
        metavar="SECONDS",
        help="close a stream that has not sent `open` this long after it started (default 10)",
    )
    limits.add_argument(
        "--session-idle-timeout",
        type=_positive(float),
        default=60.0,
        metavar="SECONDS",
        help="close a session that sent nothing this long, freeing its cache (default 60)",
    )
    limits.add_argument(
        "--max-sessions-per-client",
        type=_positive(int),
        default=16,
        metavar="N",
        help="open sessions one client may hold (default 16); a client is its account on a node "
        "that charges credits, else its IP address (an IPv6 /64)",
    )
    limits.add_argument(
        "--max-cache-tokens-per-client",
        type=_positive(int),
        metavar="TOKENS",
        help="cache tokens (batch x max_length, over its sessions) one client may reserve (default: half of the pool)",
    )
    limits.add_argument(
        "--unlimited-networks",
        type=_networks,
        default="127.0.0.0/8,::1/128",
        metavar="CIDR,...",
        help="clients in these networks are not held to the per-client limits on a node that serves "
        "for free (default: this machine, 127.0.0.0/8,::1/128; '' limits everyone)",
    )
    paid = serve.add_argument_group("credits", "charge clients for the work served (needs --coordinator)")
    add_coordinator_argument(paid, "HOST:PORT of the coordinator's ledger; omit to serve for free")
    paid.add_argument("--identity", help="the node's key: signs its DHT records and answers, and is the account "
                      "paid (default: $HIVEGEN_HOME/node/identity, apart from your client identity, so that your "
                      "client never pays your own node)")  # fmt: skip
    paid.add_argument("--data", help="directory of unsubmitted receipts (default: $HIVEGEN_HOME/node, else "
                      "~/.hivegen/node)")  # fmt: skip
    paid.add_argument("--unpaid-steps", type=int, default=1, help="steps a session's receipts may lag (default 1)")
    paid.add_argument(
        "--unpaid-credits",
        type=int,
        default=1000,
        help="credits a known client may owe while the ledger is unreachable (default 1000)",
    )
    paid.add_argument(
        "--submit-interval",
        type=float,
        default=1.0,
        help="seconds between receipt submissions to the ledger (default 1)",
    )
    serve.set_defaults(handler=cmd_node_serve)
