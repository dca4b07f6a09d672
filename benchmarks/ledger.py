"""What credits cost the coordinator and a newcomer: receipts the ledger applies per second, and the CPU a starter
grant's proof of work takes.

1. Receipts: --receipts signed receipts (from --clients clients, cumulative, one session each, paying one node)
   applied by a Ledger on a file (WAL, synchronous=FULL: every receipt is one durable transaction), then the same
   number submitted in batches of 500 over gRPC to a coordinator running in this process (signature checks, the
   announced-node lookup in its DHT, the same SQLite file). Figures: receipts per second, and the gRPC path as a
   ratio of the direct one.
2. Grants: --grants fresh keys each solve the proof of work at the default difficulty (and at the local cluster's),
   timed in CPU seconds of this process; mean, median and max, since the work per key is random (geometric).

Figures only, never assertions. Usage: python benchmarks/ledger.py [--receipts 5000] [--grants 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import run_script
from hivegen import __version__
from hivegen.coordinator.client import LedgerClient, open_account
from hivegen.coordinator.server import Coordinator, CoordinatorConfig
from hivegen.credits.grants import DEFAULT_PROOF_BITS, solve_proof
from hivegen.credits.identity import Identity
from hivegen.credits.ledger import Ledger
from hivegen.credits.receipts import WORK_UNITS_PER_CREDIT, Receipt, SignedReceipt, sign_receipt
from hivegen.dht import ModelInfo, SpanRecord, announce_model, announce_span, node_id

MODEL = "bench-model"
BATCH = 500


def receipts(clients: list[Identity], node: str, count: int, tag: str) -> list[SignedReceipt]:
    """`count` cumulative receipts, round-robin over the clients' sessions (each a 0.01-credit step)."""
    signed = []
    for i in range(count):
        client, seq = clients[i % len(clients)], i // len(clients) + 1
        r = Receipt(f"{tag}-{client.account}", client.account, client.public_key_hex, node, MODEL, seq,
                    seq * WORK_UNITS_PER_CREDIT // 100)  # fmt: skip
        signed.append(sign_receipt(client, r))
    return signed


def direct(tmp: Path, clients: list[Identity], node: str, count: int) -> float:
    with Ledger(tmp / "direct.sqlite", starter_grant=10_000) as ledger:
        for client in clients:
            ledger.open_account(client.account, client.public_key_hex)
        batch = receipts(clients, node, count, "direct")
        began = time.perf_counter()
        for signed in batch:
            ledger.apply_receipt(signed)
        return count / (time.perf_counter() - began)


def over_grpc(tmp: Path, clients: list[Identity], node_identity: Identity, count: int) -> float:
    coordinator = Coordinator(CoordinatorConfig(data=tmp / "coordinator", starter_grant=10_000, grant_proof_bits=8))
    coordinator.start()
    dht = coordinator.dht  # announce the paid node from the coordinator's own DHT peer
    assert dht is not None
    try:
        announce_model(dht, ModelInfo(MODEL, MODEL, 1), 600, node_identity)
        record = SpanRecord(node_id(dht, node_identity.public_key_hex), "127.0.0.1:1", 0, 1, 1.0, 1, "float32",
                            __version__)  # fmt: skip
        announce_span(dht, MODEL, record, 600, node_identity)
        time.sleep(1.0)
        with LedgerClient(coordinator.address, timeout=120) as ledger:
            for client in clients:
                open_account(ledger, client)
            batch = receipts(clients, node_identity.account, count, "grpc")
            began = time.perf_counter()
            for i in range(0, count, BATCH):
                results = ledger.submit(batch[i : i + BATCH])
                errors = {r.error.split(":")[0] for r in results if r.error}
                if errors:
                    raise SystemExit(f"the ledger refused receipts: {errors}")
            return count / (time.perf_counter() - began)
    finally:
        coordinator.stop()


def grant_seconds(bits: int, keys: int) -> list[float]:
    seconds = []
    for _ in range(keys):
        key = Identity.generate().public_key_hex
        began = time.process_time()
        solve_proof("bench-salt", key, bits)
        seconds.append(time.process_time() - began)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--receipts", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--grants", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    clients = [Identity.generate() for _ in range(args.clients)]
    node = Identity.generate()
    with tempfile.TemporaryDirectory(prefix="hivegen-bench-ledger-") as tmp:
        per_s_direct = direct(Path(tmp), clients, node.account, args.receipts)
        per_s_grpc = over_grpc(Path(tmp), clients, node, args.receipts)
    default = grant_seconds(DEFAULT_PROOF_BITS, args.grants)
    easy = grant_seconds(8, args.grants)
    result: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "receipts": args.receipts,
        "clients": args.clients,
        "receipts_per_s_direct": per_s_direct,
        "receipts_per_s_grpc": per_s_grpc,
        "grpc_over_direct": per_s_grpc / per_s_direct,
        "grant_bits": DEFAULT_PROOF_BITS,
        "grant_cpu_s": default,
        "cluster_grant_cpu_s": easy,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"ledger, {args.receipts} receipts from {args.clients} clients ({result['machine']}):")
    print(f"  Ledger.apply_receipt on a WAL file:  {per_s_direct:8.0f} receipts/s")
    ratio = per_s_grpc / per_s_direct
    print(f"  Submit over gRPC, batches of {BATCH}: {per_s_grpc:8.0f} receipts/s  ({ratio:.2f}x direct)")
    for bits, seconds in ((DEFAULT_PROOF_BITS, default), (8, easy)):
        print(f"  starter grant at {bits:2d} bits: CPU s per grant mean {statistics.mean(seconds):.3f}, median "
              f"{statistics.median(seconds):.3f}, max {max(seconds):.3f} (over {len(seconds)} keys)")  # fmt: skip
    return 0


if __name__ == "__main__":
    run_script(main)
