"""An honest client's speed while strangers hold idle streams open on every node.

The attack: gRPC streams that connect to a node's Inference RPC and never send `open`. A node that tied a thread
to each stream stopped answering after 64 of them. This starts a LocalCluster (nodes with their default
settings) and generates N tokens greedily with no idle streams; then opens --idle streams on every node that
never send a message (re-opened at once whenever a node closes one after its --open-timeout, as an attacker
would) and generates again; then closes them and generates once more (the machine's drift, for scale); all in
one run. Printed: tok/s of each phase, the ratio with idle / without (1.0: the idle streams cost the honest
client nothing), Info latency beside the idle streams, how many idle streams the nodes closed, and whether the
runs produced the same tokens. Timings are the best of --repeats runs after a warm-up; figures only, never
assertions. The idle streams come from this process, on an asyncio loop of their own.
Usage: python benchmarks/idle_streams.py --model tiny-llama|smollm2|DIR [--nodes 2] [--idle 200] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import torch
import transformers
from common import resolve_model, run_script
from transformers import AutoConfig

from hivegen.client import RemoteModelForCausalLM
from hivegen.cluster import LocalCluster
from hivegen.proto import node_pb2, node_pb2_grpc


class IdleCrowd:
    """`per_node` streams to each address that never send a message, kept open (re-opened when a node closes
    one) on an event loop in a thread of their own until close()."""

    def __init__(self, addresses: list[str], per_node: int, channels_per_node: int = 4) -> None:
        self.addresses = addresses
        self.per_node = per_node
        self.channels_per_node = channels_per_node
        self.connected = 0  # streams open now
        self.closed_by_nodes = 0  # streams a node ended (its open timeout), each re-opened
        self._loop = asyncio.new_event_loop()
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._run(),), daemon=True)

    def start(self, timeout: float = 60.0) -> None:
        """Open every stream; return once all are established."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"{self.per_node * len(self.addresses)} idle streams not open after {timeout:.0f} s")

    def close(self) -> None:
        """Cancel every stream and end the loop. Idempotent."""
        if self._stopping is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(30)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()

    async def _run(self) -> None:
        self._stopping = asyncio.Event()
        options = [("grpc.use_local_subchannel_pool", 1)]  # separate connections, as separate attackers would
        channels = [grpc.aio.insecure_channel(address, options=options) for address in self.addresses
                    for _ in range(self.channels_per_node)]  # fmt: skip
        try:
            stubs = [node_pb2_grpc.NodeStub(channel) for channel in channels]
            holders = [asyncio.create_task(self._hold(stubs[i % len(stubs)])) for i in range(len(self.addresses)
                       * self.per_node)]  # fmt: skip
            deadline = time.monotonic() + 60
            while self.connected < len(holders) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # the last ones reach their node
            self._ready.set()
            await self._stopping.wait()
            for task in holders:
                task.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
        finally:
            for channel in channels:
                await channel.close()

    async def _hold(self, stub: node_pb2_grpc.NodeStub) -> None:
        while True:
            call = stub.Inference()
            try:
                await call.wait_for_connection()
                self.connected += 1
                try:
                    await call.read()  # never answered: returns when the node ends the stream
                finally:
                    self.connected -= 1
            except grpc.aio.AioRpcError:
                pass
            finally:
                call.cancel()
            self.closed_by_nodes += 1


def info_latency(addresses: list[str], rounds: int = 20) -> list[float]:
    """Seconds each Info call took, `rounds` times to every node."""
    seconds = []
    for address in addresses:
        with grpc.insecure_channel(address) as channel:
            stub = node_pb2_grpc.NodeStub(channel)
            for _ in range(rounds):
                began = time.perf_counter()
                stub.Info(node_pb2.InfoRequest(), timeout=30)
                seconds.append(time.perf_counter() - began)
    return seconds


def generate(model: RemoteModelForCausalLM, prompt: torch.Tensor, new: int, repeats: int) -> tuple[float, list[int]]:
    """(best tok/s over `repeats` runs after a warm-up, the tokens)."""
    best, tokens = 0.0, []
    for i in range(repeats + 1):
        began = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new, do_sample=False, eos_token_id=[])
        rate = new / (time.perf_counter() - began)
        tokens = out[0, prompt.shape[1] :].tolist()
        if i > 0:
            best = max(best, rate)
    return best, tokens


def run(path: Path, nodes: int, idle: int, new: int, prompt_tokens: int, repeats: int, tmp: Path) -> dict[str, Any]:
    threads = max(1, (os.cpu_count() or 1) // nodes)
    torch.set_num_threads(threads)
    vocab = int(AutoConfig.from_pretrained(path).vocab_size)
    prompt = torch.randint(3, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(1234))
    cluster = LocalCluster(path, nodes=nodes, node_threads=threads, work_dir=tmp / "cluster")
    model: RemoteModelForCausalLM | None = None
    crowd: IdleCrowd | None = None
    try:
        cluster.start()
        addresses = [n.address for n in cluster.nodes]
        # The cluster's DHT peer was started first: no gRPC object existed when it forked.
        model = RemoteModelForCausalLM.from_pretrained(path, cluster.initial_peers, dht=cluster.dht, verify="off")
        quiet_rate, quiet_tokens = generate(model, prompt, new, repeats)
        quiet_info = info_latency(addresses)
        crowd = IdleCrowd(addresses, idle)
        began = time.perf_counter()
        crowd.start()
        opened_s = time.perf_counter() - began
        busy_rate, busy_tokens = generate(model, prompt, new, repeats)
        busy_info = info_latency(addresses)
        still_open, closed = crowd.connected, crowd.closed_by_nodes
        crowd.close()
        after_rate, _ = generate(model, prompt, new, repeats)  # the machine's drift, for scale
        return {
            "nodes": nodes, "threads": threads, "idle_per_node": idle, "idle_open_s": opened_s,
            "idle_still_open": still_open, "idle_closed_by_nodes": closed, "after_tokens_per_s": after_rate,
            "route": [f"{h.start}:{h.end}" for h in model.last_route],
            "quiet_tokens_per_s": quiet_rate, "idle_tokens_per_s": busy_rate, "ratio": busy_rate / quiet_rate,
            "quiet_info_ms": statistics.median(quiet_info) * 1e3, "idle_info_ms": statistics.median(busy_info) * 1e3,
            "idle_info_max_ms": max(busy_info) * 1e3, "same_tokens": quiet_tokens == busy_tokens,
        }  # fmt: skip
    finally:
        if crowd is not None:
            crowd.close()
        if model is not None:
            model.close()
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama", help="tiny-llama, smollm2 or a checkpoint directory")
    parser.add_argument("--nodes", type=int, default=2, help="node processes; the blocks are split evenly")
    parser.add_argument("--idle", type=int, default=200, help="idle streams held open on every node")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (the figures on stderr)")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="hivegen-bench-") as tmp:
        path = resolve_model(args.model, Path(tmp))
        r = run(path, args.nodes, args.idle, args.new_tokens, args.prompt_tokens, args.repeats, Path(tmp))
    r.update(model=args.model, new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens, repeats=args.repeats,
             machine={"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                      "torch": torch.__version__, "grpc": grpc.__version__})  # fmt: skip
    out = sys.stderr if args.json else sys.stdout
    m = r["machine"]
    print(f"machine: {m['cpus']} cpus, {m['platform']}, python {m['python']}, torch {m['torch']}, grpc {m['grpc']}",
          file=out)  # fmt: skip
    print(f"model: {r['model']}, {r['nodes']} nodes ({' -> '.join(r['route'])}), {r['threads']} torch thread(s) "
          f"each; prompt {r['prompt_tokens']} tokens, {r['new_tokens']} new, greedy, best of {r['repeats']} after a "
          "warm-up", file=out)  # fmt: skip
    print(f"without idle streams: {r['quiet_tokens_per_s']:.1f} tok/s; Info p50 {r['quiet_info_ms']:.2f} ms", file=out)
    print(f"with {r['idle_per_node']} idle streams on every node (opened in {r['idle_open_s']:.1f} s): "
          f"{r['idle_tokens_per_s']:.1f} tok/s; Info p50 {r['idle_info_ms']:.2f} ms, max {r['idle_info_max_ms']:.2f} "
          f"ms", file=out)  # fmt: skip
    print(f"after closing them: {r['after_tokens_per_s']:.1f} tok/s (the machine's drift, for scale)", file=out)
    print(f"ratio (with idle / without): {r['ratio']:.3f}; tokens {'EXACT' if r['same_tokens'] else 'DIFF'}; idle "
          f"streams still open at the end: {r['idle_still_open']}, closed by the nodes' open timeout: "
          f"{r['idle_closed_by_nodes']}", file=out)  # fmt: skip
    if args.json:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    run_script(main)
