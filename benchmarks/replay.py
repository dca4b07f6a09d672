"""What the generation store saves: wall time and node compute of replays and reuse vs network generation.

One LocalCluster of --hops nodes; a hivegen Client (sampling, temperature 0.8, top_p 0.95, no eos) runs, per
repeat with fresh seeds so every repeat does the same kind of work:

1. network generation: a new request, N new tokens;
2. replay: the same request again (answered from the store; no node is contacted);
3. prefix replay: the same request with N/2 tokens (cut from the stored N-token record, then committed);
4. prefix continuation: the same request with 2N tokens (one prefill of prompt + N stored tokens, then
   decode steps), next to a fresh 2N-token generation with another seed;
5. resample: client.resample(ref, from_token=N/2, seed=other), next to a fresh N/2-token generation;
6. a trace of 3 dependent calls (N/2 tokens each, unseeded) recorded, replayed, and replayed after rewind(1).

Finally the store is copied into a MemoryStore and a DirectoryStore (disk, fsynced writes), and the replay of
step 2 is timed from each. Per operation: median wall time over --repeats, and the node compute it used, read
over gRPC as the increase of NodeInfo.counters.steps and .tokens_processed summed over all nodes (a step on
each of h nodes counts h). `x gen` = wall / the network generation's wall. Figures only, never assertions.
Usage: python benchmarks/replay.py --model tiny-llama|smollm2|DIR [--hops 2] [--new-tokens 32] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch
import transformers
from common import resolve_model, run_script

from hivegen.client.client import Client
from hivegen.client.trace import TraceRecorder
from hivegen.cluster import LocalCluster
from hivegen.proto import node_pb2, node_pb2_grpc
from hivegen.store import DirectoryStore, MemoryStore, ObjectStore, open_store

T = TypeVar("T")
SAMPLING: dict[str, Any] = {"temperature": 0.8, "top_p": 0.95}


class Meter:
    """Times a call and reads, over gRPC, how many steps and tokens every node computed meanwhile."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.channels = [grpc.insecure_channel(node.address) for node in cluster.nodes]
        self.stubs = [node_pb2_grpc.NodeStub(channel) for channel in self.channels]
        self.samples: dict[str, list[tuple[float, int, int]]] = {}

    def counters(self) -> tuple[int, int]:
        infos = [stub.Info(node_pb2.InfoRequest(), timeout=10) for stub in self.stubs]
        return sum(i.counters.steps for i in infos), sum(i.counters.tokens_processed for i in infos)

    def measure(self, name: str, call: Callable[[], T]) -> T:
        steps, tokens = self.counters()
        began = time.perf_counter()
        out = call()
        wall = time.perf_counter() - began
        steps_after, tokens_after = self.counters()
        self.samples.setdefault(name, []).append((wall, steps_after - steps, tokens_after - tokens))
        return out

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


def flow(client: Client, prompt: list[int], n: int) -> list[tuple[int, ...]]:
    """User code for the trace: three calls, each prompted with the previous call's output; unseeded."""
    a = client.generate(prompt, n, **SAMPLING)
    b = client.generate(prompt + list(a.tokens), n, **SAMPLING)
    c = client.generate(prompt + list(b.tokens), n, **SAMPLING)
    return [a.tokens, b.tokens, c.tokens]


def traced(
    client: Client, name: str, prompt: list[int], n: int, replay: str | None = None
) -> tuple[TraceRecorder, list[tuple[int, ...]]]:
    with client.trace(name, replay=replay) as recorder:
        outputs = flow(client, prompt, n)
    return recorder, outputs


def copy_store(source: ObjectStore, target: ObjectStore) -> ObjectStore:
    for ref in source.iter_refs():
        target.put(source.get(ref))
    for namespace in source.namespaces():
        for key, value in source.list_pointers(namespace).items():
            target.set_pointer(namespace, key, value)
    return target


def run(args: argparse.Namespace, path: Path, tmp: Path) -> dict[str, Any]:
    n, half = args.new_tokens, args.new_tokens // 2
    threads = max(1, (os.cpu_count() or 1) // args.hops)
    torch.set_num_threads(threads)
    vocab = int(transformers.AutoConfig.from_pretrained(path).vocab_size)
    prompt = torch.randint(3, vocab, (args.prompt_tokens,), generator=torch.Generator().manual_seed(1234)).tolist()
    base = secrets.randbits(40)  # fresh seeds each run, so a persistent --store never answers the "new" requests
    seeds = itertools.count(base)
    checks: dict[str, bool] = {}
    cluster = LocalCluster(path, nodes=args.hops, node_threads=threads, work_dir=tmp / "cluster")
    meter: Meter | None = None
    client: Client | None = None
    try:
        cluster.start()
        meter = Meter(cluster)
        store = open_store(":memory:" if args.store == "memory" else args.store)
        client = c = Client(path, cluster.initial_peers, store=store, eos_token_ids=())
        warm = next(seeds)  # warm-up: joins the swarm, loads the head, opens the first streams
        c.generate(prompt, n, seed=warm, **SAMPLING)
        c.generate(prompt, n, seed=warm, **SAMPLING)
        replay_seeds = []
        for r in range(args.repeats):
            s = next(seeds)
            replay_seeds.append(s)
            g = meter.measure("network generation", partial(c.generate, prompt, n, seed=s, **SAMPLING))
            again = meter.measure("replay", partial(c.generate, prompt, n, seed=s, **SAMPLING))
            part = meter.measure("prefix replay", partial(c.generate, prompt, half, seed=s, **SAMPLING))
            longer = meter.measure("prefix continuation", partial(c.generate, prompt, 2 * n, seed=s, **SAMPLING))
            meter.measure("fresh 2N generation", partial(c.generate, prompt, 2 * n, seed=next(seeds), **SAMPLING))
            resampled = meter.measure("resample", partial(c.resample, g.ref, from_token=half, seed=next(seeds)))
            meter.measure("fresh N/2 generation", partial(c.generate, prompt, half, seed=next(seeds), **SAMPLING))
            name = f"bench-{base}-{r}"
            rec, outputs = meter.measure("trace record", partial(traced, c, name, prompt, half))
            rpl, replayed = meter.measure("trace replay", partial(traced, c, name, prompt, half, rec.ref))
            rewound = rec.rewind(1)
            rew, _ = meter.measure("trace replay after rewind(1)", partial(traced, c, name, prompt, half, rewound))
            results = {
                "replay returns the recorded tokens": again.replayed and again.tokens == g.tokens,
                "prefix replay is the stored prefix": part.replayed and part.tokens == g.tokens[:half],
                "continuation extends the stored run": not longer.replayed and longer.tokens[:n] == g.tokens,
                "resample keeps the first N/2 tokens": resampled.tokens[:half] == g.tokens[:half],
                "trace replay: all calls replayed": all(x.replayed for x in rpl.calls) and replayed == outputs,
                "rewound trace replays 2 of 3 calls": [x.replayed for x in rew.calls] == [True, True, False],
            }  # fmt: skip
            for key, ok in results.items():
                checks[key] = checks.get(key, True) and bool(ok)
        objects = sorted(c.store.iter_refs())
        stored = {"location": c.store.location, "objects": len(objects),
                  "bytes": sum(len(c.store.get(ref)) for ref in objects), "disk_copy": str(tmp / "disk")}  # fmt: skip
        for label, target in (("MemoryStore", MemoryStore()), ("DirectoryStore (disk)", DirectoryStore(tmp / "disk"))):
            with Client(path, (), store=copy_store(c.store, target), eos_token_ids=()) as offline:
                for s in replay_seeds:
                    out = meter.measure(
                        f"replay from {label}", partial(offline.generate, prompt, n, seed=s, **SAMPLING)
                    )
                    checks[f"replay from {label}"] = checks.get(f"replay from {label}", True) and out.replayed
    finally:
        if client is not None:
            client.close()
        if meter is not None:
            meter.close()
        cluster.stop()
    gen_wall = statistics.median(w for w, _, _ in meter.samples["network generation"])
    operations = {}
    for op, samples in meter.samples.items():
        walls, steps, tokens = zip(*samples, strict=True)
        operations[op] = {"wall_ms": statistics.median(walls) * 1e3, "wall_ms_all": [w * 1e3 for w in walls],
                          "node_steps": statistics.median(steps), "node_steps_all": list(steps),
                          "node_tokens": statistics.median(tokens), "node_tokens_all": list(tokens),
                          "x_gen": statistics.median(walls) / gen_wall}  # fmt: skip
    return {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": transformers.__version__},
        "model": args.model, "path": str(path), "hops": args.hops, "threads": threads,
        "prompt_tokens": args.prompt_tokens, "new_tokens": n, "repeats": args.repeats, "sampling": SAMPLING,
        "store": stored, "operations": operations, "checks": checks,
    }  # fmt: skip


def report(result: dict[str, Any], out: Any) -> None:
    m, n, ops = result["machine"], result["new_tokens"], result["operations"]
    print(f"machine: {m['cpus']} cpus, {m['platform']}, python {m['python']}, torch {m['torch']}", file=out)
    print(f"model: {result['model']}, {result['hops']} nodes x {result['threads']} thread(s), prompt "
          f"{result['prompt_tokens']} tokens, N = {n} new tokens, median of {result['repeats']} after a warm-up",
          file=out)  # fmt: skip
    print(f"{'operation':<52} {'wall ms':>9} {'node steps':>10} {'node tokens':>11} {'x gen':>7}", file=out)
    for op, row in ops.items():
        rng = f"{min(row['wall_ms_all']):.2f}-{max(row['wall_ms_all']):.2f}"
        print(f"{op:<52} {row['wall_ms']:>9.2f} {row['node_steps']:>10g} {row['node_tokens']:>11g} "
              f"{row['x_gen']:>7.3f}   (range {rng} ms)", file=out)  # fmt: skip
    for a, b, what in (("prefix continuation", "fresh 2N generation", f"2N={2 * n} tokens"),
                       ("resample", "fresh N/2 generation", f"N/2={n // 2} new tokens")):  # fmt: skip
        print(f"{a} vs {b} ({what}): wall {ops[a]['wall_ms']:.1f} vs {ops[b]['wall_ms']:.1f} ms = "
              f"{ops[a]['wall_ms'] / ops[b]['wall_ms']:.2f}x; node steps {ops[a]['node_steps']:g} vs "
              f"{ops[b]['node_steps']:g}; node tokens {ops[a]['node_tokens']:g} vs {ops[b]['node_tokens']:g}",
              file=out)  # fmt: skip
    replay_steps = max(ops["replay"]["node_steps_all"] + ops["prefix replay"]["node_steps_all"])
    print(f"node steps of replays and prefix replays (max over repeats): {replay_steps}", file=out)
    s = result["store"]
    print(f"store: {s['location']}, {s['objects']} objects, {s['bytes'] / 1024:.1f} KiB; the disk replays read a copy "
          f"of it in {s['disk_copy']} (removed at exit)", file=out)  # fmt: skip
    failed = [k for k, ok in result["checks"].items() if not ok]
    print("checks: " + ("all passed (" + "; ".join(result["checks"]) + ")" if not failed else "FAILED: " +
                        "; ".join(failed)), file=out)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama", help="tiny-llama, smollm2 or a checkpoint directory")
    parser.add_argument("--hops", type=int, default=2, help="number of nodes the blocks are split over")
    parser.add_argument("--new-tokens", type=int, default=32, help="N")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--store", default="memory", help="memory, or a store directory (records are kept there)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (the table on stderr)")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the prefix operations use N/2)")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="hivegen-replay-") as tmp:
        path = resolve_model(args.model, Path(tmp))
        result = run(args, path, Path(tmp))
    report(result, sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    run_script(main)
