"""Warm node starts for a local cluster: one process pays the imports (torch, transformers, hivemind: ~9 s of CPU)
once, then forks a ready `hivegen node serve` for each node the cluster starts.

`python -m hivegen.prefork` is that process. It reads one JSON request per line on stdin (`argv`, `env`, `cwd`,
`log`), forks, and answers `{"pid": N}`; when a child ends it writes `{"exited": N, "code": C}` (C < 0: killed by
signal -C, as `subprocess` says it). Each child gets the request's environment, but what modules read at import
(torch, transformers, hivemind) came from the prefork process's own, at its start. It stays single-threaded in
Python and runs no torch operation (the two idle native threads torch's and hivemind's imports start are not
copied, and hold nothing a child needs). It exits when stdin closes or its parent
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
from dataclasses import dataclass
from typing import IO, Any

from hivegen.peers import child_env
from hivegen.process import PARENT_PID_ENV, set_process_name, tie_process_tree

logger = logging.getLogger(__name__)
PRELOAD = ("hivegen.cli", "hivegen.node.cli", "hivegen.node.server")  # what every node imports
DISABLE_ENV = "HIVEGEN_NO_PREFORK"  # set to 1: start every cluster node as a fresh Python process
READY_TIMEOUT = 300.0  # seconds the imports may take on a loaded machine


class PreforkError(RuntimeError):
    """The prefork process could not start or answer."""


@dataclass
class _Child:
    """What the parent knows of one forked child, by the id of the request that asked for it."""

    pid: int = 0  # 0 until the prefork process said which
    code: int | None = None  # its exit status once reaped (negative: killed by that signal)
    abandoned: bool = False  # the spawn gave up waiting for it: killed as soon as its pid arrives


class ForkedProcess:
    """A node forked by the prefork process, seen through the `subprocess.Popen` methods LocalCluster uses.
    Signals go through the prefork process, which alone knows whether the pid is still this child's."""

    def __init__(self, owner: Preforker, request_id: int, pid: int) -> None:
        self.owner = owner
        self.request_id = request_id
        self.pid = pid
        self.args = "hivegen node serve (forked)"

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def poll(self) -> int | None:
        code = self.owner.exit_code(self.request_id)
        if code is None and not self.owner.running and not _alive(self.pid):
            return -signal.SIGTERM  # the prefork process died first; its parent-death signal ended the child
        return code

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            self.owner.wait_exit(0.05)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is not None:
            return
        if self.owner.running:
            self.owner.signal(self.request_id, sig)
        elif _alive(self.pid):  # orphaned: adopted by init, which reaps it
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Preforker:
    """The parent's side of one `python -m hivegen.prefork` process: started on first use, shared by every
    LocalCluster of this process, stopped at exit. Requests and answers carry an id, so a late answer can never
    be taken for another request's."""

    _shared: Preforker | None = None
    _shared_lock = threading.Lock()

    def __init__(self) -> None:
        self._children: dict[int, _Child] = {}
        self._next_id = 0
        self._ready = False
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._started: list[subprocess.Popen[bytes] | BaseException] = []
        # The process is started by the thread that reads it, which lives as long as it does: the kernel's
        # parent-death signal follows the thread that forked, not the process.
        self._reader = threading.Thread(target=self._run, daemon=True, name="hivegen-prefork")
        self._reader.start()
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._started), timeout=60):
                raise PreforkError("the prefork process did not start within 60 s")
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
        try:
            cwd = os.getcwd()
        except OSError as exc:
            raise PreforkError(f"no working directory to give the node: {exc}") from None
        self._wait_ready()
        with self._cond:
            self._next_id += 1
            request_id = self._next_id
            child = self._children[request_id] = _Child()
        self._send({"id": request_id, "argv": argv, "env": env, "cwd": cwd, "log": log})
        with self._cond:
            if not self._cond.wait_for(lambda: child.pid or not self.running, timeout=60):
                child.abandoned = True  # if it forks after all, it is killed: a fallback must not meet a twin
                raise PreforkError("the prefork process did not fork a node within 60 s")
            if not child.pid:
                raise PreforkError(f"the prefork process exited with code {self.process.poll()}")
            return ForkedProcess(self, request_id, child.pid)

    def signal(self, request_id: int, sig: int) -> None:
        """Have the prefork process send `sig` to the child, unless it has already reaped it."""
        with contextlib.suppress(PreforkError):
            self._send({"signal": int(sig), "id": request_id})

    def exit_code(self, request_id: int) -> int | None:
        with self._cond:
            child = self._children.get(request_id)
            return None if child is None else child.code

    def wait_exit(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait(timeout)

    def stop(self) -> None:
        """Ask the prefork process to quit (children still running get SIGTERM from the kernel). A message, not
        only EOF: processes forked from this one (hivemind's DHT) may hold a copy of the pipe open."""
        with contextlib.suppress(PreforkError):
            self._send({"quit": True})
        with contextlib.suppress(OSError):
            self._stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _send(self, message: dict[str, Any]) -> None:
        with self._send_lock:
            try:
                self._stdin.write(json.dumps(message).encode() + b"\n")
                self._stdin.flush()
            except (OSError, ValueError) as exc:
                raise PreforkError(f"the prefork process (pid {self.process.pid}) is gone: {exc}") from None

    def _wait_ready(self) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._ready or not self.running, timeout=READY_TIMEOUT):
                raise PreforkError(f"the prefork process did not finish its imports in {READY_TIMEOUT:.0f} s")
            if not self._ready:
                raise PreforkError(f"the prefork process exited with code {self.process.poll()} during its imports")

    def _run(self) -> None:
        process: subprocess.Popen[bytes] | None = None
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
        try:
            for line in process.stdout:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    self._take(json.loads(line))
        finally:
            process.wait()
            with self._cond:
                self._cond.notify_all()

    def _take(self, message: dict[str, Any]) -> None:
        """(reader thread) One answer of the prefork process."""
        with self._cond:
            if message.get("ready"):
                self._ready = True
            elif (child := self._children.get(int(message["id"]))) is not None:
                if "pid" in message:
                    child.pid = int(message["pid"])
                    if child.abandoned:
                        self.signal(int(message["id"]), signal.SIGKILL)
                elif "exited" in message:
                    child.code = int(message["code"])
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
    """Import, then fork on each request. Returns the request in a forked child; None on `quit` or EOF."""
    tie_process_tree()  # dies with the cluster process, so its nodes get their SIGTERM
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the cluster stops the nodes
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
    children: dict[int, int] = {}  # pid -> request id, until reaped
    buffered = b""
    while True:
        for key, _ in selector.select():
            if key.fd == wake_r:
                os.read(wake_r, 512)
                continue
            chunk = os.read(stdin, 65536)
            if not chunk:
                _reap(children)
                return None
            buffered += chunk
            while b"\n" in buffered:
                line, buffered = buffered.split(b"\n", 1)
                request = json.loads(line)
                _reap(children)  # first: a pid signalled below must still be the child's
                if request.get("quit"):
                    return None
                if "signal" in request:
                    pid = next((p for p, i in children.items() if i == request["id"]), None)
                    if pid is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, int(request["signal"]))
                    continue
                pid = os.fork()
                if pid == 0:
                    selector.close()
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.default_int_handler)
                    os.close(wake_r)
                    os.close(wake_w)
                    return dict(request)
                children[pid] = int(request["id"])
                _say({"id": request["id"], "pid": pid})
        _reap(children)


def _reap(children: dict[int, int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if (request_id := children.pop(pid, None)) is not None:
            _say({"id": request_id, "exited": pid, "code": os.waitstatus_to_exitcode(status)})


def _say(message: dict[str, Any]) -> None:
    os.write(sys.stdout.fileno(), json.dumps(message).encode() + b"\n")


def _run_child(request: dict[str, Any]) -> int:
    """(a forked child) Become `hivegen *argv`: its own output, environment and directory."""
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
