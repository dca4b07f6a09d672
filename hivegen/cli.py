"""The `hivegen` command. Thin: parses arguments and delegates to the packages."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hivegen import __version__
from hivegen.errors import HivegenError, ModelLoadError
from hivegen.files import STORE_DEFAULT, write_json_atomic
from hivegen.process import StopSignals, tie_process_tree

if TYPE_CHECKING:
    from hivegen.store.records import ModelRef

Handler = Callable[[argparse.Namespace], int]


def _model_path(spec: str) -> Path:
    from hivegen.model.demo import resolve_model_path

    return resolve_model_path(spec)


def cmd_cluster_up(args: argparse.Namespace) -> int:
    tie_process_tree()
    from hivegen.cluster import LocalCluster

    cluster = LocalCluster(_model_path(args.model), nodes=args.nodes, host=args.host, dtype=args.dtype,
                           node_threads=args.node_threads, coordinator=True,
                           starter_grant=args.starter_grant,
                           grant_proof_bits=args.grant_proof_of_work, api_port=args.api_port,
                           work_dir=args.work_dir)  # fmt: skip
    print(f"starting a coordinator and {len(cluster.spans)} nodes for {cluster.model_key} ...", flush=True)
    stop = StopSignals()
    try:
        cluster.start()
        for node in cluster.nodes:
            print(f"node pid {node.pid}: blocks {node.blocks[0]}:{node.blocks[1]} at {node.address}", flush=True)
        print(f"ready in {cluster.ready_seconds:.1f} s; initial peers: {' '.join(cluster.initial_peers)}", flush=True)
        kept = "removed when the cluster stops; pass --work-dir DIR to keep them" if cluster.temporary else "kept"
        print(f"logs: {cluster.work_dir}/node-*/node.log ({kept})", flush=True)
        if cluster.coordinator is not None:
            status = f"{cluster.coordinator.status_url}/status"
            print(f"coordinator (ledger) at {cluster.coordinator.address}; swarm status at {status}", flush=True)
        if cluster.api is not None:
            print(f"OpenAI-compatible API at {cluster.api.url} (log: {cluster.api.log_file})", flush=True)
        if args.ready_file:
            write_json_atomic(args.ready_file, cluster.info())
        stop.wait()
    finally:
        cluster.stop()
    print("cluster stopped", flush=True)
    return 0


def cmd_evidence_check(args: argparse.Namespace) -> int:
    import urllib.request

    from hivegen.client.evidence import check_evidence
    from hivegen.proto import reports_pb2

    if args.evidence.startswith(("http://", "https://")):
        with urllib.request.urlopen(args.evidence, timeout=30) as answer:
            data = answer.read()
    else:
        data = Path(args.evidence).read_bytes()
    try:
        evidence = reports_pb2.Evidence.FromString(data)
    except Exception as exc:
        raise HivegenError(f"{args.evidence} is not hivegen evidence ({exc})") from exc
    verdict = check_evidence(evidence, _model_path(args.model), device=args.device)
    node, address = terminal_safe(evidence.node_id), terminal_safe(evidence.node_address)  # a stranger wrote them
    print(f"node {node} ({address}), blocks {evidence.start_block}:{evidence.end_block}, "
          f"{len(evidence.steps)} signed steps")  # fmt: skip
    print(f"  signatures: {'valid' if verdict.signed else 'INVALID: this evidence proves nothing'}")
    print(f"  its answer vs re-running the blocks here: error {verdict.error:.3g} (tolerance {verdict.tolerance:.3g})")
    if verdict.witnesses_error is not None:
        print(f"  the witnesses' answer vs re-running here: error {verdict.witnesses_error:.3g}")
    print("proven: the node signed an answer its blocks do not compute" if verdict.proven else "not proven")
    return 0 if verdict.proven else 1


def cmd_models_prepare(args: argparse.Namespace) -> int:
    from hivegen.model.demo import prepare_model

    path = prepare_model(args.name, force=args.force, progress=True)
    print(path, flush=True)
    return 0


def cmd_models_check(args: argparse.Namespace) -> int:
    from hivegen.model.support import check_model

    support = check_model(_model_path(args.model), args.attn_implementation)
    if args.json:
        _print_json(support.to_json())
    else:
        print("\n".join(terminal_safe(line, limit=1000) for line in support.lines()))
    return 0 if support.servable else 1


def _store_dir(args: argparse.Namespace) -> Path:
    from hivegen.store import default_store_path

    return Path(args.store).expanduser() if args.store else default_store_path()


def terminal_safe(text: str, limit: int = 200) -> str:
    """`text` as a terminal can show it without obeying it: control, format (bidi) and other unprintable characters
    become escapes like \\x1b, and it is cut to `limit` characters. For strings strangers wrote (swarm records,
    evidence)."""
    cut = text if len(text) <= limit else text[:limit] + "..."
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in cut)


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False), flush=True)


def cmd_store_ls(args: argparse.Namespace) -> int:
    from hivegen.store import StoreError, inspect

    store = inspect.open_existing_store(_store_dir(args))

    def skip(ref: str, exc: StoreError) -> None:
        print(f"hivegen: warning: skipped {ref}: {exc}", file=sys.stderr)

    rows = inspect.list_entries(store, args.kind, on_error=skip)
    if args.json:
        _print_json([row.to_json() for row in rows])
    else:
        print(inspect.format_listing(rows, store.location), flush=True)
    return 0


def cmd_store_show(args: argparse.Namespace) -> int:
    from hivegen.store import inspect

    store = inspect.open_existing_store(_store_dir(args))
    view = inspect.view_object(store, inspect.resolve_ref(store, args.ref))
    if args.json:
        _print_json(view.to_json())
    else:
        print(inspect.format_view(view), flush=True)
    return 0


def cmd_store_export(args: argparse.Namespace) -> int:
    from hivegen.store import inspect

    store = inspect.open_existing_store(_store_dir(args))
    rows = list(inspect.export_rows(store, _record_decoder(args.tokenizer)))
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if not args.output:
        sys.stdout.write(lines)
        return 0
    Path(args.output).write_text(lines, encoding="utf-8")
    if args.json:
        _print_json({"exported": len(rows), "output": args.output})
    else:
        print(f"exported {len(rows)} generations to {args.output}", flush=True)
    return 0


def _record_decoder(spec: str | None) -> Callable[[ModelRef, Sequence[int]], str | None]:
    """Prompt text for export: with `spec`, that tokenizer for every record; else each record's own model's, when a
    checkpoint of that name and weights digest is a prepared demo model or a directory here (else no text)."""
    if spec:
        decoder = _prompt_decoder(spec)
        return lambda _model, ids: decoder(ids)
    from hivegen.model.demo import models_dir

    found: dict[ModelRef, Callable[[Sequence[int]], str] | None] = {}

    def decode(model: ModelRef, ids: Sequence[int]) -> str | None:
        if model not in found:
            found[model] = _own_decoder(model)
            if found[model] is None:
                print(f"note: no tokenizer found for model {model.name} (looked in {models_dir()} and here); "
                      "pass --tokenizer DIR for its prompt text", file=sys.stderr)  # fmt: skip
        decoder = found[model]
        return decoder(ids) if decoder is not None else None

    return decode


def _own_decoder(model: ModelRef) -> Callable[[Sequence[int]], str] | None:
    from hivegen.model.checkpoint import ModelCheckpoint
    from hivegen.model.demo import models_dir

    for base in (models_dir(), Path.cwd()):
        path = base / model.name
        if not (path / "config.json").is_file():
            continue
        try:
            if ModelCheckpoint.open(path).digest == model.digest:
                return _prompt_decoder(str(path))
        except (ModelLoadError, OSError):
            continue
    return None


def _prompt_decoder(spec: str) -> Callable[[Sequence[int]], str]:
    """Decode prompt ids with the tokenizer of a checkpoint directory or demo model (special tokens kept)."""
    from transformers import AutoTokenizer

    path = _model_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(
            f"cannot load a tokenizer from {path}: {exc}; pass a checkpoint with tokenizer files"
        ) from exc

    def decode(ids: Sequence[int]) -> str:
        return str(tokenizer.decode(list(ids)))

    return decode


def cmd_store_verify(args: argparse.Namespace) -> int:
    from hivegen.store import inspect

    report = inspect.verify(inspect.open_existing_store(_store_dir(args)))
    if args.json:
        _print_json(report.to_json())
    else:
        print(inspect.format_verify(report), flush=True)
    return 1 if report.corrupt else 0


def cmd_store_gc(args: argparse.Namespace) -> int:
    from hivegen.store import collect_garbage, inspect

    report = collect_garbage(inspect.open_existing_store(_store_dir(args)), dry_run=args.dry_run)
    if args.json:
        _print_json({"kept": report.kept, "removed": report.removed, "dry_run": args.dry_run})
    else:
        verb = "would remove" if args.dry_run else "removed"
        print(f"kept {report.kept} objects, {verb} {len(report.removed)}", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hivegen", description="Share GPUs for LLM inference, or generate on them.")
    parser.add_argument("--version", action="version", version=f"hivegen {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    commands = parser.add_subparsers(dest="command", required=True)

    cluster = commands.add_parser("cluster", help="a local multi-process cluster").add_subparsers(
        dest="cluster_cmd", required=True
    )
    up = cluster.add_parser(
        "up",
        help="start a coordinator and N nodes on this machine; Ctrl-C stops them all",
        description="Start a coordinator (DHT bootstrap peer, credit ledger, status page) and N `hivegen node serve` "
        "processes splitting the model's blocks evenly, each with its own identity, charging credits through the "
        "coordinator; with --api-port, also the OpenAI-compatible API. Ctrl-C or SIGTERM stops them all.",
    )
    up.add_argument("--model", required=True, help="checkpoint directory, or a prepared demo model name")
    up.add_argument("--nodes", type=int, default=3, help="node processes; the blocks are split evenly")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    up.add_argument("--node-threads", type=int, default=0, help="torch threads per node (0: cores / nodes)")
    up.add_argument("--starter-grant", type=int, default=10_000, help="credits a new account gets once (default 10000)")
    up.add_argument(
        "--grant-proof-of-work",
        type=int,
        default=8,
        metavar="BITS",
        help="proof of work a grant costs (default 8 bits: instant, for a local demo)",
    )
    up.add_argument(
        "--api-port", type=int, metavar="PORT",
        help="also serve the OpenAI-compatible API on this port (0: any free port); its URL is printed and in the "
        "ready file as api_url",
    )  # fmt: skip
    up.add_argument("--ready-file", help="write JSON (initial_peers, nodes) here once every block is announced")
    up.add_argument("--work-dir", metavar="DIR", help="keep the cluster's files here: node logs, identities, the "
                    "ledger, receipts (default: a temporary directory, removed when the cluster stops)")  # fmt: skip
    up.set_defaults(handler=cmd_cluster_up)

    models = commands.add_parser("models", help="check a checkpoint; prepare demo models").add_subparsers(
        dest="models_cmd", required=True
    )
    check_model = models.add_parser(
        "check", help="say whether a checkpoint can be served, its blocks and their parameters (no swarm, no weights)"
    )
    check_model.add_argument("model", help="checkpoint directory, or a prepared demo model name")
    check_model.add_argument("--attn-implementation", metavar="NAME", help="check this attention kernel (default: "
                             "what nodes use by default)")  # fmt: skip
    check_model.add_argument("--json", action="store_true", help="print JSON instead of text")
    check_model.set_defaults(handler=cmd_models_check)
    prepare = models.add_parser("prepare", help="convert a demo model to a safetensors checkpoint, once")
    prepare.add_argument("name", help="demo model name, e.g. smollm2")
    prepare.add_argument("--force", action="store_true", help="convert again even if already prepared")
    prepare.set_defaults(handler=cmd_models_prepare)

    evidence = commands.add_parser("evidence", help="evidence against lying nodes").add_subparsers(
        dest="evidence_cmd", required=True
    )
    check = evidence.add_parser("check", help="re-run a node's signed steps here and say whether it lied")
    check.add_argument("evidence", help="an evidence file (~/.hivegen/evidence/*.pb) or a status page /evidence/ URL")
    check.add_argument("--model", required=True, help="the checkpoint (or demo model name) the node served")
    check.add_argument("--device", default="cpu")
    check.set_defaults(handler=cmd_evidence_check)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", metavar="DIR", help=f"store directory {STORE_DEFAULT}")
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    store = commands.add_parser("store", help="inspect the store of recorded generations").add_subparsers(
        dest="store_cmd", required=True
    )
    ls = store.add_parser("ls", parents=[common], help="list generations (newest first) and traces")
    ls.add_argument("--kind", choices=["generation", "trace", "all"], default="all")
    ls.set_defaults(handler=cmd_store_ls)
    show = store.add_parser("show", parents=[common], help="print one object: a generation, a trace, ...")
    show.add_argument("ref", help="a full ref, or a unique prefix of at least 6 hex characters")
    show.set_defaults(handler=cmd_store_show)
    export = store.add_parser("export", parents=[common], help="write every generation as one JSON line")
    export.add_argument("--format", choices=["jsonl"], default="jsonl")
    export.add_argument("--output", metavar="FILE", help="write here instead of stdout")
    export.add_argument("--tokenizer", metavar="DIR", help="checkpoint or demo model whose tokenizer decodes prompts")
    export.set_defaults(handler=cmd_store_export)
    verify = store.add_parser("verify", parents=[common], help="re-hash every object; exit 1 if any is corrupt")
    verify.set_defaults(handler=cmd_store_verify)
    gc = store.add_parser("gc", parents=[common], help="remove objects no pointer reaches")
    gc.add_argument("--dry-run", action="store_true", help="only report what would be removed")
    gc.set_defaults(handler=cmd_store_gc)
    from hivegen.api.cli import add_commands as add_api_commands
    from hivegen.client.chat import add_commands as add_chat_commands
    from hivegen.client.generate_cli import add_commands as add_generate_commands
    from hivegen.coordinator.status_cli import add_commands as add_status_commands
    from hivegen.credits.cli import add_commands as add_credit_commands
    from hivegen.node.cli import add_commands as add_node_commands

    add_generate_commands(commands)
    add_node_commands(commands)
    add_api_commands(commands)
    add_chat_commands(commands)
    add_status_commands(commands)

    add_credit_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler: Handler = args.handler
    try:
        return handler(args)
    except HivegenError as exc:
        print(f"hivegen: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
