"""Pieces the benchmark scripts share: which model to measure, and running a script so that Ctrl-C or
SIGTERM unwinds through `finally` blocks (which stop every node process)."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from pathlib import Path

from hivegen.errors import ModelLoadError
from hivegen.model.demo import prepare_model, resolve_model_path
from hivegen.model.tiny import make_tiny_checkpoint


def resolve_model(spec: str, tmp: Path) -> Path:
    """tiny-llama (a random 8-block Llama, like Petals' reference figure), smollm2, or a checkpoint dir."""
    if spec == "tiny-llama":
        return make_tiny_checkpoint("llama", tmp / "tiny-llama", num_layers=8)
    if spec == "smollm2":
        try:
            return resolve_model_path("smollm2")
        except ModelLoadError:  # not prepared yet: convert it once (about 40 s)
            return prepare_model("smollm2")
    return resolve_model_path(spec)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_script(main: Callable[[], int]) -> None:
    """Run `main`, turning SIGTERM into KeyboardInterrupt so cleanup runs, and exit with its status."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; every node process was stopped", file=sys.stderr)
        sys.exit(130)
