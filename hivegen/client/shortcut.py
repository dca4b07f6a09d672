"""Answering a repeated `hivegen generate` from the store before loading anything heavy.

The first run of a command records, in the store's `cli-requests` pointers, which request its inputs made: the
model's files (names, sizes and modification times), the prompt, the chat switch and the sampling flags. The same
command again finds the request, and its recorded answer, without tokenizer, torch, transformers or a swarm: a
replay in a fraction of a second. Any change to the inputs (or to the model's files) is a new key, and the full
path runs; it can only miss, never answer wrongly. Only deterministic requests (greedy, or seeded) qualify."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from hivegen.store.backend import ObjectStore, StoreError
from hivegen.store.index import GenerationIndex
from hivegen.store.records import Generation

NAMESPACE = "cli-requests"


def command_key(model: Path, prompt: str, chat: bool | None, sampling: dict[str, Any]) -> str:
    """A digest of everything that decides the request a `generate` command makes."""
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in model.iterdir() if f.is_file())
    data = {"model": str(model.resolve()), "files": files, "prompt": prompt, "chat": chat, "sampling": sampling}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def deterministic(sampling: dict[str, Any]) -> bool:
    """Greedy (no temperature, or 0) or seeded: the same command gives the same answer."""
    return not sampling.get("temperature") or sampling.get("seed") is not None


def recorded_answer(store: ObjectStore, key: str, verified_only: bool) -> Generation | None:
    """The answer the command with this key got before, if the store still holds it (and it passes the policy)."""
    try:
        request_ref = store.get_pointer(NAMESPACE, key)
        if request_ref is None:
            return None
        index = GenerationIndex(store)
        ref = store.get_pointer("requests", request_ref)
        generation = index.load(ref) if ref else None
    except StoreError:
        return None  # a damaged record: the full path regenerates it
    if generation is None or generation.request_ref != request_ref or (verified_only and not generation.verified):
        return None
    return generation


def remember(store: ObjectStore, key: str, generation: Generation) -> None:
    """Record which request the command with this key made."""
    store.set_pointer(NAMESPACE, key, generation.request_ref)
