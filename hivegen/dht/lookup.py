"""Read which nodes serve which blocks of a model, tolerating stale, malformed and forged records."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from functools import partial
from typing import Any

import hivemind
from hivemind.utils import ValueWithExpiration, get_dht_time

from hivegen.dht.records import SpanRecord, block_key
from hivegen.dht.signing import dht_key_id, verify_value
from hivegen.dht.swarm import DHT_CALL_TIMEOUT, run_on_dht

logger = logging.getLogger(__name__)


def fetch_spans(
    dht: hivemind.DHT, model_key: str, num_blocks: int, timeout: float = DHT_CALL_TIMEOUT
) -> dict[str, SpanRecord]:
    """node_id -> latest online, unexpired record among all block keys of the model (one DHT round).

    Every entry's owner signature is checked here too, so the answer can be trusted even from a DHT peer
    started without the validator; entries that fail are skipped. Raises SwarmError if the DHT does not answer
    within `timeout` seconds.
    """
    found = run_on_dht(dht, partial(get_block_entries, model_key=model_key, num_blocks=num_blocks), timeout=timeout)
    now = get_dht_time()
    latest: dict[str, tuple[float, SpanRecord]] = {}
    for key, entries in found.items():
        if entries is None:
            logger.debug("skipping %s: its value is not a dictionary of node records", key)
            continue
        for subkey, value, expiration in entries:
            if expiration <= now:
                continue
            if not verify_value(dht_key_id(key), subkey, value, expiration):
                logger.debug("skipping record %r under %s: not signed by its owner", subkey, key)
                continue
            try:
                record = SpanRecord.from_dict(subkey, value)
            except ValueError as e:
                logger.debug("skipping malformed record %r under %s: %s", subkey, key, e)
                continue
            if record.end > num_blocks:
                logger.debug("skipping record %r under %s: span ends past block %d", subkey, key, num_blocks)
                continue
            if record.node_id not in latest or expiration > latest[record.node_id][0]:
                latest[record.node_id] = (expiration, record)
    # Filter after picking the latest, so a withdrawal ("offline") hides older "online" copies.
    return {node: record for node, (_, record) in latest.items() if record.online}


def missing_blocks(spans: Iterable[SpanRecord], num_blocks: int) -> list[int]:
    """Blocks in [0, num_blocks) that no online span covers, in order."""
    covered = [False] * num_blocks
    for span in spans:
        if span.online:
            for block in range(max(span.start, 0), min(span.end, num_blocks)):
                covered[block] = True
    return [block for block, ok in enumerate(covered) if not ok]


async def get_block_entries(
    _dht: Any, node: Any, *, model_key: str, num_blocks: int
) -> dict[str, list[tuple[Any, Any, float]] | None]:
    """get_entries for every block key of a model, the keys built in the DHT process: hivemind's pipe into that
    process drops (and can die on) a message larger than the OS pipe buffer (64 KiB), which a list of 1024 long
    keys is, so only the model key and block count cross it."""
    return await get_entries(_dht, node, keys=[block_key(model_key, block) for block in range(num_blocks)])


async def get_entries(_dht: Any, node: Any, *, keys: list[str]) -> dict[str, list[tuple[Any, Any, float]] | None]:
    """Runs in the DHT process: the latest entries of every key as plain (subkey, value, expiration) tuples.

    A key with no value maps to []; a key holding a plain value instead of subkey entries maps to None.
    """
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"))
    out: dict[str, list[tuple[Any, Any, float]] | None] = {}
    for key in keys:
        entry = found.get(key)
        if entry is None:
            out[key] = []
        elif isinstance(entry.value, dict) and all(isinstance(v, ValueWithExpiration) for v in entry.value.values()):
            out[key] = [(subkey, item.value, item.expiration_time) for subkey, item in entry.value.items()]
        else:
            out[key] = None
    return out
