"""Announce a node's span under every block key it serves, keep it fresh, and withdraw it on shutdown."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import hivemind
from hivemind.utils import get_dht_time

from hivegen.dht.models import ModelInfo, announce_model
from hivegen.dht.records import SpanRecord, block_key
from hivegen.dht.swarm import SwarmError, run_on_dht

logger = logging.getLogger(__name__)

# A withdrawal stays readable at least this long, so lookups see "offline" rather than a stale "online".
WITHDRAW_GRACE = 5.0


def announce_span(dht: hivemind.DHT, model_key: str, record: SpanRecord, ttl: float) -> None:
    """Store `record` under every block key of its span for `ttl` seconds, in one DHT round."""
    if ttl <= 0:
        raise ValueError(f"ttl must be positive, got {ttl}")
    keys = _span_keys(model_key, record)
    expiration = get_dht_time() + ttl
    coro = partial(_store_all, keys=keys, value=record.to_dict(), subkey=record.node_id, expiration=expiration)
    _check_stored(run_on_dht(dht, coro), model_key, record)


def withdraw_span(dht: hivemind.DHT, model_key: str, record: SpanRecord) -> None:
    """Overwrite the node's record with an "offline" one, so lookups stop returning it at once.

    hivemind keeps the entry with the later expiration, so the offline record must outlive the one it replaces:
    it expires just after the latest announcement found, and at least WITHDRAW_GRACE seconds from now.
    """
    offline = dataclasses.replace(record, state="offline")
    keys = _span_keys(model_key, record)
    coro = partial(_withdraw_all, keys=keys, value=offline.to_dict(), subkey=record.node_id, grace=WITHDRAW_GRACE)
    _check_stored(run_on_dht(dht, coro), model_key, record)


class Announcer:
    """A daemon thread that re-announces a node's span every `period` seconds until stopped."""

    def __init__(
        self,
        dht: hivemind.DHT,
        model_key: str,
        get_record: Callable[[], SpanRecord],
        ttl: float = 30.0,
        period: float | None = None,
        model: ModelInfo | None = None,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        self.dht = dht
        self.model_key = model_key
        self.get_record = get_record  # called at every refresh, so free cache and throughput stay current
        self.model = model  # also kept registered in the swarm's model registry
        self.ttl = ttl
        self.period = period if period is not None else ttl / 3
        if not 0 < self.period < ttl:
            raise ValueError(f"period must be in (0, ttl={ttl}), got {self.period}")
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._last: SpanRecord | None = None  # the record most recently announced, withdrawn on stop
        self._thread = threading.Thread(target=self._run, name=f"announcer-{model_key}", daemon=True)

    def start(self) -> None:
        """Announce now (failures are logged, not raised), then keep refreshing in the background."""
        self._refresh()
        self._thread.start()

    def announce_now(self) -> None:
        """Ask the background thread to refresh at once (e.g. after free cache changed a lot)."""
        self._wake.set()

    def stop(self, withdraw: bool = True) -> None:
        """Stop refreshing; with `withdraw`, mark the last announced record offline."""
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        if withdraw and self._last is not None:
            try:
                withdraw_span(self.dht, self.model_key, self._last)
                logger.info("withdrew %s blocks %d:%d", self.model_key, self._last.start, self._last.end)
            except Exception as e:
                logger.warning("could not withdraw %s from the DHT: %s", self.model_key, e)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.period)
            self._wake.clear()
            if self._stopping.is_set():
                break
            self._refresh()

    def _refresh(self) -> None:
        try:
            record = self.get_record()
            announce_span(self.dht, self.model_key, record, self.ttl)
            if self.model is not None:
                announce_model(self.dht, self.model, self.ttl)
        except Exception as e:
            logger.warning("announcing %s failed (retrying in %.1fs): %s", self.model_key, self.period, e)
            return
        self._last = record
        logger.debug("announced %s blocks %d:%d", self.model_key, record.start, record.end)


def _span_keys(model_key: str, record: SpanRecord) -> list[str]:
    return [block_key(model_key, block) for block in range(record.start, record.end)]


def _check_stored(results: list[bool], model_key: str, record: SpanRecord) -> None:
    if not any(results):
        raise SwarmError(
            f"no DHT peer accepted the record for {model_key} blocks {record.start}:{record.end}; "
            "check that the swarm is reachable (--initial-peers)"
        )


async def _store_all(
    _dht: Any, node: Any, *, keys: list[str], value: dict[str, Any], subkey: str, expiration: float
) -> list[bool]:
    """Runs in the DHT process: one store_many for every block key."""
    n = len(keys)
    stored = await node.store_many(keys, [value] * n, [expiration] * n, subkeys=[subkey] * n)
    return [bool(stored.get((key, subkey))) for key in keys]


async def _withdraw_all(
    dht: Any, node: Any, *, keys: list[str], value: dict[str, Any], subkey: str, grace: float
) -> list[bool]:
    """Runs in the DHT process: find the latest expiration of the node's entries, then outlive it."""
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"))
    latest = get_dht_time() + grace
    for entry in found.values():
        own = entry.value.get(subkey) if entry is not None and isinstance(entry.value, dict) else None
        if own is not None:
            latest = max(latest, own.expiration_time + 0.01)
    return await _store_all(dht, node, keys=keys, value=value, subkey=subkey, expiration=latest)
