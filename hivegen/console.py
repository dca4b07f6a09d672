"""What a person waiting at a terminal sees while something slow happens: a spinner on a terminal, one plain
line otherwise (logs, pipes), always on stderr so that stdout stays the answer."""

from __future__ import annotations

import itertools
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

FRAMES = "|/-\\"


@contextmanager
def progress(message: str) -> Iterator[None]:
    """Show `message` until the block ends: animated on a terminal, printed once elsewhere."""
    stream = sys.stderr
    if not stream.isatty():
        print(f"{message} ...", file=stream, flush=True)
        yield
        return
    done = threading.Event()

    def spin() -> None:
        for frame in itertools.cycle(FRAMES):
            stream.write(f"\r{frame} {message} ...")
            stream.flush()
            if done.wait(0.1):
                break
        stream.write("\r" + " " * (len(message) + 6) + "\r")
        stream.flush()

    spinner = threading.Thread(target=spin, name="hivegen-progress", daemon=True)
    spinner.start()
    try:
        yield
    finally:
        done.set()
        spinner.join(1.0)
