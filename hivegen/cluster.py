"""A local multi-process cluster: a DHT bootstrap peer here, N `hivegen node serve` processes on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hivemind

from hivegen.coordinator.server import Coordinator, CoordinatorConfig
from hivegen.dht import fetch_spans, missing_blocks, start_dht, visible_maddrs
from hivegen.errors import HivegenError
from hivegen.model.checkpoint import ModelCheckpoint
from hivegen.peers import child_env
from hivegen.prefork import ForkedProcess, spawn_node_process, warm_up
from hivegen.process import PARENT_PID_ENV

logger = logging.getLogger(__name__)
NodeProcess = subprocess.Popen[bytes] | ForkedProcess


class ClusterError(HivegenError):
    """A cluster node failed to start or the blocks never became reachable."""


def split_blocks(num_blocks: int, nodes: int) -> list[tuple[int, int]]:
    """Split [0, num_blocks) into `nodes` contiguous spans whose sizes differ by at most one."""
    if not 1 <= nodes <= num_blocks:
        raise ClusterError(f"cannot split {num_blocks} blocks over {nodes} nodes; use 1..{num_blocks} nodes")
    base, extra = divmod(num_blocks, nodes)
    spans, start = [], 0
    for i in range(nodes):
        end = start + base + (1 if i < extra else 0)
        spans.append((start, end))
        start = end
    return spans


@dataclass
class ClusterNode:
    """One node process of the cluster."""

    blocks: tuple[int, int]
    process: NodeProcess
    ready_file: Path
    log_file: Path
    home: Path  # its identity and receipt outbox, kept across restarts
    extra_args: list[str]
    launcher: list[str] | None = None  # the command that runs `hivegen` (default: this Python, -m hivegen)
    address: str = ""
    node_id: str = ""
    account: str = ""  # the credit account it is paid to; empty without a coordinator

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class ClusterApi:
    """The cluster's `hivegen api serve` process."""

    process: subprocess.Popen[bytes]
    ready_file: Path
    log_file: Path
    url: str = ""  # http://HOST:PORT/v1 once ready

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class LocalCluster:
    """Starts, watches and stops a DHT bootstrap peer plus one process per span."""

    def __init__(
        self,
        model: str | Path,
        nodes: int = 3,
        spans: list[tuple[int, int]] | None = None,
        host: str = "127.0.0.1",
        dtype: str | None = None,
        node_threads: int | None = None,
        work_dir: str | Path | None = None,
        node_args: list[str] | None = None,
        startup_timeout: float = 300.0,
        coordinator: bool = False,
        starter_grant: int = 10_000,
        coordinator_address: str | None = None,
        grant_proof_bits: int = 8,
        initial_peers: list[str] | None = None,
        api_port: int | None = None,
        api_args: list[str] | None = None,
    ) -> None:
        """`coordinator=True` runs a coordinator (DHT bootstrap, ledger, status page) in this process;
        `coordinator_address` instead points the nodes at one running elsewhere. Either way, each node
        gets its own identity and charges credits. A local cluster's ledger grants `starter_grant` credits
        for an easy proof of work (`grant_proof_bits`), so a demo starts in seconds. `initial_peers` joins an
        existing swarm (a coordinator elsewhere must see the nodes' records to pay them). `api_port` (0: any free
        port) also runs the OpenAI-compatible API (`hivegen api serve`, with `api_args`) once every block is up."""
        if coordinator and coordinator_address:
            raise ValueError("pass coordinator=True (run one here) or coordinator_address (use one), not both")
        self.model = Path(model)
        checkpoint = ModelCheckpoint.open(self.model)
        self.model_key = checkpoint.model_key
        self.num_blocks = checkpoint.num_blocks
        self.spans = spans if spans is not None else split_blocks(self.num_blocks, nodes)
        self.host = host
        self.dtype = dtype
        self.node_threads = node_threads or max(1, (os.cpu_count() or 1) // max(1, len(self.spans)))
        # Without a work_dir, a temporary one (identities, ledger, logs, receipts) removed by stop() unless
        # start-up failed (its logs say why).
        self.temporary = not work_dir
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="hivegen-cluster-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.node_args = node_args or []
        self.startup_timeout = startup_timeout
        self.dht: hivemind.DHT | None = None
        # With a coordinator, its DHT peer is the bootstrap and its ledger and status page run here too.
        self.with_coordinator = coordinator
        self.starter_grant = starter_grant
        self.grant_proof_bits = grant_proof_bits
        self.join = list(initial_peers or [])
        self.coordinator: Coordinator | None = None
        self.coordinator_address = coordinator_address
        self.nodes: list[ClusterNode] = []
        self.api_port = api_port
        self.api_args = list(api_args or [])
        self.api: ClusterApi | None = None
        self.started_at = 0.0
        self.ready_seconds = 0.0

    @property
    def initial_peers(self) -> list[str]:
        return visible_maddrs(self.dht) if self.dht is not None else []

    def start(self) -> LocalCluster:
        """Start every process and return once every block is announced; on failure stop them all."""
        self.started_at = time.monotonic()
        try:
            warm_up()  # the node helper's imports run while the DHT starts
            if self.with_coordinator:
                self.coordinator = Coordinator(self._coordinator_config())
                self.coordinator.start()
                self.coordinator_address = self.coordinator.address
                self.dht = self.coordinator.dht
            else:
                self.dht = start_dht(self.join or None, host=self.host)
            for start, end in self.spans:
                self.nodes.append(self.spawn_node(start, end))
            self.wait_ready(covered=bool(self.spans))  # an empty cluster (spans=[]) is a DHT that nodes join later
            if self.api_port is not None:
                self.start_api(self.api_port, self.api_args)
        except BaseException:
            self.temporary = False  # keep the logs that say what went wrong
            self.stop()
            raise
        self.ready_seconds = time.monotonic() - self.started_at
        return self

    def start_api(self, port: int = 0, extra_args: list[str] | None = None) -> ClusterApi:
        """Run `hivegen api serve` for the cluster's model on `port` (it becomes `api`, stopped with the cluster);
        return once it serves. It pays nodes with the default identity (yours) and records answers in the default
        store, unless `extra_args` say otherwise."""
        if self.api is not None and self.api.process.poll() is None:
            raise ClusterError(f"the cluster's API server (pid {self.api.process.pid}) is running; stop it first")
        home = self.work_dir / "api"
        home.mkdir(parents=True, exist_ok=True)
        ready, log = home / "ready.json", home / "api.log"
        ready.unlink(missing_ok=True)
        cmd = [
            sys.executable, "-m", "hivegen", "api", "serve", "--model", str(self.model), "--host", self.host,
            "--port", str(port), "--ready-file", str(ready), "--initial-peers", *self.initial_peers,
            *(["--coordinator", self.coordinator_address] if self.coordinator_address else []), *(extra_args or []),
        ]  # fmt: skip
        env = child_env(**{PARENT_PID_ENV: str(os.getpid())})
        with open(log, "ab") as log_fh:
            process = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        api = self.api = ClusterApi(process, ready, log)
        deadline = time.monotonic() + self.startup_timeout
        while not ready.exists():
            if process.poll() is not None:
                raise ClusterError(f"the API server exited with code {process.returncode}; its log ({log}) ends "
                                   f"with:\n{api.log_tail()}")  # fmt: skip
            if time.monotonic() > deadline:
                process.kill()
                raise ClusterError(f"the API server did not start in {self.startup_timeout:.0f} s; see {log}")
            time.sleep(0.2)
        api.url = json.loads(ready.read_text())["url"]
        return api

    def spawn_node(
        self,
        start: int | None,
        end: int | None,
        extra_args: list[str] | None = None,
        home: Path | None = None,
        launcher: list[str] | None = None,
    ) -> ClusterNode:
        """Start a node process for blocks [start, end), or placed by itself where both are None (add
        --num-blocks or --memory to `extra_args`), not yet added to `nodes`; `home` reuses a node's
        identity and receipts, as a restart after a crash would; `launcher` replaces `python -m hivegen` (tests
        run nodes that misbehave on purpose this way)."""
        index = len(self.nodes)
        home = home if home is not None else self.work_dir / f"node-{index}"
        home.mkdir(parents=True, exist_ok=True)
        ready = home / "ready.json"
        log = home / "node.log"
        ready.unlink(missing_ok=True)
        extra_args = list(extra_args or [])
        args = [
            "node", "serve",
            "--model", str(self.model), *(["--blocks", f"{start}:{end}"] if start is not None else []),
            "--host", self.host,
            "--ready-file", str(ready), "--num-threads", str(self.node_threads),
            "--initial-peers", *self.initial_peers, *self.node_args, *extra_args,
        ]  # fmt: skip
        if self.dtype:
            args += ["--dtype", self.dtype]
        args += ["--identity", str(home / "identity")]  # each node its own key: it signs answers and DHT records
        if self.coordinator_address:
            args += ["--coordinator", self.coordinator_address, "--data", str(home)]
        env = child_env(**{PARENT_PID_ENV: str(os.getpid())})
        process: NodeProcess | None = None
        if launcher is None:  # forked from a process that already imported everything: seconds sooner
            process = spawn_node_process(args, env, str(log))
        if process is None:
            with open(log, "ab") as log_fh:
                process = subprocess.Popen([*(launcher or [sys.executable, "-m", "hivegen"]), *args], stdout=log_fh,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)  # fmt: skip
        return ClusterNode((start or 0, end or 0), process, ready, log, home, extra_args, launcher)

    def add_node(
        self,
        start: int | None,
        end: int | None,
        extra_args: list[str] | None = None,
        launcher: list[str] | None = None,
        home: Path | None = None,
    ) -> ClusterNode:
        """Start one more node for blocks [start, end) (None, None: placed by itself) in the running cluster;
        return once it is announced.
        `home` is its directory (identity, receipts; default: a new one under the work dir)."""
        node = self.spawn_node(start, end, extra_args=extra_args, launcher=launcher, home=home)
        self.nodes.append(node)
        try:
            self.wait_ready([node], covered=False)
            assert self.dht is not None
            deadline = time.monotonic() + self.startup_timeout
            while node.node_id not in fetch_spans(self.dht, self.model_key, self.num_blocks):
                self._check_deadline(deadline, [node])
                time.sleep(0.2)
        except BaseException:
            self.stop_node(len(self.nodes) - 1, signal.SIGKILL)
            raise
        return node

    def restart_node(self, index: int) -> ClusterNode:
        """Start node `index` again (after it stopped or was killed) with the same identity, receipts and blocks."""
        old = self.nodes[index]
        if old.process.poll() is None:
            raise ClusterError(f"node {index} (pid {old.pid}) is still running; stop it first")
        node = self.spawn_node(*old.blocks, extra_args=old.extra_args, home=old.home, launcher=old.launcher)
        self.nodes[index] = node
        self.wait_ready([node])
        return node

    def wait_ready(self, nodes: list[ClusterNode] | None = None, covered: bool = True) -> None:
        """Wait until the nodes wrote their ready files and (with `covered`) the DHT shows every block covered."""
        deadline = time.monotonic() + self.startup_timeout
        pending = list(nodes if nodes is not None else self.nodes)
        while pending:
            for node in list(pending):
                if node.process.poll() is not None:
                    raise ClusterError(
                        f"node for blocks {node.blocks[0]}:{node.blocks[1]} exited with code "
                        f"{node.process.returncode}; its log ({node.log_file}) ends with:\n{node.log_tail()}"
                    )
                if node.ready_file.exists():
                    info = json.loads(node.ready_file.read_text())
                    node.address, node.node_id = info["address"], info["node_id"]
                    node.account = info.get("account", "")
                    node.blocks = (int(info["blocks"][0]), int(info["blocks"][1]))
                    pending.remove(node)
            self._check_deadline(deadline, pending)
            time.sleep(0.2)
        assert self.dht is not None
        # Every node's own record, not only every block: a client routing before a node's record shows would not
        # see it (e.g. take two hops where one node serves all blocks).
        waiting = {n.node_id for n in (nodes if nodes is not None else self.nodes)}
        while True:
            found = fetch_spans(self.dht, self.model_key, self.num_blocks)
            missing = missing_blocks(found.values(), self.num_blocks) if covered else []
            unseen = waiting - set(found)
            if not missing and not unseen:
                return
            self._check_deadline(deadline, [n for n in self.nodes if n.node_id in unseen], missing)
            time.sleep(0.2)

    def _check_deadline(self, deadline: float, pending: list[ClusterNode], missing: list[int] | None = None) -> None:
        if time.monotonic() < deadline:
            return
        what = f"nodes {[n.blocks for n in pending]} never became ready" if pending else f"blocks {missing} unannounced"
        raise ClusterError(f"cluster not ready after {self.startup_timeout:.0f} s: {what}; see logs in {self.work_dir}")

    def _coordinator_config(self) -> CoordinatorConfig:
        return CoordinatorConfig(
            data=self.work_dir / "coordinator",
            host=self.host,
            starter_grant=self.starter_grant,
            grant_proof_bits=self.grant_proof_bits,
        )

    def info(self) -> dict[str, Any]:
        """The ready-file contents: how to join, each node's pid, blocks and address, and the coordinator."""
        extra: dict[str, Any] = {}
        if self.coordinator_address:
            extra["coordinator"] = self.coordinator_address
        if self.coordinator is not None:
            extra["status_url"] = self.coordinator.status_url
        if self.api is not None:
            extra["api_url"] = self.api.url
        return {
            **extra,
            "initial_peers": self.initial_peers,
            "model_key": self.model_key,
            "nodes": [
                {
                    "pid": n.pid,
                    "blocks": list(n.blocks),
                    "address": n.address,
                    "node_id": n.node_id,
                    "account": n.account,
                }
                for n in self.nodes
            ],
        }

    def stop_node(self, index: int, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Stop one node: SIGTERM lets it withdraw from the DHT; SIGKILL simulates a crash."""
        node = self.nodes[index]
        if node.process.poll() is None:
            node.process.send_signal(sig)
            try:
                node.process.wait(timeout)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()

    def stop_api(self) -> None:
        """Stop the cluster's API server, if it runs."""
        if self.api is not None:
            _terminate(self.api.process, "the API server")
            self.api = None

    def stop(self) -> None:
        """Stop the API server, every node (SIGTERM, then SIGKILL after a grace period) and the bootstrap peer."""
        self.stop_api()
        for node in self.nodes:
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15.0
        for node in self.nodes:
            try:
                node.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("node pid %d ignored SIGTERM; killing it", node.pid)
                node.process.kill()
                node.process.wait()
        if self.coordinator is not None:
            self.coordinator.stop()  # shuts its DHT peer down too
            self.coordinator = None
        elif self.dht is not None:
            self.dht.shutdown()
        self.dht = None
        if self.temporary:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _terminate(process: subprocess.Popen[bytes], what: str, grace: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            logger.warning("%s (pid %d) ignored SIGTERM; killing it", what, process.pid)
            process.kill()
            process.wait()
