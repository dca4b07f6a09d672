"""A grpc.aio server on an event loop of its own thread, behind a synchronous start/stop: the rest of the node
(DHT, announcer, billing, CLI) stays plain threads, while streams that wait cost no thread at all."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grpc

logger = logging.getLogger(__name__)


class AioServer:
    """Runs `grpc.aio.server(options)` bound to `address` with the servicers `register` adds, in a daemon thread."""

    def __init__(
        self, address: str, register: Callable[[grpc.aio.Server], None], options: Sequence[tuple[str, Any]] = ()
    ) -> None:
        self.address = address
        self.register = register
        self.options = list(options)
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._grace = 2.0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hivegen-grpc", daemon=True)

    def start(self, timeout: float = 60.0) -> int:
        """Bind and start serving; return the port bound. Raises what failed (OSError if the port is taken)."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"the gRPC server on {self.address} did not start within {timeout:.0f} s")
        if self._error is not None:
            raise self._error
        return self.port

    def stop(self, grace: float = 2.0) -> None:
        """Refuse new calls, give in-flight ones `grace` seconds, then cancel them and end the loop. Idempotent."""
        loop, stop = self._loop, self._stop
        if loop is None or stop is None or not self._thread.is_alive():
            return
        self._grace = grace
        try:
            loop.call_soon_threadsafe(stop.set)
        except RuntimeError:  # the loop already closed
            return
        self._thread.join(grace + 5.0)
        if self._thread.is_alive():
            logger.warning("the gRPC server thread did not end within %.0f s of stopping", grace + 5.0)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # never leave start() waiting
            self._error = self._error or exc
            logger.exception("the gRPC server's event loop failed")
        finally:
            self._ready.set()
            loop.close()

    async def _serve(self) -> None:
        try:
            server = grpc.aio.server(options=self.options)
            self.register(server)
            port = server.add_insecure_port(self.address)
            if port == 0:
                raise OSError(f"cannot bind gRPC on {self.address}; is the port taken?")
            await server.start()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self.port = port
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await server.stop(self._grace)
