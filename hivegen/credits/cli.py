"""`hivegen identity`, `hivegen credits ...` and `hivegen coordinator serve`: argument parsing and printing."""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path
from typing import Any

from hivegen.credits.grants import DEFAULT_PROOF_BITS, DEFAULT_STARTER_GRANT
from hivegen.errors import CreditsError
from hivegen.peers import COORDINATOR_ENV, add_coordinator_argument, add_peers_argument


def _coordinator(args: argparse.Namespace) -> str:
    from hivegen.errors import HivegenError

    address = args.coordinator
    if not address:
        raise HivegenError(f"no coordinator: pass --coordinator HOST:PORT or set {COORDINATOR_ENV}")
    return str(address)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text, flush=True)


def _when(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def cmd_identity(args: argparse.Namespace) -> int:
    from hivegen.credits.identity import Identity

    identity = Identity.load_or_create(Path(args.path) if args.path else None)
    data = {"account": identity.account, "public_key": identity.public_key_hex}
    _emit(args, data, f"account:    {identity.account}\npublic key: {identity.public_key_hex}")
    return 0


def _identity(args: argparse.Namespace, create: bool = False) -> Any:
    """The key named by --identity (which must exist, unless `create`), else the default one (created on first
    use): reading the balance of a key file that a typo just created would only ever say 0."""
    from hivegen.credits.identity import Identity

    if args.identity and not create and not Path(args.identity).expanduser().exists():
        raise CreditsError(
            f"no key file at {args.identity}: pass the path of an existing identity, or create one with "
            f"`hivegen credits open --identity {args.identity}`"
        )
    return Identity.load_or_create(Path(args.identity).expanduser() if args.identity else None)


def cmd_balance(args: argparse.Namespace) -> int:
    from hivegen.coordinator.client import LedgerClient
    from hivegen.credits.units import credits_value, format_credits

    identity = _identity(args)
    with LedgerClient(_coordinator(args)) as ledger:
        reply = ledger.balance(identity)
    data = {"account": identity.account, "credits": credits_value(reply.units), "units": reply.units,
            "known": reply.known}  # fmt: skip
    text = f"{identity.account}: {format_credits(reply.units)} credits"
    if not reply.known:
        text += " (no such account yet: `hivegen credits open` claims the starter grant)"
    _emit(args, data, text)
    return 0


def cmd_open(args: argparse.Namespace) -> int:
    import time

    from hivegen.coordinator.client import LedgerClient, open_account
    from hivegen.credits.units import credits_value, format_credits

    identity = _identity(args, create=True)
    with LedgerClient(_coordinator(args)) as ledger:
        policy = ledger.grant_policy()
        if policy.grant_units and not args.json:
            print(f"the ledger grants {format_credits(policy.grant_units)} credits once, for a {policy.proof_bits}-bit "
                  "proof of work; solving it if this account has not claimed it yet ...", flush=True)  # fmt: skip
        began = time.perf_counter()
        units = open_account(ledger, identity)
    seconds = time.perf_counter() - began
    data = {"account": identity.account, "credits": credits_value(units), "units": units, "seconds": seconds}
    _emit(args, data, f"{identity.account}: {format_credits(units)} credits ({seconds:.1f} s)")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from hivegen.coordinator.client import LedgerClient
    from hivegen.credits.units import credits_value, format_credits

    identity = _identity(args)
    with LedgerClient(_coordinator(args)) as ledger:
        entries = ledger.history(identity, args.limit)
    rows: list[dict[str, Any]] = [
        {
            "row": e.row,
            "at": e.at,
            "kind": e.kind,
            "from": e.src,
            "to": e.dst,
            "credits": credits_value(e.units),
            "units": e.units,
            "session_id": e.session_id,
            "seq": e.seq,
        }
        for e in entries
    ]
    lines = [f"{'ROW':>6}  {'TIME (UTC)':<19}  {'KIND':<8}  {'FROM':<42}  {'TO':<42}  {'CREDITS':>16}"]
    lines += [
        f"{r['row']:>6}  {_when(r['at']):<19}  {r['kind']:<8}  {r['from']:<42}  {r['to']:<42}  "
        f"{format_credits(int(r['units'])):>16}"
        for r in rows
    ]
    _emit(args, rows, "\n".join(lines) if rows else "no transfers yet")
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    from hivegen.coordinator.client import LedgerClient
    from hivegen.credits.units import credits_value, format_credits

    with LedgerClient(_coordinator(args)) as ledger:
        entries = ledger.top(args.limit)
    rows = [{"account": e.account, "earned": credits_value(e.earned_units), "units": e.earned_units} for e in entries]
    lines = [f"{'#':>3}  {'ACCOUNT':<42}  {'EARNED (CREDITS)':>18}"]
    lines += [f"{i:>3}  {e.account:<42}  {format_credits(e.earned_units):>18}" for i, e in enumerate(entries, 1)]
    _emit(args, rows, "\n".join(lines) if rows else "nobody has earned credits yet")
    return 0


def cmd_verify_journal(args: argparse.Namespace) -> int:
    from hivegen.coordinator.client import LedgerClient

    with LedgerClient(_coordinator(args)) as ledger:
        reply = ledger.verify_journal()
    checked = _when(reply.checked_at)
    data = {"ok": reply.ok, "bad_row": reply.bad_row if not reply.ok else None, "message": reply.message,
            "rows": reply.rows, "head_hash": reply.head_hash, "checked_at": reply.checked_at}  # fmt: skip
    text = (
        f"{reply.message}: {reply.rows} rows, head {reply.head_hash[:16]}, checked {checked} UTC"
        if reply.ok
        else f"journal check FAILED at row {reply.bad_row}: {reply.message}"
    )
    _emit(args, data, text)
    return 0 if reply.ok else 1


def cmd_coordinator_serve(args: argparse.Namespace) -> int:
    from hivegen.coordinator.server import Coordinator, CoordinatorConfig
    from hivegen.model.demo import hivegen_home
    from hivegen.process import StopSignals, tie_process_tree

    tie_process_tree()
    coordinator = Coordinator(
        CoordinatorConfig(
            data=Path(args.data).expanduser() if args.data else hivegen_home() / "coordinator",
            host=args.host,
            port=args.port,
            dht_port=args.dht_port,
            http_port=args.http_port,
            starter_grant=args.starter_grant,
            grant_proof_bits=args.grant_proof_of_work,
            ready_file=Path(args.ready_file) if args.ready_file else None,
            initial_peers=args.initial_peers,
        )
    )
    stop = StopSignals()
    try:
        coordinator.start()
        info = coordinator.info()
        print(
            f"hivegen coordinator: ledger at {info['coordinator']}, status at {info['status_url']}/status", flush=True
        )
        print("nodes and clients join the swarm with:", flush=True)
        print("  --initial-peers " + " ".join(info["initial_peers"]), flush=True)  # type: ignore[arg-type]
        stop.wait()
    finally:
        coordinator.stop()
    print("hivegen coordinator: stopped", flush=True)
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `identity`, `credits` and `coordinator` on the top-level parser."""
    common = argparse.ArgumentParser(add_help=False)
    add_coordinator_argument(common, "the ledger")
    common.add_argument("--json", action="store_true", help="print JSON instead of text")

    identity = commands.add_parser("identity", help="create or show this machine's Ed25519 identity (account)")
    identity.add_argument("--path", help="key file (default: $HIVEGEN_HOME/identity, else ~/.hivegen/identity)")
    identity.add_argument("--json", action="store_true", help="print JSON instead of text")
    identity.set_defaults(handler=cmd_identity)

    credits = commands.add_parser("credits", help="credit balances and the ledger").add_subparsers(
        dest="credits_cmd", required=True
    )
    own = argparse.ArgumentParser(add_help=False, parents=[common])
    own.add_argument("--identity", help="your key file (default: $HIVEGEN_IDENTITY, else ~/.hivegen/identity); "
                     "only an account's own key may read it")  # fmt: skip
    balance = credits.add_parser("balance", parents=[own], help="your balance")
    balance.set_defaults(handler=cmd_balance)
    open_ = credits.add_parser("open", parents=[own], help="open your account, claiming the starter grant "
                               "(solves the ledger's proof of work once)")  # fmt: skip
    open_.set_defaults(handler=cmd_open)
    history = credits.add_parser("history", parents=[own], help="your recent transfers, newest first")
    history.add_argument("--limit", type=int, default=20)
    history.set_defaults(handler=cmd_history)
    top = credits.add_parser("top", parents=[common], help="the accounts that earned most")
    top.add_argument("--limit", type=int, default=10)
    top.set_defaults(handler=cmd_top)
    verify = credits.add_parser(
        "verify-journal", parents=[common], help="the ledger's latest check of its journal (at most one a minute)"
    )
    verify.set_defaults(handler=cmd_verify_journal)

    coordinator = commands.add_parser("coordinator", help="the swarm's coordinator").add_subparsers(
        dest="coordinator_cmd", required=True
    )
    serve = coordinator.add_parser("serve", help="DHT bootstrap peer + credit ledger + HTTP status page")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=0, help="ledger gRPC port (0: any free port)")
    serve.add_argument("--dht-port", type=int, default=0, help="DHT port (0: any free port)")
    serve.add_argument("--http-port", type=int, default=0, help="status page port (0: any free port)")
    serve.add_argument("--data", help="ledger directory (default: $HIVEGEN_HOME/coordinator, else "
                       "~/.hivegen/coordinator)")  # fmt: skip
    serve.add_argument("--starter-grant", type=int, default=DEFAULT_STARTER_GRANT,
                       help=f"credits a new account gets once (default {DEFAULT_STARTER_GRANT}; 0: credits are only "
                       "earned by serving)")  # fmt: skip
    serve.add_argument("--grant-proof-of-work", type=int, default=DEFAULT_PROOF_BITS, metavar="BITS",
                       help=f"leading zero bits of the proof of work a grant costs (default {DEFAULT_PROOF_BITS}: "
                       "about 10 s of one CPU core)")  # fmt: skip
    serve.add_argument("--ready-file", help="write JSON here once serving")
    add_peers_argument(serve, required=False, help="DHT multiaddrs of a swarm to join (none: start a new swarm)")
    serve.set_defaults(handler=cmd_coordinator_serve)
