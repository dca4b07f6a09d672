"""Process helpers shared by the long-lived commands (node, cluster, coordinator): stop signals, and tying a
process to its parent and its forked children so that none outlives the others."""

from __future__ import annotations

import os
import signal
import sys
import time

PARENT_PID_ENV = "HIVEGEN_PARENT_PID"  # a node started by a cluster (or its prefork process) exits when that dies


class StopSignals:
    """SIGINT and SIGTERM, caught from before a service starts until it is told to stop.

    Installed before start-up, so a signal that arrives between the service announcing itself and the
    main loop is not lost (the default action would kill the process without withdrawing). A first
    signal during start-up is honoured once start-up ends; a second one interrupts it. The handler
    otherwise only records the signal: handlers may re-enter (several signals in a row), and taking a
    lock there, as threading.Event.set does, can deadlock.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self.starting = True
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.received.append(signum)
        if self.starting and len(self.received) > 1:
            raise KeyboardInterrupt(f"signal {signum} during start-up")

    def wait(self) -> None:
        """Block until a signal arrives (at once if one came during start-up)."""
        self.starting = False
        while not self.received:
            time.sleep(0.2)


def set_parent_death_signal(sig: int) -> None:
    """Ask Linux to send `sig` to this process when its parent dies (prctl PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, sig)


def set_process_name(name: str) -> None:
    """The name `ps -o comm`, `top` and psutil show for this process (Linux keeps its first 15 bytes)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(15, name.encode()[:15])  # PR_SET_NAME


def tie_process_tree() -> None:
    """Make this long-lived process and what it forks end together, even if one is SIGKILLed.

    A node started by `cluster up` exits when the cluster process dies; hivemind's DHT runs in a
    forked child (which owns the p2pd daemon) and would otherwise outlive a killed parent.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.environ.get(PARENT_PID_ENV)
    if parent:
        set_parent_death_signal(signal.SIGTERM)  # a graceful stop: the node withdraws from the DHT
        if os.getppid() != int(parent):  # the parent died before the signal was armed
            sys.exit(1)
    os.register_at_fork(after_in_child=lambda: set_parent_death_signal(signal.SIGKILL))
