"""`hivegen api serve`: the OpenAI-compatible HTTP API on uvicorn, in front of the swarm."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
from pathlib import Path
from typing import Any

from hivegen.files import IDENTITY_DEFAULT, STORE_DEFAULT, write_json_atomic
from hivegen.peers import add_coordinator_argument, add_peers_argument, check_peers
from hivegen.process import StopSignals, tie_process_tree

API_KEY_ENV = "HIVEGEN_API_KEY"
MAX_CONNECTIONS = 1024


def cmd_api_serve(args: argparse.Namespace) -> int:
    tie_process_tree()
    stop = StopSignals()  # a signal while the models load ends the server before it serves
    import uvicorn

    from hivegen.api.app import create_app
    from hivegen.api.service import ApiService

    check_peers(args.initial_peers)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    sock = socket.create_server((args.host, args.port), reuse_port=False)  # bound first: a taken port fails fast
    service = ApiService.open(
        args.model, args.initial_peers, store=args.store, identity=args.identity, coordinator=args.coordinator,
        verify=args.verify, max_concurrency=args.max_concurrency,
    )  # fmt: skip
    try:
        for served in service.models:
            print(f"hivegen api: joining the swarm for {served.id} ...", flush=True)
            _ = served.client.remote  # load the local layers and start the DHT now, not on the first request
        if stop.received:
            return 0
        app = create_app(service, api_key=api_key, default_max_tokens=args.default_max_tokens)
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off",
            timeout_keep_alive=5,  # idle keep-alive connections are closed after 5 s
            limit_concurrency=MAX_CONNECTIONS,  # beyond this, new requests get 503 instead of exhausting the process
            timeout_graceful_shutdown=10,  # on SIGTERM, open streams get 10 s to finish
        )  # fmt: skip
        server = uvicorn.Server(config)
        port = sock.getsockname()[1]
        url = f"http://{args.host}:{port}/v1"
        # uvicorn handles SIGINT/SIGTERM while serving, then re-raises the signal: StopSignals absorbs it, so the
        # models' clients are closed below (withdrawn from the DHT) instead of the process dying mid-way.
        asyncio.run(_serve(server, sock, url, [m.id for m in service.models], args.ready_file, api_key is not None))
    finally:
        service.close()
        sock.close()
    print("hivegen api: stopped", flush=True)
    return 0


async def _serve(server: Any, sock: socket.socket, url: str, models: list[str], ready: str | None, keyed: bool) -> None:
    async def announce() -> None:
        while not server.started:
            await asyncio.sleep(0.05)
        print(f"hivegen api: serving {', '.join(models)} at {url}" + (" (API key required)" if keyed else ""),
              flush=True)  # fmt: skip
        if ready:
            write_json_atomic(Path(ready), {"url": url, "models": models, "pid": os.getpid()})

    waiter = asyncio.create_task(announce())
    try:
        await server.serve(sockets=[sock])
    finally:
        waiter.cancel()


def add_commands(commands: Any) -> None:
    """`hivegen api serve` and its options."""
    api = commands.add_parser("api", help="the OpenAI-compatible HTTP API")
    api = api.add_subparsers(dest="api_cmd", required=True)
    serve = api.add_parser(
        "serve",
        help="serve /v1/chat/completions, /v1/completions and /v1/models over the swarm",
        description="An OpenAI-compatible HTTP server: point the `openai` package (base_url=http://HOST:PORT/v1) or "
        "curl at it. Every answer is recorded in the store; the same seeded or greedy request is answered from "
        "it at once, for free (header x-hivegen-replayed: true).",
    )
    serve.add_argument(
        "--model", action="append", required=True, metavar="NAME_OR_DIR",
        help="checkpoint directory or prepared demo model name; repeat to serve several",
    )  # fmt: skip
    add_peers_argument(serve, required=False, help="DHT multiaddrs of the swarm to join")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind (default 8000; 0: any free port)")
    serve.add_argument("--store", help=f"store of recorded generations {STORE_DEFAULT}")
    serve.add_argument("--identity", help=f"key file of the account that pays nodes {IDENTITY_DEFAULT}")
    add_coordinator_argument(serve, "HOST:PORT of the ledger: pays nodes and hears reports of lying ones")
    serve.add_argument(
        "--api-key", help=f"require `Authorization: Bearer KEY` on /v1 (default: ${API_KEY_ENV}; none: open)"
    )
    serve.add_argument("--verify", help='re-execution of node work: "off", a rate in [0, 1], or "all"')
    serve.add_argument("--max-concurrency", type=int, default=16, help="generations run at once (default 16)")
    serve.add_argument(
        "--default-max-tokens", type=int, default=512, help="chat answer length when a request sets none"
    )
    serve.add_argument("--ready-file", help="write JSON (url, models, pid) here once serving")
    serve.set_defaults(handler=cmd_api_serve)
