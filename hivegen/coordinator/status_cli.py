"""`hivegen status`: the swarm's models, their coverage and their nodes, as a table in the terminal (or JSON)."""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.request
from typing import Any

from hivegen.errors import HivegenError, format_blocks
from hivegen.peers import COORDINATOR_ENV, add_coordinator_argument


class StatusUnavailable(HivegenError):
    """The coordinator (or its status page) could not be reached or answered something else than its status."""


def status_url(coordinator: str) -> str:
    """The status page's base URL: given as http(s)://..., else asked of the ledger at HOST:PORT."""
    if coordinator.startswith(("http://", "https://")):
        return coordinator.rstrip("/")
    from hivegen.coordinator.client import LedgerClient

    try:
        with LedgerClient(coordinator) as ledger:
            url = ledger.info().status_url
    except HivegenError as exc:
        raise StatusUnavailable(f"cannot reach the coordinator at {coordinator}: {exc}") from None
    if not url:
        raise StatusUnavailable(f"the coordinator at {coordinator} serves no status page")
    return str(url)


def fetch_status(url: str, timeout: float = 15.0) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"{url}/status", timeout=timeout) as reply:
            data = json.load(reply)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise StatusUnavailable(f"cannot read {url}/status: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise StatusUnavailable(f"{url}/status did not answer a swarm status")
    return data


def render(status: dict[str, Any], now: float | None = None) -> str:
    """The status as text: a line per model, then a row per node. Strings from the swarm are made terminal-safe."""
    from hivegen.cli import terminal_safe as safe

    now = time.time() if now is None else now
    models = status.get("models", [])
    if not models:
        return "no model is registered in the swarm yet"
    lines: list[str] = []
    for model in models:
        missing = model.get("missing_blocks", [])
        state = (f"COVERAGE GAP: blocks {format_blocks(missing)} served by no node" if missing
                 else "every block served")  # fmt: skip
        size = f"{int(model.get('num_blocks', 0))} blocks, {int(model.get('nodes_total', 0))} nodes"
        lines.append(f"{safe(model.get('name', ''))} ({safe(model.get('model_key', ''))}): {size}, {state}")
        header = ("node", "address", "account", "blocks", "steps/s", "sessions", "free cache", "version", "refreshed")
        rows = [header]
        for node in model.get("nodes", []):
            start, end = (int(x) for x in node.get("blocks", [0, 0]))
            updated = float(node.get("updated_at", 0.0))
            total = int(node.get("cache_tokens_total", 0))
            rows.append((
                safe(str(node.get("node_id", "")).partition("@")[0][:16]), safe(node.get("address", "")),
                safe(node.get("account", "")), f"{start}:{end}", f"{float(node.get('throughput', 0.0)):.1f}",
                str(int(node.get("active_sessions", 0))),
                f"{int(node.get('cache_tokens_free', 0)):,}" + (f"/{total:,}" if total else ""),
                safe(node.get("version", "")), f"{max(0.0, now - updated):.0f} s ago" if updated else "-",
            ))  # fmt: skip
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                  for row in rows]  # fmt: skip
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    coordinator = args.coordinator
    if not coordinator:
        raise HivegenError(f"no coordinator: pass --coordinator HOST:PORT (or its status URL) or set {COORDINATOR_ENV}")
    status = fetch_status(status_url(coordinator))
    print(json.dumps(status, indent=2) if args.json else render(status), flush=True)
    return 0


def add_commands(commands: Any) -> None:
    """`hivegen status`."""
    status = commands.add_parser("status", help="the swarm's models, coverage and nodes, from its coordinator")
    add_coordinator_argument(status, "the coordinator's ledger address, or its status page URL", "HOST:PORT|URL")
    status.add_argument("--json", action="store_true", help="print the coordinator's /status JSON")
    status.set_defaults(handler=cmd_status)
