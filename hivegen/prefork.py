"""Warm node starts for a local cluster: one process pays the imports (torch, transformers, hivemind: ~9 s of CPU)
once, then forks a ready `hivegen node serve` for each node the cluster starts.

`python -m hivegen.prefork` is that process. It reads one JSON request per line on stdin (`argv`, `env`, `cwd`,
`log`), forks, and answers `{"pid": N}`; when a child ends it writes `{"exited": N, "code": C}` (C < 0: killed by
signal -C, as `subprocess` says it). Each child gets the request's environment, but what modules read at import
(torch, transformers, hivemind) came from the prefork process's own, at its start. It stays single-threaded in
Python and runs no torch operation, so a fork copies nothing half-done. It exits when stdin closes or its parent
dies; its children then get SIGTERM (each ties itself to its parent, as a node started by `cluster up` does) and
withdraw from the DHT.

`Preforker` is the parent's side, and `ForkedProcess` gives a forked node the part of `subprocess.Popen` that
`LocalCluster` uses (pid, poll, wait, send_signal, kill, returncode).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Any

logger = logging.getLogger(__name__)
PRELOAD = ("hivegen.cli", "hivegen.node.cli", "hivegen.node.server")  # what every node imports
DISABLE_ENV = "HIVEGEN_NO_PREFORK"  # set to 1: start every cluster node as a fresh Python process
READY_TIMEOUT = 300.0  # seconds the imports may take on a loaded machine


class PreforkError(RuntimeError):
    """The prefork process could not start or answer."""


class ForkedProcess:
    """A node forked by the prefork process, seen through the `subprocess.Popen` methods LocalCluster uses."""

    def __init__(self, owner: Preforker, pid: int) -> None:
        self.owner = owner
        self.pid = pid
        self.args = "hivegen node serve (forked)"

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def poll(self) -> int | None:
        code = self.owner.exit_code(self.pid)
        if code is None and not self.owner.running:  # the prefork process is gone: so are its children
            return self.owner.exit_code(self.pid, default=-signal.SIGTERM)
        return code

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            self.owner.wait_exit(0.05)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # not yet reaped, so the pid is still this node's
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Preforker:
    """The parent's side of one `python -m hivegen.prefork` process: started on first use, shared by every
    LocalCluster of this process, stopped at exit."""

    _shared: Preforker | None = None
    _shared_lock = threading.Lock()

    def __init__(self) -> None:
        self._exits: dict[int, int] = {}
        self._pids: list[int] = []
        self._ready = False
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._started: list[subprocess.Popen[bytes] | BaseException] = []
        # The process is started by the thread that reads it, which lives as long as it does: the kernel's
        # parent-death signal follows the thread that forked, not the process.
        self._reader = threading.Thread(target=self._run, daemon=True, name="hivegen-prefork")
        self._reader.start()
        with self._cond:
            self._cond.wait_for(lambda: bool(self._started))
        started = self._started[0]
        if isinstance(started, BaseException):
            raise PreforkError(f"could not start the prefork process: {started}")
        self.process = started
        assert started.stdin is not None
        self._stdin: IO[bytes] = started.stdin

    @classmethod
    def shared(cls) -> Preforker:
        """This process's prefork process, started now if none runs."""
        with cls._shared_lock:
            if cls._shared is None or not cls._shared.running:
                if cls._shared is None:
                    atexit.register(stop_shared)
                cls._shared = cls()
            return cls._shared

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def spawn(self, argv: list[str], env: dict[str, str], log: str) -> ForkedProcess:
        """Fork `hivegen *argv` with `env`, its output appended to `log`."""
        request = {"argv": argv, "env": env, "cwd": os.getcwd(), "log": log}
        with self._send_lock:
            self._wait_ready()
            with self._cond:
                known = len(self._pids)
            try:
                self._stdin.write(json.dumps(request).encode() + b"\n")
                self._stdin.flush()
            except OSError as exc:
                raise PreforkError(f"the prefork process (pid {self.process.pid}) is gone: {exc}") from None
            with self._cond:
                if not self._cond.wait_for(lambda: len(self._pids) > known or not self.running, timeout=60):
                    raise PreforkError("the prefork process did not fork a node within 60 s")
                if len(self._pids) == known:
                    raise PreforkError(f"the prefork process exited with code {self.process.poll()}")
                return ForkedProcess(self, self._pids[known])

    def exit_code(self, pid: int, default: int | None = None) -> int | None:
        with self._cond:
            return self._exits.get(pid, default)

    def wait_exit(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait(timeout)

    def stop(self) -> None:
        """Close stdin: the prefork process exits (children still running get SIGTERM from the kernel)."""
        with contextlib.suppress(OSError):
            self._stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _wait_ready(self) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._ready or not self.running, timeout=READY_TIMEOUT):
                raise PreforkError(f"the prefork process did not finish its imports in {READY_TIMEOUT:.0f} s")
            if not self._ready:
                raise PreforkError(f"the prefork process exited with code {self.process.poll()} during its imports")

    def _run(self) -> None:
        from hivegen.cluster import PARENT_PID_ENV
        from hivegen.peers import child_env

        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "hivegen.prefork"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=child_env(**{PARENT_PID_ENV: str(os.getpid())}),
            )
        except BaseException as exc:
            with self._cond:
                self._started.append(exc)
                self._cond.notify_all()
            return
        with self._cond:
            self._started.append(process)
            self._cond.notify_all()
        assert process.stdout is not None
        for line in process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                if message.get("ready"):
                    self._ready = True
                elif "pid" in message:
                    self._pids.append(int(message["pid"]))
                elif "exited" in message:
                    self._exits[int(message["exited"])] = int(message["code"])
                self._cond.notify_all()
        process.wait()
        with self._cond:
            self._cond.notify_all()


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV) != "1" and sys.platform.startswith("linux")


def warm_up() -> None:
    """Start this process's prefork process now (if enabled), so its imports overlap other start-up work."""
    if enabled():
        try:
            Preforker.shared()
        except PreforkError as exc:
            logger.warning("no prefork process: %s", exc)


def spawn_node_process(argv: list[str], env: dict[str, str], log: str) -> ForkedProcess | None:
    """A node forked from this process's prefork process, or None when prefork is off or broken (the caller then
    starts a fresh process)."""
    if not enabled():
        return None
    try:
        return Preforker.shared().spawn(argv, env, log)
    except PreforkError as exc:
        logger.warning("starting the node as a fresh process: %s", exc)
        return None


def stop_shared() -> None:
    """Stop this process's prefork process, if one runs."""
    with Preforker._shared_lock:
        if Preforker._shared is not None:
            Preforker._shared.stop()
            Preforker._shared = None


# ---- the prefork process itself ----


def _serve() -> dict[str, Any] | None:
    """Import, then fork on each request. Returns the request in a forked child; None when stdin closes."""
    from hivegen.cluster import PARENT_PID_ENV
    from hivegen.process import set_parent_death_signal

    parent = os.environ.get(PARENT_PID_ENV)
    set_parent_death_signal(signal.SIGTERM)
    if parent and os.getppid() != int(parent):  # the parent died before the signal was armed
        return None
    for name in PRELOAD:
        importlib.import_module(name)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler (not SIG_DFL) so the wakeup fd is written
    _say({"ready": True})
    selector = selectors.DefaultSelector()
    stdin = sys.stdin.buffer.fileno()
    selector.register(stdin, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    buffered = b""
    while True:
        for key, _ in selector.select():
            if key.fd == wake_r:
                os.read(wake_r, 512)
                _reap()
                continue
            chunk = os.read(stdin, 65536)
            if not chunk:
                _reap()
                return None
            buffered += chunk
            while b"\n" in buffered:
                line, buffered = buffered.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    selector.close()
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    os.close(wake_r)
                    os.close(wake_w)
                    return dict(request)
                _say({"pid": pid})
        _reap()


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _say({"exited": pid, "code": os.waitstatus_to_exitcode(status)})


def _say(message: dict[str, Any]) -> None:
    os.write(sys.stdout.fileno(), json.dumps(message).encode() + b"\n")


def _run_child(request: dict[str, Any]) -> int:
    """(a forked child) Become `hivegen *argv`: its own output, environment and directory."""
    from hivegen.cluster import PARENT_PID_ENV
    from hivegen.process import set_process_name

    set_process_name(f"hivegen-{request['argv'][0]}")  # `ps` shows its command line as the prefork process's
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(null)
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ[PARENT_PID_ENV] = str(os.getppid())  # the node ties itself to this prefork process
    os.chdir(request["cwd"])
    sys.argv = ["hivegen", *request["argv"]]
    from hivegen.cli import main

    return main(request["argv"])


if __name__ == "__main__":
    job = _serve()
    if job is not None:
        sys.exit(_run_child(job))
