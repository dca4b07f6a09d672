"""Many users at once: aggregate speed of 1, 4, 8 and 16 concurrent clients through the same nodes.

One LocalCluster (--hops nodes, one torch thread each); every client is its own process (spawned, its model
loaded and warmed up before the clock starts) and generates --new-tokens greedily (eos off) from its own random
prompt of --prompt-length tokens, all starting together. Per client count C:

- aggregate tok/s: every client's new tokens / (last client's end - first client's start), and `x one` = that
  over one client's tok/s: how much more the swarm serves when C users share it;
- per-client step latency p50/p90 (decode steps through every node, from model.last_timings), and `x one`;
- local transformers generating a batch of C prompts in this process (1 thread), tok/s and `x one`: what the
  same compute gives when the sequences share one forward, the ceiling batching on the nodes aims at;
- where the CPU went while the clients generated, in ms of CPU per generated token: the whole machine, all
  clients (each with its DHT helper and p2pd), all nodes (the same), and how busy the machine's cores were. When
  clients and nodes share one small machine, aggregate speed cannot grow past cores / (CPU per token).

Figures only, never assertions. Usage:
python benchmarks/concurrency.py [--model tiny-llama|smollm2|DIR] [--hops 2] [--clients 1,4,8,16] [--node-args ARGS]
                                 [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from queue import Empty
from typing import Any

import psutil
import torch
from common import resolve_model, run_script
from transformers import AutoConfig, AutoModelForCausalLM

from hivegen.cluster import LocalCluster

SETTLE_SECONDS = 3.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def prompt_ids(path: Path, length: int, seed: int) -> list[int]:
    vocab = int(AutoConfig.from_pretrained(path).vocab_size)
    return torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and every process under it (DHT helper, p2pd)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:  # ended meanwhile
            continue
        total += times.user + times.system
    return total


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, over every core."""
    times = psutil.cpu_times()
    busy = times.user + times.system + getattr(times, "nice", 0.0) + getattr(times, "irq", 0.0)
    busy += getattr(times, "softirq", 0.0)
    return busy, busy + times.idle + getattr(times, "iowait", 0.0)


def client_process(path: str, peers: list[str], prompt: list[int], new: int, ready: Any, go: Any, out: Any) -> None:
    """One user: load the model, warm up, wait for the start, generate, report (start, end, step seconds, CPU
    seconds its process tree used while generating)."""
    torch.set_num_threads(1)
    from hivegen.client import RemoteModelForCausalLM

    with RemoteModelForCausalLM.from_pretrained(path, peers, verify="off") as model:
        # the warm-up runs while the other clients still start up on the same cores: give the nodes time
        model.generate(torch.tensor([prompt]), max_new_tokens=2, eos_token_id=[], timeout=120)
        ready.release()
        go.wait()
        cpu = tree_cpu_seconds(os.getpid())
        began = time.perf_counter()
        model.generate(torch.tensor([prompt]), max_new_tokens=new, eos_token_id=[])
        ended = time.perf_counter()
        cpu = tree_cpu_seconds(os.getpid()) - cpu
        out.put((began, ended, [t.seconds for t in model.last_timings[1:]], cpu))


def _get(queue: Any) -> Any:
    try:
        return queue.get(timeout=1)
    except Empty:
        return None


def _wait(attempt: Callable[[], Any], workers: list[Any], what: str) -> Any:
    """Repeat `attempt` (which waits up to a second) until it gives something; fail at once if a client died."""
    deadline = time.monotonic() + 600
    while not (got := attempt()):
        failed = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
        if failed:
            raise RuntimeError(f"a client process failed (exit code {failed[0]}) before it could {what}; see above")
        if time.monotonic() > deadline:
            raise RuntimeError(f"a client process did not {what} in 10 minutes")
    return got


def swarm_run(path: Path, peers: list[str], clients: int, length: int, new: int, nodes: list[int]) -> dict[str, float]:
    """`clients` processes generating at once; `nodes` are the node processes' pids (for their CPU)."""
    ctx = mp.get_context("spawn")
    ready, go, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=client_process, args=(str(path), peers, prompt_ids(path, length, seed), new,
                                                          ready, go, out)) for seed in range(clients)]  # fmt: skip
    for w in workers:
        w.start()
    try:
        for _ in workers:
            _wait(lambda: ready.acquire(timeout=1), workers, "get ready")
        time.sleep(SETTLE_SECONDS)  # a client's p2pd is busy for its first seconds: a one-time cost, not per token
        nodes_cpu = sum(tree_cpu_seconds(pid) for pid in nodes)
        machine = machine_busy_seconds()
        go.set()
        results = [_wait(lambda: _get(out), workers, "generate") for _ in workers]
        nodes_cpu = sum(tree_cpu_seconds(pid) for pid in nodes) - nodes_cpu
        now = machine_busy_seconds()
        busy, total = now[0] - machine[0], now[1] - machine[1]
    finally:
        for w in workers:
            w.join(30)
            if w.is_alive():
                w.kill()
    wall = max(r[1] for r in results) - min(r[0] for r in results)
    steps = [s for r in results for s in r[2]]
    tokens = clients * new
    return {"tok_s": tokens / wall, "step_p50_ms": 1e3 * statistics.median(steps),
            "step_p90_ms": 1e3 * percentile(steps, 0.9), "cpu_ms_per_token": 1e3 * busy / tokens,
            "client_cpu_ms_per_token": 1e3 * sum(r[3] for r in results) / tokens,
            "node_cpu_ms_per_token": 1e3 * nodes_cpu / tokens, "busy": busy / total}  # fmt: skip


def local_run(path: Path, clients: int, length: int, new: int) -> float:
    """transformers generating a batch of `clients` prompts at once: tok/s (best of two after a warm-up)."""
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    batch = torch.tensor([prompt_ids(path, length, seed) for seed in range(clients)])
    best = float("inf")
    with torch.inference_mode():
        for _ in range(3):
            began = time.perf_counter()
            model.generate(batch, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
            best = min(best, time.perf_counter() - began)
    return clients * new / best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama", help="tiny-llama, smollm2, or a checkpoint directory")
    parser.add_argument("--hops", type=int, default=2)
    parser.add_argument("--clients", default="1,4,8,16", help="client counts, comma-separated (1 is the base)")
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--node-args", default="", help="extra `node serve` flags: --node-args='--batch-wait auto'")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    counts = sorted({1, *(int(c) for c in args.clients.split(","))})
    tmp = Path(tempfile.mkdtemp(prefix="hivegen-bench-concurrency-"))
    path = resolve_model(args.model, tmp)
    results: dict[str, Any] = {"model": path.name, "hops": args.hops, "new_tokens": args.new_tokens, "rows": {}}
    node_args = args.node_args.split()
    with LocalCluster(path, nodes=args.hops, node_threads=1, node_args=node_args, work_dir=tmp / "cluster") as cluster:
        pids = [node.process.pid for node in cluster.nodes]
        for count in counts:
            results["rows"][count] = swarm_run(path, cluster.initial_peers, count, args.prompt_length,
                                               args.new_tokens, pids)  # fmt: skip
    for count in counts:
        results["rows"][count]["local_tok_s"] = local_run(path, count, args.prompt_length, args.new_tokens)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    one = results["rows"][1]
    print(f"{results['model']}: {args.hops} nodes, {args.new_tokens} new tokens per client, 1 torch thread each")
    print(f"{'clients':>8}{'tok/s':>9}{'x one':>7}{'step p50':>10}{'p90 ms':>8}{'x one':>7}{'local tok/s':>13}"
          f"{'x one':>7}  |  CPU ms/token: {'machine':>8}{'clients':>9}{'nodes':>7}{'busy':>6}")  # fmt: skip
    for count in counts:
        r = results["rows"][count]
        print(f"{count:>8}{r['tok_s']:9.1f}{r['tok_s'] / one['tok_s']:7.2f}{r['step_p50_ms']:10.1f}"
              f"{r['step_p90_ms']:8.1f}{r['step_p50_ms'] / one['step_p50_ms']:7.2f}{r['local_tok_s']:13.1f}"
              f"{r['local_tok_s'] / one['local_tok_s']:7.2f}  |  {'':14}{r['cpu_ms_per_token']:8.2f}"
              f"{r['client_cpu_ms_per_token']:9.2f}{r['node_cpu_ms_per_token']:7.2f}"
              f"{100 * r['busy']:5.0f}%")  # fmt: skip
    return 0


if __name__ == "__main__":
    run_script(main)
