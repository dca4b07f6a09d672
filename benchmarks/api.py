"""Throughput and time to first token through the OpenAI-compatible API vs the Python client, on one cluster.

One LocalCluster (--hops nodes) of a chat model also runs `hivegen api serve` (verification off, a fresh store).
Every request is new (a distinct prompt, greedy, --new-tokens at most), so nothing is replayed. Three ways in:

- local: transformers' own generate in this process, one request at a time (the baseline);
- client: one shared hivegen `Client` in this process, C requests at once from C threads;
- api: the `openai` package against the API server, C requests at once, streamed (stream=True) so the first
  token's arrival is seen.

For C = 1 and 8: requests per second, generated tokens per second, and time to first token (median), with
ratios against local and api/client. With the nodes not batching across sessions yet, C = 8 shows what the
server's concurrency buys before batching lands. Figures only, never assertions. Usage:
python benchmarks/api.py [--model tiny-chat|smollm2|DIR] [--hops 2] [--new-tokens 16] [--requests 16] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import torch
from common import resolve_model, run_script
from transformers import AutoModelForCausalLM, AutoTokenizer

from hivegen.client import Client
from hivegen.cluster import LocalCluster
from hivegen.model.tiny_chat import make_tiny_chat_model

WORDS = ["fox", "river", "credit", "node", "tower", "garden", "signal", "lantern", "harbor", "meadow"]


def prompts(count: int, offset: int) -> list[str]:
    return [f"Request {n}: tell me about the {WORDS[n % len(WORDS)]} {n}." for n in range(offset, offset + count)]


class FirstToken:
    """A streamer that notes when the first generated token arrives (the prompt comes first)."""

    def __init__(self) -> None:
        self.began = time.perf_counter()
        self.first: float | None = None
        self.puts = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2 and self.first is None:
            self.first = time.perf_counter() - self.began

    def end(self) -> None:
        pass


def measure(run_one: Callable[[str], tuple[float, int]], texts: list[str], concurrency: int) -> dict[str, float]:
    """Run every prompt, `concurrency` at a time: requests/s, tokens/s and the median time to first token."""
    firsts: list[float] = []
    tokens = 0
    lock = threading.Lock()

    def one(text: str) -> None:
        nonlocal tokens
        first, count = run_one(text)
        with lock:
            firsts.append(first)
            tokens += count

    began = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, texts))
    wall = time.perf_counter() - began
    return {"req_s": len(texts) / wall, "tok_s": tokens / wall, "ttft_ms": 1000 * statistics.median(firsts)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-chat", help="tiny-chat (a random 8-block Llama with a chat "
                        "tokenizer), smollm2, or a checkpoint directory with a tokenizer")  # fmt: skip
    parser.add_argument("--hops", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--requests", type=int, default=16, help="requests per measurement")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hivegen-bench-api-"))
    path = make_tiny_chat_model(tmp / "tiny-chat", num_layers=8) if args.model == "tiny-chat" else resolve_model(
        args.model, tmp)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(path)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    results: dict[str, Any] = {"model": path.name, "hops": args.hops, "new_tokens": args.new_tokens}

    def local_one(text: str) -> tuple[float, int]:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        clock = FirstToken()
        out = local.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, streamer=clock)
        return clock.first or 0.0, int(out.shape[1] - ids.shape[1])

    api_args = ["--store", str(tmp / "api-store"), "--verify", "off", "--max-concurrency", "8"]
    with LocalCluster(path, nodes=args.hops, work_dir=tmp / "cluster", api_port=0, api_args=api_args) as cluster:
        assert cluster.api is not None
        client = Client(path, cluster.initial_peers, store=tmp / "client-store", verify="off")
        api = openai.OpenAI(base_url=cluster.api.url, api_key="unused", max_retries=0, timeout=600)

        def client_one(text: str) -> tuple[float, int]:
            clock = FirstToken()
            generation = client.generate(text, max_new_tokens=args.new_tokens, streamer=clock)
            return clock.first or 0.0, len(generation.tokens)

        def api_one(text: str) -> tuple[float, int]:
            began, first, count = time.perf_counter(), None, 0
            stream = api.completions.create(model=path.name, prompt=text, max_tokens=args.new_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True})  # fmt: skip
            for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].text:
                    first = time.perf_counter() - began
                if chunk.usage is not None:
                    count = chunk.usage.completion_tokens
            return first or time.perf_counter() - began, count

        for warm in (local_one, client_one, api_one):  # the first request of each pays one-off set-up
            warm("warm up")
        offset = 0
        for concurrency in (1, 8):
            row: dict[str, Any] = {}
            for name, run_one in (("local", local_one), ("client", client_one), ("api", api_one)):
                if name == "local" and concurrency > 1:
                    continue  # the baseline is one local request at a time
                offset += args.requests
                row[name] = measure(run_one, prompts(args.requests, offset), concurrency)
            results[f"concurrency_{concurrency}"] = row
        client.close()
    base = results["concurrency_1"]["local"]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{results['model']}: {args.hops} hops, {args.new_tokens} new tokens, {args.requests} requests per row")
    print(f"{'':14}{'req/s':>8}{'tok/s':>8}{'TTFT ms':>9}{'req/s x local':>15}{'TTFT x local':>14}{'api/client':>12}")
    for concurrency in (1, 8):
        row = results[f"concurrency_{concurrency}"]
        for name in ("local", "client", "api"):
            if name not in row:
                continue
            r = row[name]
            ratio = f"{r['req_s'] / row['client']['req_s']:.2f}" if name == "api" else ""
            print(f"{name + f' x{concurrency}':14}{r['req_s']:8.2f}{r['tok_s']:8.1f}{r['ttft_ms']:9.1f}"
                  f"{r['req_s'] / base['req_s']:15.2f}{r['ttft_ms'] / base['ttft_ms']:14.2f}{ratio:>12}")  # fmt: skip
    return 0


if __name__ == "__main__":
    run_script(main)
