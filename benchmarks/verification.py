"""What trust costs and what it catches, on local clusters (figures only, never assertions).

1. Cost: greedy generation with verification off, default and every hop, next to local transformers'
   generate in this process (the baseline): tok/s as ratios, and the node compute each mode spends (the sum of
   every node's compute seconds and positions processed, as a ratio to verification off). The cluster has two
   replicas of each half of the model, so every hop can be re-executed. On a small shared machine the nodes'
   compute seconds are noisy, so the cost is also measured in this process, uncontended: one half of the model's
   blocks runs a generation (prefill + decode steps), then the re-executions that check it (a full one, the
   default's spot checks, the prompt alone), for a short and a long prompt and answer.
2. Detection: a cheating node (tests/adversary.py) that serves the first half, claims a huge throughput so that
   routes use it, and adds noise to its answers on every step, or on 1 step in 10. Over N generations each:
   how often the default policy caught it in the node's first generation with a client, and in later ones (the
   client had already seen it answer honestly), and how often the tokens delivered were still exactly right.
3. Stall: a node of the route is stopped (SIGSTOP, a hung node) or killed (SIGKILL) after the 5th token; the
   step that meets it takes this long before the route is repaired (min/median/max over the runs).

python benchmarks/verification.py --model tiny-llama|smollm2|DIR [--generations 100] [--runs 5]
    [--parts cost,detection,stall] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import torch
from common import resolve_model, run_script
from transformers import AutoModelForCausalLM

from hivegen.client import RemoteModelForCausalLM
from hivegen.client.bans import BanList
from hivegen.client.health import HealthBook
from hivegen.client.verify import DEFAULT_RATE, PROBATION, Verifier, VerifyPolicy
from hivegen.cluster import LocalCluster
from hivegen.model.checkpoint import ModelCheckpoint
from hivegen.model.demo import hivegen_home
from hivegen.proto import node_pb2, node_pb2_grpc

ADVERSARY = Path(__file__).resolve().parent.parent / "tests" / "adversary.py"
PROMPT_LEN = 16


def node_totals(cluster: LocalCluster) -> tuple[float, int]:
    """Compute seconds and positions processed, summed over the cluster's live nodes."""
    seconds, positions = 0.0, 0
    for node in cluster.nodes:
        if node.process.poll() is not None:
            continue
        with grpc.insecure_channel(node.address) as channel:
            info = node_pb2_grpc.NodeStub(channel).Info(node_pb2.InfoRequest(), timeout=10)
        seconds += info.counters.compute_seconds
        positions += info.counters.tokens_processed
    return seconds, positions


def greedy(model: RemoteModelForCausalLM, prompt: torch.Tensor, new: int) -> list[int]:
    out = model.generate(prompt, max_new_tokens=new, do_sample=False, eos_token_id=[])
    return list(out[0, prompt.shape[1] :].tolist())


def measure_cost(cluster: LocalCluster, path: Path, prompt: torch.Tensor, new: int, repeats: int) -> dict[str, Any]:
    local = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
    local.generate(prompt, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    began = time.perf_counter()
    for _ in range(repeats):
        reference = local.generate(prompt, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    local_tps = repeats * new / (time.perf_counter() - began)
    expected = reference[0, prompt.shape[1] :].tolist()
    rows: dict[str, Any] = {"local": {"tok_s": local_tps}}
    for mode in ("off", "default", "all"):
        with RemoteModelForCausalLM.from_pretrained(
            path, cluster.initial_peers, verify=mode, bans=BanList(None), route_wait=30
        ) as model:
            greedy(model, prompt, new)  # warm-up; also the nodes' probation under the default policy
            seconds0, positions0 = node_totals(cluster)
            began = time.perf_counter()
            exact = all(greedy(model, prompt, new) == expected for _ in range(repeats))
            wall = time.perf_counter() - began
            seconds1, positions1 = node_totals(cluster)
        rows[mode] = {
            "tok_s": repeats * new / wall,
            "node_seconds": (seconds1 - seconds0) / repeats,
            "node_positions": (positions1 - positions0) / repeats,
            "exact": exact,
        }
    return rows


def measure_reexecution(path: Path, blocks: int, shapes: list[tuple[int, int]], repeats: int) -> dict[str, Any]:
    """Compute of re-executions as a share of the generation they check, one span, in this process."""
    from hivegen.model.span import BlockSpan

    span = BlockSpan(ModelCheckpoint.open(path), 0, blocks)

    def prefill(hidden: torch.Tensor, length: int) -> float:
        began = time.perf_counter()
        mask = torch.ones(1, length, dtype=torch.int64)
        span.forward(hidden[:, :length], torch.arange(length)[None], mask, span.new_cache())
        return time.perf_counter() - began

    def generation(hidden: torch.Tensor, prompt: int, new: int) -> float:
        cache, began = span.new_cache(), time.perf_counter()
        span.forward(hidden[:, :prompt], torch.arange(prompt)[None], torch.ones(1, prompt, dtype=torch.int64), cache)
        for i in range(prompt, prompt + new):
            mask = torch.ones(1, i + 1, dtype=torch.int64)
            span.forward(hidden[:, i : i + 1], torch.tensor([[i]]), mask, cache)
        return time.perf_counter() - began

    rows: dict[str, Any] = {}
    for prompt, new in shapes:
        hidden = torch.randn(1, prompt + new, span.hidden_size)
        generation(hidden, prompt, new)
        gen = statistics.median(generation(hidden, prompt, new) for _ in range(repeats))
        full = statistics.median(prefill(hidden, prompt + new) for _ in range(repeats))
        spot = statistics.mean(prefill(hidden, prompt + s) for s in range(0, new + 1, max(1, new // 8)))
        alone = statistics.median(prefill(hidden, prompt) for _ in range(repeats))
        default = DEFAULT_RATE * full + (1 - DEFAULT_RATE) * spot
        rows[f"prompt {prompt}, {new} new"] = {
            "generation_s": gen, "all": full / gen, "default": default / gen, "prompt_only": alone / gen,
        }  # fmt: skip
    return rows


def measure_detection(
    cluster: LocalCluster, path: Path, prompt: torch.Tensor, new: int, generations: int, control: Path
) -> dict[str, Any]:
    cheater = cluster.add_node(0, cluster.spans[0][1], launcher=[sys.executable, str(ADVERSARY), str(control)])
    expected: list[int] | None = None
    results: dict[str, Any] = {}
    with RemoteModelForCausalLM.from_pretrained(path, cluster.initial_peers, bans=BanList(None)) as model:
        control.write_text(json.dumps({"mode": "honest"}))
        expected = greedy(model, prompt, new)
        for label, rate in (("every step", 1.0), ("1 step in 10", 0.1)):
            for phase in ("first generation", "later generations"):
                caught = exact = 0
                for index in range(generations):
                    control.write_text(json.dumps({"mode": "noise", "rate": rate, "seed": index}))
                    model.swarm.bans = BanList(None)
                    model.swarm.health = HealthBook()  # the cheater is routed again (it claims to be fastest)
                    model.verifier = Verifier(VerifyPolicy(), rng=model.verifier.rng)
                    if phase == "later generations":
                        model.verifier._passed[cheater.node_id] = PROBATION
                    tokens = greedy(model, prompt, new)
                    caught += cheater.node_id in model.last_verification.liars
                    exact += tokens == expected
                results[f"{label}, {phase}"] = {"caught": caught, "exact": exact, "generations": generations}
    control.write_text(json.dumps({"mode": "honest"}))
    cluster.stop_node(cluster.nodes.index(cheater))
    return results


def measure_stalls(cluster: LocalCluster, path: Path, prompt: torch.Tensor, new: int, runs: int) -> dict[str, Any]:
    stalls: dict[str, list[float]] = {"SIGSTOP (hangs)": [], "SIGKILL (dies)": []}
    for label, sig in (("SIGSTOP (hangs)", signal.SIGSTOP), ("SIGKILL (dies)", signal.SIGKILL)):
        for _ in range(runs):
            with RemoteModelForCausalLM.from_pretrained(path, cluster.initial_peers, verify="off",
                                                        bans=BanList(None)) as model:  # fmt: skip
                victim = -1
                stamps: list[float] = []
                for count, _tokens in enumerate(model.generate_stream(prompt, max_new_tokens=new, eos_token_id=[])):
                    stamps.append(time.perf_counter())
                    if count == 4:
                        hop = model.last_route[-1]
                        victim = next(i for i, n in enumerate(cluster.nodes) if n.node_id == hop.node_id)
                        os.kill(cluster.nodes[victim].pid, sig)
                stalls[label].append(stamps[5] - stamps[4])  # the step that met the failed node
            if sig == signal.SIGSTOP:
                os.kill(cluster.nodes[victim].pid, signal.SIGCONT)
            else:
                cluster.nodes[victim].process.wait()
                cluster.restart_node(victim)
    return {k: {"min": min(v), "median": statistics.median(v), "max": max(v), "runs": v} for k, v in stalls.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="generations timed per verification mode")
    parser.add_argument("--generations", type=int, default=100, help="generations per detection figure")
    parser.add_argument("--runs", type=int, default=5, help="runs per stall figure")
    parser.add_argument("--parts", default="reexecution,cost,detection,stall", help="which figures to measure")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.ERROR)  # every caught lie and re-route would log a warning
    tmp = Path(tempfile.mkdtemp(prefix="hivegen-bench-verify-"))
    models = hivegen_home() / "models"
    models.mkdir(parents=True, exist_ok=True)
    os.environ["HIVEGEN_HOME"] = str(tmp / "home")  # the evidence of the detection runs stays out of ~/.hivegen
    (tmp / "home").mkdir()
    (tmp / "home" / "models").symlink_to(models, target_is_directory=True)  # prepared demo models are shared
    path = resolve_model(args.model, tmp)
    blocks = ModelCheckpoint.open(path).num_blocks
    half = blocks // 2
    prompt = torch.randint(3, 200, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    spans = [(0, half), (half, blocks), (0, half), (half, blocks)]
    report: dict[str, Any] = {"model": args.model, "new_tokens": args.new_tokens, "cpus": os.cpu_count()}
    if "reexecution" in parts:
        shapes = [(PROMPT_LEN, args.new_tokens), (PROMPT_LEN, 4 * args.new_tokens), (8 * PROMPT_LEN, args.new_tokens)]
        report["reexecution"] = measure_reexecution(path, half, shapes, args.repeats)
    if not parts & {"cost", "detection", "stall"}:
        print(json.dumps(report, indent=2) if args.json else render(report))
        return 0
    with LocalCluster(path, spans=spans, node_threads=1, work_dir=tmp / "cluster") as cluster:
        if "cost" in parts:
            report["cost"] = measure_cost(cluster, path, prompt, args.new_tokens, args.repeats)
        if "detection" in parts:
            report["detection"] = measure_detection(
                cluster, path, prompt, args.new_tokens, args.generations, tmp / "control.json"
            )
        if "stall" in parts:
            report["stall_seconds"] = measure_stalls(cluster, path, prompt, args.new_tokens, args.runs)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


def render(report: dict[str, Any]) -> str:
    lines = [f"model {report['model']}, {report['new_tokens']} new tokens, {report['cpus']} cpus"]
    if "reexecution" in report:
        lines += ["", "re-execution compute / the generation's own, one span in this process (1 thread):"]
        for label, row in report["reexecution"].items():
            lines.append(
                f"  {label:<22} every hop {row['all']:6.1%}   default {row['default']:6.1%}   "
                f"prompt alone {row['prompt_only']:6.1%}   (generation {row['generation_s'] * 1000:.0f} ms)"
            )
    if "cost" in report:
        lines += ["", *render_cost(report["cost"])]
    if "detection" in report:
        lines += ["", "detection (default policy):"]
        for label, row in report["detection"].items():
            n = row["generations"]
            lines.append(f"  {label:<36} caught {row['caught']:>3}/{n}   tokens exact {row['exact']:>3}/{n}")
    if "stall_seconds" in report:
        lines += ["", "stall when a node of the route fails after the 5th token (seconds):"]
        for label, row in report["stall_seconds"].items():
            lines.append(f"  {label:<16} min {row['min']:.2f}  median {row['median']:.2f}  max {row['max']:.2f}")
    return "\n".join(lines)


def render_cost(cost: dict[str, Any]) -> list[str]:
    off = cost["off"]
    lines = ["cost:", f"  local transformers  {cost['local']['tok_s']:7.1f} tok/s  1.00x local"]
    for mode in ("off", "default", "all"):
        row = cost[mode]
        lines.append(
            f"  verify {mode:<8}     {row['tok_s']:7.1f} tok/s  {row['tok_s'] / cost['local']['tok_s']:.2f}x local  "
            f"{row['tok_s'] / off['tok_s']:.2f}x off  node compute {row['node_seconds'] * 1000:7.1f} ms/gen "
            f"({row['node_seconds'] / off['node_seconds']:.2f}x off)  positions {row['node_positions']:.0f} "
            f"({row['node_positions'] / off['node_positions']:.2f}x off)  {'EXACT' if row['exact'] else 'DIFF'}"
        )
    return lines


if __name__ == "__main__":
    run_script(main)
