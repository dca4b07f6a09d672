"""Greedy generation speed: one local transformers process vs hivegen clusters of 1, 2, 3 ... hops.

For each hop count h a LocalCluster splits the model's blocks evenly over h node processes on this
machine; RemoteModelForCausalLM then generates N tokens greedily from a fixed random prompt, and the
same prompt runs through transformers' own generate (the baseline). Printed per hop count:

- tok/s and `x local` (hivegen tok/s / local tok/s at the same thread count): 1.0 means no cost for
  distribution; 0.25 means four times slower. With everything on one machine, the gap is the price
  of gRPC, serialisation, the DHT route look-up and one process hand-off per hop, not network latency.
- prefill and chain p50/p90: one step through every node, from model.last_timings (step 0, the
  prefill, apart; decode steps in the percentiles); setup: time to the first token minus that
  prefill (DHT route look-up, opening streams, embedding, LM head).
- token p50 and `+ms/hop` = (hivegen token p50 - local token p50) / h: a decode step as the caller
  sees it (LM head included), timed on both sides by a streamer's timestamps, so the local figure
  is close to (wall time / N) but leaves the prefill out; +ms/hop is what each hop adds per token.
- EXACT/DIFF: whether hivegen produced exactly the baseline's tokens (hivegen's correctness bar).
- startup (LocalCluster.start() until every block is announced) and RSS of every node and the client.

Threads: the nodes get max(1, cpus // h) torch threads each (they take turns, one hop at a time),
and this process (baseline and client head) uses that same count, so a block is computed with the
same threads either way. Timings are the best of --repeats runs after one warm-up; figures only,
never assertions. With --credits each hop count also runs with a coordinator and nodes that charge,
and the paid/free ratio prices the receipts. Usage:
python benchmarks/generate.py --model tiny-llama|smollm2|DIR [--credits] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch
import transformers
from common import resolve_model, run_script
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from hivegen.client import RemoteModelForCausalLM
from hivegen.cluster import LocalCluster
from hivegen.credits.identity import Identity

MIB = 1 << 20


class _Clock:
    """A transformers streamer that timestamps every put(): the prompt first, then each new token."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def make_prompt(path: Path, length: int) -> torch.Tensor:
    vocab = int(AutoConfig.from_pretrained(path).vocab_size)
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(3, vocab, (1, length), generator=generator)  # skip ids 0-2 (pad/bos/eos in many vocabs)


def local_run(path: Path, prompt: torch.Tensor, new_tokens: int, repeats: int, threads: int) -> dict[str, Any]:
    """transformers generate in this process: greedy, exactly `new_tokens` tokens, no eos."""
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32).eval()
    # generate() fills an unset eos from the model's own generation config, and min_new_tokens would then
    # mask eos's logit (hivegen with eos_token_id=[] does not): clear it there so the greedy paths agree.
    model.generation_config.eos_token_id = None
    config = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0
    )
    runs: list[tuple[float, list[float], list[float]]] = []
    tokens: list[int] = []
    mask = torch.ones_like(prompt)
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first run is the warm-up
            clock = _Clock()
            began = time.perf_counter()
            out = model.generate(prompt, attention_mask=mask, generation_config=config, streamer=clock)
            wall = time.perf_counter() - began
            stamps = [began, *clock.stamps[1:]]  # drop the prompt's put(); stamp i+1 = token i ready
            steps = [b - a for a, b in itertools.pairwise(stamps)]
            runs.append((wall, steps[:1], steps[1:]))
            tokens = out[0, prompt.shape[1] :].tolist()
    del model
    wall, first, _ = min(runs[1:], key=lambda r: r[0])
    pooled = [s for r in runs[1:] for s in r[2]]
    return {
        "threads": threads, "wall_s": wall, "tokens_per_s": len(tokens) / wall, "first_token_ms": first[0] * 1e3,
        "token_p50_ms": statistics.median(pooled) * 1e3, "token_p90_ms": percentile(pooled, 0.9) * 1e3,
        "tokens": tokens,
    }  # fmt: skip


def hivegen_run(
    path: Path, prompt: torch.Tensor, new_tokens: int, repeats: int, hops: int, work_dir: Path, paid: bool = False
) -> dict[str, Any]:
    """Start an h-node LocalCluster (with a coordinator, and nodes that charge, if `paid`), generate through
    it, and stop it whatever happens."""
    threads = max(1, (os.cpu_count() or 1) // hops)
    torch.set_num_threads(threads)
    name = f"cluster-{hops}{'-paid' if paid else ''}"
    cluster = LocalCluster(path, nodes=hops, node_threads=threads, work_dir=work_dir / name, coordinator=paid,
                           starter_grant=10**9)  # fmt: skip
    model: RemoteModelForCausalLM | None = None
    try:
        cluster.start()
        began = time.perf_counter()
        # With a coordinator in this process, reuse its DHT peer: a gRPC server must not exist when a DHT forks.
        model = RemoteModelForCausalLM.from_pretrained(
            path, initial_peers=cluster.initial_peers, dht=cluster.dht if paid else None,
            identity=Identity.generate() if paid else None,
        )  # fmt: skip
        client_load = time.perf_counter() - began
        runs: list[tuple[float, list[float], list[float]]] = []
        tokens: list[int] = []
        for _ in range(repeats + 1):  # the first run is the warm-up
            clock = _Clock()
            began = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[], streamer=clock)
            wall = time.perf_counter() - began
            stamps = [began, *clock.stamps[1:]]
            runs.append((wall, [b - a for a, b in itertools.pairwise(stamps)], [t.seconds for t in model.last_timings]))
            tokens = out[0, prompt.shape[1] :].tolist()
        wall, token_steps, chain_steps = min(runs[1:], key=lambda r: r[0])
        per_token = [s for r in runs[1:] for s in r[1][1:]]
        chain = [s for r in runs[1:] for s in r[2][1:]]
        return {
            "hops": hops, "paid": paid, "credits": model.last_cost, "threads": threads,
            "ready_s": cluster.ready_seconds, "client_load_s": client_load,
            "route": [f"{h.start}:{h.end}" for h in model.last_route],
            "wall_s": wall, "tokens_per_s": len(tokens) / wall, "first_token_ms": token_steps[0] * 1e3,
            "prefill_ms": chain_steps[0] * 1e3, "setup_ms": (token_steps[0] - chain_steps[0]) * 1e3,
            "decode_p50_ms": statistics.median(chain) * 1e3, "decode_p90_ms": percentile(chain, 0.9) * 1e3,
            "token_p50_ms": statistics.median(per_token) * 1e3, "token_p90_ms": percentile(per_token, 0.9) * 1e3,
            "node_rss_mib": [psutil.Process(n.pid).memory_info().rss / MIB for n in cluster.nodes],
            "client_rss_mib": psutil.Process().memory_info().rss / MIB, "tokens": tokens,
        }  # fmt: skip
    finally:
        if model is not None:
            model.close()
        cluster.stop()


def report(result: dict[str, Any], out: Any) -> None:
    m = result["machine"]
    print(f"machine: {m['cpus']} cpus, {m['platform']}, python {m['python']}, torch {m['torch']}, "
          f"transformers {m['transformers']}", file=out)  # fmt: skip
    print(f"model: {result['model']} ({result['num_blocks']} blocks), prompt {result['prompt_tokens']} tokens, "
          f"{result['new_tokens']} new tokens, greedy, best of {result['repeats']} after a warm-up",
          file=out)  # fmt: skip
    print("threads: each node max(1, cpus // hops); the local baseline and the client use the same count", file=out)
    for threads, local in sorted(result["local"].items()):
        print(f"local transformers, {threads} thread(s): {local['tokens_per_s']:.1f} tok/s, first token "
              f"{local['first_token_ms']:.1f} ms, per token p50 {local['token_p50_ms']:.2f} ms "
              f"p90 {local['token_p90_ms']:.2f} ms", file=out)  # fmt: skip
    print(f"{'hops':>4} {'thr':>3} {'tok/s':>6} {'x local':>7} {'prefill':>7} {'setup':>7} {'chain p50':>9} "
          f"{'p90':>7} {'token p50':>9} {'+ms/hop':>7} {'startup':>7}  tokens  RSS MiB (nodes | client)",
          file=out)  # fmt: skip
    for r in result["hivegen"]:
        rss = " ".join(f"{x:.0f}" for x in r["node_rss_mib"])
        hops = f"{r['hops']}{'$' if r['paid'] else ''}"
        print(f"{hops:>4} {r['threads']:>3} {r['tokens_per_s']:>6.1f} {r['ratio_vs_local']:>7.3f} "
              f"{r['prefill_ms']:>5.1f}ms {r['setup_ms']:>5.1f}ms {r['decode_p50_ms']:>7.2f}ms "
              f"{r['decode_p90_ms']:>5.2f}ms {r['token_p50_ms']:>7.2f}ms {r['added_ms_per_hop']:>7.2f} "
              f"{r['ready_s']:>6.1f}s  {'EXACT ' if r['exact'] else 'DIFF  '}  {rss} | {r['client_rss_mib']:.0f}",
              file=out)  # fmt: skip
    print("x local: hivegen tok/s / local tok/s at the same threads.  prefill, chain p50/p90: one step through\n"
          "every node (model.last_timings; decode steps only for the percentiles).  setup: first-token time minus\n"
          "the prefill (DHT route look-up, opening streams, embed, LM head).  token p50: one decode step as the\n"
          "caller sees it, LM head included.  +ms/hop: (token p50 - local token p50) / hops.  Client RSS: DHT\n"
          "client, embeddings and LM head (the local baseline runs after, so it is not included).  $: nodes\n"
          "charge credits (a coordinator; receipts signed, verified and kept on disk every step).",
          file=out)  # fmt: skip
    free = {r["hops"]: r for r in result["hivegen"] if not r["paid"]}
    for r in result["hivegen"]:
        if r["paid"] and r["hops"] in free:
            base = free[r["hops"]]
            print(f"charging over {r['hops']} hop(s): {r['tokens_per_s'] / base['tokens_per_s']:.3f}x the free "
                  f"tok/s, {(r['token_p50_ms'] - base['token_p50_ms']) / r['hops']:+.2f} ms per hop per token; "
                  f"{r['credits']} credits per generation", file=out)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama", help="tiny-llama, smollm2 or a checkpoint directory")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--hops", default="1,2,3", help="comma-separated node counts, e.g. 1,2,3")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (the table on stderr)")
    parser.add_argument(
        "--credits",
        action="store_true",
        help="also run every hop count with nodes that charge credits, to price the receipts",
    )
    args = parser.parse_args(argv)
    hops = [int(h) for h in args.hops.split(",")]
    # SIGTERM unwinds like Ctrl-C, so the `finally` blocks stop every node process.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="hivegen-bench-") as tmp:
        path = resolve_model(args.model, Path(tmp))
        prompt = make_prompt(path, args.prompt_tokens)
        num_blocks = int(AutoConfig.from_pretrained(path).num_hidden_layers)
        # hivegen first, the baseline after: then no idle node competes with it, and the client's RSS
        # is not inflated by a whole local model.
        modes = [False, True] if args.credits else [False]
        runs = [hivegen_run(path, prompt, args.new_tokens, args.repeats, h, Path(tmp), paid) for h in hops
                for paid in modes]  # fmt: skip
        thread_counts = sorted({r["threads"] for r in runs})
        local = {t: local_run(path, prompt, args.new_tokens, args.repeats, t) for t in thread_counts}
    for r in runs:
        base = local[r["threads"]]
        r["ratio_vs_local"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["added_ms_per_hop"] = (r["token_p50_ms"] - base["token_p50_ms"]) / r["hops"]
        r["exact"] = r["tokens"] == base["tokens"]
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": transformers.__version__},
        "model": args.model, "path": str(path), "num_blocks": num_blocks,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "local": local, "hivegen": runs,
    }  # fmt: skip
    report(result, sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    run_script(main)
