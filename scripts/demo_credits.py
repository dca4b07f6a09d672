"""Print what the demo's client spent and what each node earned, once the nodes' receipts are settled.

Usage: python scripts/demo_credits.py CLUSTER_READY_FILE  (the file `hivegen cluster up --ready-file` wrote)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import grpc

from hivegen.coordinator.client import LedgerClient
from hivegen.credits.identity import Identity
from hivegen.credits.units import format_credits
from hivegen.proto import node_pb2, node_pb2_grpc


def pending_receipts(addresses: list[str]) -> int:
    """Receipts the nodes hold that the ledger has not applied yet."""
    total = 0
    for address in addresses:
        with grpc.insecure_channel(address) as channel:
            total += node_pb2_grpc.NodeStub(channel).Info(node_pb2.InfoRequest(), timeout=10).receipts_pending
    return total


def spent(ledger: LedgerClient, me: Identity) -> int:
    """Work units `me` paid out, from its own journal entries (only its key may read them)."""
    return sum(e.units for e in ledger.history(me, limit=1000) if e.kind == "transfer" and e.src == me.account)


def main(ready_file: str) -> int:
    cluster = json.loads(Path(ready_file).read_text())
    nodes = cluster["nodes"]
    deadline = time.monotonic() + 30
    while (pending := pending_receipts([n["address"] for n in nodes])) and time.monotonic() < deadline:
        time.sleep(0.5)
    if pending:
        print(f"warning: {pending} receipts are still waiting for the ledger", file=sys.stderr)
    me = Identity.load_or_create()
    with LedgerClient(cluster["coordinator"]) as ledger:
        balance = format_credits(ledger.balance(me).units)
        print(f"  client {me.account}: spent {format_credits(spent(ledger, me))} credits, balance {balance}")
        earned = {e.account: e.earned_units for e in ledger.top(1000)}  # the leaderboard is public
        for node in nodes:
            blocks = "{}:{}".format(*node["blocks"])
            units = earned.get(node["account"], 0)
            print(f"  node   {node['account']} (blocks {blocks}): earned {format_credits(units)} credits")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    raise SystemExit(main(sys.argv[1]))
