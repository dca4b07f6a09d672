"""Small file helpers shared by the node, the cluster and the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write `data` as JSON so a reader sees either nothing or the whole file (write, then rename)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(target)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` so a reader sees either nothing or the whole file (write, then rename)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(target)


# Defaults of the commands' file flags, as their help texts say them.
STORE_DEFAULT = "(default: $HIVEGEN_STORE, else $HIVEGEN_HOME/store, else ~/.hivegen/store)"
IDENTITY_DEFAULT = "(default: $HIVEGEN_IDENTITY, else $HIVEGEN_HOME/identity, else ~/.hivegen/identity)"
