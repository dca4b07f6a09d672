"""A node: loads a span of blocks, serves it over gRPC, announces it in the DHT while it lives."""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import hivemind
import torch
from hivemind.utils import get_dht_time

from hivegen import __version__
from hivegen.credits.identity import Identity, default_node_identity_path
from hivegen.credits.outbox import ReceiptOutbox
from hivegen.dht import Announcer, ModelInfo, SpanRecord, fetch_spans, node_id, start_dht, visible_maddrs
from hivegen.errors import ModelLoadError
from hivegen.files import write_json_atomic
from hivegen.model.checkpoint import ModelCheckpoint
from hivegen.model.demo import hivegen_home
from hivegen.model.skeleton import ModelSkeleton
from hivegen.model.span import BlockSpan
from hivegen.model.support import require_servable
from hivegen.node.aio_server import AioServer
from hivegen.node.billing import Billing
from hivegen.node.defaults import (
    CUDA_CACHE_SHARE,
    DEFAULT_BATCH_WAIT,
    DEFAULT_CACHE_TOKENS,
    DEFAULT_MAX_ROWS,
    DEFAULT_PREFILL_CHUNK,
)
from hivegen.node.limits import LOOPBACK, ClientQuotas, parse_networks
from hivegen.node.metrics import NodeMetrics
from hivegen.node.placement import Move, block_capacities, choose_span, should_move
from hivegen.node.servicer import NodeServicer, StreamLimits
from hivegen.node.sessions import SessionManager
from hivegen.proto import node_pb2_grpc
from hivegen.proto.options import DEFAULT_MAX_MESSAGE_BYTES, grpc_options
from hivegen.proto.tensors import DTYPE_NAMES, dtype_from_name

logger = logging.getLogger(__name__)
OUTBOX_FILE = "receipts.sqlite"
MEASURE_SECONDS = 0.5  # a node times decode steps this long when it starts (the fastest one is its speed)
MEASURE_MAX_STEPS = 256
MEASURE_SESSION_STEPS = 16  # decode steps per dummy session (then a new one: positions stay low)
WEIGHTS_SHARE = 0.5  # placed automatically without --memory: this share of free device memory (RAM on CPU) for weights


@dataclass
class NodeConfig:
    """Everything `hivegen node serve` takes."""

    model: Path  # Hugging Face checkpoint directory (safetensors)
    start: int | None = None  # first block served; None: placed where the swarm is weakest (see placement.py)
    end: int | None = None  # one past the last block served
    num_blocks: int | None = None  # placed automatically: how many blocks (default: as many as `memory` holds)
    memory: int | None = None  # placed automatically: bytes the blocks' weights may take (default: see WEIGHTS_SHARE)
    throughput: float | None = None  # steps/s of the span to advertise; None: timed at start (measure_throughput)
    rebalance_interval: float = 60.0  # placed automatically: seconds between checks for a better span (0: never)
    drain_seconds: float = 30.0  # moving: how long sessions may finish before the rest are closed (they fail over)
    initial_peers: list[str] = field(default_factory=list)  # DHT multiaddrs to join; empty starts a new swarm
    host: str = "127.0.0.1"  # address the gRPC server binds and announces
    port: int = 0  # gRPC port; 0 picks a free one
    dht_port: int = 0  # DHT port; 0 picks a free one
    device: str = "cpu"  # torch device of the blocks
    dtype: str | None = None  # float32 / bfloat16 / float16; default: the checkpoint's own dtype
    attn_implementation: str | None = None  # sdpa, eager, flex_attention, ...; None: transformers' pick for the model
    cache_tokens: int | None = None  # KV-cache budget in token positions over all sessions (batch x max_length)
    cache_memory: int | None = None  # or in bytes; neither: DEFAULT_CACHE_TOKENS on CPU, CUDA_CACHE_SHARE on a GPU
    max_batch_rows: int = DEFAULT_MAX_ROWS  # the most sequences one forward runs (batched decode steps)
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK  # prompt positions per forward: longer prompts run in chunks
    batch_wait: float | None = DEFAULT_BATCH_WAIT  # seconds a decode step may wait for others' due steps; None: auto
    announce_ttl: float = 30.0  # seconds a DHT record lives unless refreshed
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # largest gRPC message accepted or sent
    max_workers: int = 64  # threads validating and signing steps (they wait while the scheduler runs forwards)
    admission_workers: int = 8  # threads opening sessions (which may wait on the ledger) and settling them
    open_timeout: float = 10.0  # seconds a new stream has to send `open` before it is closed
    session_idle_timeout: float = 60.0  # seconds a session may go without a message before it is closed and freed
    max_sessions_per_client: int = 16  # open sessions one client (account, else address) may hold
    max_cache_tokens_per_client: int | None = None  # cache tokens one client may reserve; None: half of cache_tokens
    unlimited_networks: tuple[str, ...] = LOOPBACK  # client networks the per-client limits spare (CIDR)
    ready_file: Path | None = None  # written as JSON once the node serves and is announced
    metrics_port: int | None = None  # serve Prometheus metrics on host:port (0: any free port); None: off
    coordinator: str | None = None  # HOST:PORT of the ledger; set to charge credits for the work served
    identity: Path | None = None  # the node's key (default: $HIVEGEN_HOME/node/identity, not the client's)
    data: Path | None = None  # where unsubmitted receipts are kept (default: $HIVEGEN_HOME/node)
    unpaid_steps: int = 1  # steps a session's receipts may lag behind the work served
    unpaid_credits: int = 1000  # credits a known client may owe while the ledger is unreachable
    submit_interval: float = 1.0  # seconds between receipt submissions to the ledger


class NodeServer:
    """Owns the DHT peer, the loaded span, the gRPC server and the announcer of one node."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.dht: hivemind.DHT | None = None
        self.server: AioServer | None = None
        self.servicer: NodeServicer | None = None
        self.announcer: Announcer | None = None
        self.address = ""
        self.throughput = 0.0
        self.billing: Billing | None = None
        self.identity: Identity | None = None
        self.identity_path: Path | None = None
        self.metrics: NodeMetrics | None = None
        self.metrics_url = ""
        self.start_block = self.end_block = 0  # the span served now (it changes when the node moves)
        self.placed = False  # chosen by the node itself: it may move
        self.moves: list[Move] = []
        self._stopped = threading.Event()
        self._serving = threading.Lock()  # a move and a stop never overlap
        self._rebalancer: threading.Thread | None = None

    def start(self) -> None:
        cfg = self.config
        checkpoint = ModelCheckpoint.open(cfg.model)
        # A model hivegen cannot serve is refused now, in one line, before any weight is read or peer joined.
        support = require_servable(cfg.model, cfg.attn_implementation)
        self.checkpoint, self.model_type = checkpoint, support.model_type
        self.attn_implementation = support.attn_implementation
        self.dtype = dtype_from_name(cfg.dtype) if cfg.dtype else checkpoint.default_dtype(cfg.device)
        self.model_key = checkpoint.model_key
        length = self._placed_length() if cfg.start is None else 0  # before joining: a refusal costs nothing
        # The DHT forks a process: start it before any gRPC object exists.
        self.dht = start_dht(cfg.initial_peers or None, host=cfg.host, port=cfg.dht_port)
        # The node's key: it signs every answer and owns its DHT records; with a coordinator, it is paid too.
        self.identity_path = cfg.identity or default_node_identity_path()
        self.identity = Identity.load_or_create(self.identity_path)
        if cfg.start is None or cfg.end is None:
            records = fetch_spans(self.dht, self.model_key, checkpoint.num_blocks).values()
            self.start_block, self.end_block = choose_span(block_capacities(records, checkpoint.num_blocks), length)
            self.placed = True
            logger.info(
                "placed on blocks %d:%d of %d (%d blocks, where the swarm serves the least)",
                self.start_block, self.end_block, checkpoint.num_blocks, length,
            )  # fmt: skip
        else:
            self.start_block, self.end_block = cfg.start, cfg.end
        self._serve()
        if self.placed and cfg.rebalance_interval > 0:
            self._rebalancer = threading.Thread(target=self._rebalance, name="hivegen-rebalance", daemon=True)
            self._rebalancer.start()

    def _placed_length(self) -> int:
        """How many blocks a node placed automatically serves: --num-blocks, else as many as its memory holds."""
        cfg, checkpoint = self.config, self.checkpoint
        total = checkpoint.num_blocks
        if cfg.num_blocks is not None:
            if not 1 <= cfg.num_blocks <= total:
                raise ModelLoadError(f"--num-blocks {cfg.num_blocks}: the model has {total} blocks (1..{total})")
            return cfg.num_blocks
        skeleton = ModelSkeleton.build(checkpoint, cfg.attn_implementation, self.dtype)
        per_block = max(skeleton.block_parameters()) * torch.empty((), dtype=self.dtype).element_size()
        budget = cfg.memory if cfg.memory is not None else int(WEIGHTS_SHARE * free_memory(cfg.device))
        if budget < per_block:
            raise ModelLoadError(
                f"one block of this model needs {size_text(per_block)} as {DTYPE_NAMES[self.dtype]}, more than the "
                f"{size_text(budget)} {'--memory gives' if cfg.memory is not None else 'free'}; "
                "pass --memory SIZE or --num-blocks N"
            )
        return min(total, budget // per_block)

    def _serve(self) -> None:
        """Load the current span and serve it: sessions, gRPC server, announcer, metrics, billing."""
        cfg, checkpoint = self.config, self.checkpoint
        assert self.dht is not None and self.identity is not None
        logger.info(
            "loading blocks %d:%d of %s (%s) as %s, %s attention", self.start_block, self.end_block, cfg.model,
            self.model_type, DTYPE_NAMES[self.dtype], self.attn_implementation,
        )  # fmt: skip
        span = BlockSpan(checkpoint, self.start_block, self.end_block, self.dtype, cfg.device, cfg.attn_implementation)
        if cfg.coordinator:
            self.billing = self._billing(span)
        self.throughput = cfg.throughput if cfg.throughput is not None else measure_throughput(span)
        self.sessions = SessionManager(
            span, self.model_key, self._cache_tokens(span), self.billing, cache_bytes=self._cache_bytes(span),
            max_batch_rows=cfg.max_batch_rows, prefill_chunk=cfg.prefill_chunk, batch_wait=cfg.batch_wait,
        )  # fmt: skip
        client_tokens = cfg.max_cache_tokens_per_client
        if client_tokens is None:
            client_tokens = max(1, self.sessions.cache_tokens_total // 2)
        servicer = NodeServicer(
            self.sessions,
            self.node_id(),
            checkpoint.name,
            checkpoint.num_blocks,
            identity=self.identity,
            quotas=ClientQuotas(cfg.max_sessions_per_client, client_tokens),
            limits=StreamLimits(cfg.open_timeout, cfg.session_idle_timeout, parse_networks(cfg.unlimited_networks)),
            step_workers=cfg.max_workers,
            admission_workers=cfg.admission_workers,
        )
        self.servicer = servicer
        # The event loop and every gRPC object are created now, in the server's thread: after the DHT forked.
        self.server = AioServer(
            f"{cfg.host}:{cfg.port}",
            lambda server: node_pb2_grpc.add_NodeServicer_to_server(servicer, server),
            options=grpc_options(cfg.max_message_bytes),
        )
        port = self.server.start()
        self.address = f"{cfg.host}:{port}"
        model = ModelInfo(self.model_key, checkpoint.name, checkpoint.num_blocks)
        self.announcer = Announcer(
            self.dht, self.model_key, self.record, self.identity, ttl=cfg.announce_ttl, model=model
        )
        self.announcer.start()
        self.sessions.on_change = self.announcer.announce_now  # free cache changed: re-announce it (debounced)
        if cfg.metrics_port is not None:
            self.metrics = NodeMetrics(self.sessions)
            self.metrics_url = f"http://{cfg.host}:{self.metrics.start(cfg.host, cfg.metrics_port)}/metrics"
        if self.billing is not None:
            self.billing.start()
        if cfg.ready_file is not None:
            self._write_ready_file(cfg.ready_file)
        logger.info(
            "serving blocks %d:%d of %s at %s (%.1f steps/s)",
            self.start_block,
            self.end_block,
            self.model_key,
            self.address,
            self.throughput,
        )

    def _unserve(self) -> None:
        """Withdraw the span from the DHT, finish in-flight steps briefly, stop serving it (the DHT peer stays)."""
        if self.announcer is not None:
            self.announcer.stop(withdraw=True)
            self.announcer = None
        if self.server is not None:
            self.server.stop(grace=2.0)
            self.server = None
        if self.servicer is not None:
            self.servicer.close()
            self.servicer = None
        if (sessions := getattr(self, "sessions", None)) is not None:
            sessions.stop()
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
        if self.billing is not None:
            self.billing.stop()  # one last submission; what is left waits in the outbox
            self.billing = None

    def _rebalance(self) -> None:
        """Every rebalance_interval (jittered, so nodes with the same view do not decide at once), move to a better
        span when one raises the swarm's bottleneck by a clear margin."""
        cfg = self.config
        while not self._stopped.wait(cfg.rebalance_interval * random.uniform(0.5, 1.5)):
            try:
                assert self.dht is not None
                records = fetch_spans(self.dht, self.model_key, self.checkpoint.num_blocks)
                me = self.record()
                records[me.node_id] = me
                move = should_move(list(records.values()), self.checkpoint.num_blocks, me)
                if move is not None:
                    self.move(move)
            except Exception:
                logger.exception("could not check for a better span")

    def move(self, move: Move) -> None:
        """Serve `move`'s span instead: refuse new sessions and withdraw, let open sessions finish for up to
        drain_seconds (the rest are closed and fail over to other nodes), then load and announce the new span."""
        with self._serving:
            if self._stopped.is_set():
                return
            logger.warning(
                "moving from blocks %d:%d to %d:%d: the swarm's weakest block goes from %.1f to %.1f steps/s",
                self.start_block, self.end_block, move.start, move.end, move.now, move.after,
            )  # fmt: skip
            assert self.servicer is not None and self.announcer is not None
            self.servicer.draining = f"this node is moving to blocks {move.start}:{move.end}; use another node"
            self.announcer.stop(withdraw=True)  # routers stop choosing it now
            self.announcer = None
            deadline = time.monotonic() + self.config.drain_seconds
            while self.sessions.active_sessions and time.monotonic() < deadline and not self._stopped.is_set():
                time.sleep(0.2)
            self._unserve()
            if self._stopped.is_set():
                return
            self.start_block, self.end_block = move.start, move.end
            self.moves.append(move)
            self._serve()

    def node_id(self) -> str:
        """The node's id and DHT subkey, "<peer id>@<public key>": its identity owns (and signs) the records."""
        assert self.dht is not None and self.identity is not None
        return node_id(self.dht, self.identity.public_key_hex)

    def record(self) -> SpanRecord:
        return SpanRecord(
            node_id=self.node_id(),
            address=self.address,
            start=self.start_block,
            end=self.end_block,
            throughput=self.throughput,
            cache_tokens_free=self.sessions.cache_tokens_free,
            dtype=DTYPE_NAMES[self.sessions.span.dtype],
            version=__version__,
            active_sessions=self.sessions.active_sessions,
            cache_tokens_total=self.sessions.cache_tokens_total,
            updated_at=get_dht_time(),
        )

    def join_addresses(self) -> list[str]:
        return visible_maddrs(self.dht) if self.dht is not None else []

    def wait(self) -> None:
        self._stopped.wait()

    def stop(self) -> None:
        """Withdraw from the DHT, finish in-flight steps briefly, shut everything down. Idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        with self._serving:
            self._unserve()
            if self.dht is not None:
                self.dht.shutdown()

    def _cache_tokens(self, span: BlockSpan) -> int:
        return self.config.cache_tokens if self.config.cache_tokens is not None else DEFAULT_CACHE_TOKENS

    def _cache_bytes(self, span: BlockSpan) -> int | None:
        """The budget in bytes when one was given, or on a GPU: a share of the memory free after the weights."""
        cfg = self.config
        if cfg.cache_memory is not None or cfg.cache_tokens is not None or span.device.type != "cuda":
            return cfg.cache_memory
        return int(free_memory(span.device) * CUDA_CACHE_SHARE)

    def _billing(self, span: BlockSpan) -> Billing:
        cfg = self.config
        assert cfg.coordinator and self.identity is not None
        identity = self.identity
        data = cfg.data if cfg.data is not None else hivegen_home() / "node"
        data.mkdir(parents=True, exist_ok=True)
        outbox = ReceiptOutbox(data / OUTBOX_FILE)
        logger.info("charging credits to account %s; ledger at %s; receipts kept in %s", identity.account,
                    cfg.coordinator, data / OUTBOX_FILE)  # fmt: skip
        return Billing(
            identity,
            cfg.coordinator,
            outbox,
            self.model_key,
            span.skeleton.block_parameters(),
            unpaid_steps=cfg.unpaid_steps,
            unpaid_credits=cfg.unpaid_credits,
            submit_interval=cfg.submit_interval,
        )

    def _write_ready_file(self, path: Path) -> None:
        data = {
            "pid": os.getpid(),
            "node_id": self.node_id() if self.dht and self.identity else "",
            "address": self.address,
            "blocks": [self.start_block, self.end_block],
            "moves": len(self.moves),
            "model_key": self.model_key,
            "initial_peers": self.join_addresses(),
            "account": self.billing.account if self.billing is not None else "",
            "metrics_url": self.metrics_url,
        }
        write_json_atomic(path, data)


def measure_throughput(
    span: BlockSpan, steps: int = 8, seconds: float = MEASURE_SECONDS, max_steps: int = MEASURE_MAX_STEPS
) -> float:
    """Decode steps per second of the whole span at batch 1, from the fastest step of short dummy sessions (at
    least `steps` steps, then more until `seconds` have passed or `max_steps` ran): a node measures itself while it
    starts, often beside other processes starting on the same cores, and a mean over that contention, or a few
    steps that all fell into it, would advertise it as slower than it is for the life of its record. Each dummy
    session runs MEASURE_SESSION_STEPS steps, so positions stay within any model's context."""
    prompt = 8
    hidden = torch.zeros((1, prompt, span.hidden_size), dtype=span.dtype)
    fastest = float("inf")
    began_all = time.perf_counter()
    cache = span.new_cache()
    for i in range(max(steps, max_steps)):
        if i >= steps and time.perf_counter() - began_all >= seconds:
            break
        past = i % MEASURE_SESSION_STEPS
        if past == 0:  # a new dummy session: prefill its prompt
            cache = span.new_cache()
            span.forward(hidden, torch.arange(prompt)[None], torch.ones((1, prompt), dtype=torch.int64), cache)
        mask = torch.ones((1, prompt + past + 1), dtype=torch.int64)
        began = time.perf_counter()
        span.forward(hidden[:, :1], torch.tensor([[prompt + past]]), mask, cache)
        fastest = min(fastest, time.perf_counter() - began)
    return 1.0 / max(fastest, 1e-6)


def free_memory(device: str | torch.device) -> int:
    """Bytes free on `device`: the GPU's free memory, or the machine's available RAM on CPU."""
    if str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def size_text(size: int) -> str:
    """Bytes for people: 1.5 GiB, 320 KiB, 12 bytes."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:,.1f} {unit}".replace(".0 ", " ")
    return f"{size} bytes"
