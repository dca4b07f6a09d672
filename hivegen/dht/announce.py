"""Announce a node's span under every block key it serves, keep it fresh, and withdraw it on shutdown."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import hivemind
from hivemind.utils import get_dht_time

from hivegen.credits.identity import Identity
from hivegen.dht.lookup import get_entries
from hivegen.dht.models import ModelInfo, announce_model
from hivegen.dht.records import SpanRecord, block_key
from hivegen.dht.signing import dht_key_id, sign_value, verify_value
from hivegen.dht.swarm import SwarmError, run_on_dht

logger = logging.getLogger(__name__)

# A withdrawal stays readable at least this long, so lookups see "offline" rather than a stale "online".
WITHDRAW_GRACE = 5.0


def announce_span(dht: hivemind.DHT, model_key: str, record: SpanRecord, ttl: float, identity: Identity) -> None:
    """Store `record`, signed by `identity` (its owner), under every block key of its span for `ttl` seconds."""
    if ttl <= 0:
        raise ValueError(f"ttl must be positive, got {ttl}")
    expiration = get_dht_time() + ttl
    _store_signed(dht, model_key, record, identity, expiration)


def withdraw_span(dht: hivemind.DHT, model_key: str, record: SpanRecord, identity: Identity) -> None:
    """Overwrite the node's record with an "offline" one signed by `identity`, so lookups stop returning it at once.

    hivemind keeps the entry with the later expiration, so the offline record must outlive the one it replaces:
    it expires just after the latest genuine announcement found under any of the span's keys, and at least
    WITHDRAW_GRACE seconds from now. One expiration for all keys, so the offline entry is the node's latest.
    """
    _check_owner(record, identity)
    keys = _span_keys(model_key, record)
    latest = get_dht_time() + WITHDRAW_GRACE
    found = run_on_dht(dht, partial(get_entries, keys=keys))
    for key, entries in found.items():
        for subkey, value, expiration in entries or ():
            if subkey == record.node_id and verify_value(dht_key_id(key), subkey, value, expiration):
                latest = max(latest, expiration + 0.01)
    _store_signed(dht, model_key, dataclasses.replace(record, state="offline"), identity, latest)


class Announcer:
    """A daemon thread that re-announces a node's span (signed by `identity`) every `period` seconds until stopped,
    and soon after announce_now(), at most once every `min_interval` seconds however often it is asked."""

    def __init__(
        self,
        dht: hivemind.DHT,
        model_key: str,
        get_record: Callable[[], SpanRecord],
        identity: Identity,
        ttl: float = 30.0,
        period: float | None = None,
        model: ModelInfo | None = None,
        min_interval: float = 1.0,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        self.dht = dht
        self.model_key = model_key
        self.get_record = get_record  # called at every refresh, so free cache and throughput stay current
        self.identity = identity  # owns the records (and signs them); must match the records' node_id
        self.model = model  # also kept registered in the swarm's model registry
        self.ttl = ttl
        self.period = period if period is not None else ttl / 3
        if not 0 < self.period < ttl:
            raise ValueError(f"period must be in (0, ttl={ttl}), got {self.period}")
        self.min_interval = min_interval  # between refreshes asked by announce_now: a burst is one refresh
        self._last_refresh = float("-inf")  # time.monotonic() of the latest refresh
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._last: SpanRecord | None = None  # the record most recently announced, withdrawn on stop
        self._thread = threading.Thread(target=self._run, name=f"announcer-{model_key}", daemon=True)

    def start(self) -> None:
        """Announce now (failures are logged, not raised), then keep refreshing in the background."""
        self._refresh()
        self._thread.start()

    def announce_now(self) -> None:
        """Ask the background thread to refresh soon (e.g. after free cache changed); cheap, never blocks."""
        self._wake.set()

    def stop(self, withdraw: bool = True) -> None:
        """Stop refreshing; with `withdraw`, mark the last announced record offline."""
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        if withdraw and self._last is not None:
            try:
                withdraw_span(self.dht, self.model_key, self._last, self.identity)
                logger.info("withdrew %s blocks %d:%d", self.model_key, self._last.start, self._last.end)
            except Exception as e:
                logger.warning("could not withdraw %s from the DHT: %s", self.model_key, e)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.period)
            # Coalesce a burst of announce_now() calls: what they ask for is in the record read after the pause.
            self._stopping.wait(max(0.0, self._last_refresh + self.min_interval - time.monotonic()))
            self._wake.clear()
            if self._stopping.is_set():
                break
            self._refresh()

    def _refresh(self) -> None:
        self._last_refresh = time.monotonic()
        try:
            record = self.get_record()
            announce_span(self.dht, self.model_key, record, self.ttl, self.identity)
            if self.model is not None:
                announce_model(self.dht, self.model, self.ttl, self.identity)
        except Exception as e:
            logger.warning("announcing %s failed (retrying in %.1fs): %s", self.model_key, self.period, e)
            return
        self._last = record
        logger.debug("announced %s blocks %d:%d", self.model_key, record.start, record.end)


def _span_keys(model_key: str, record: SpanRecord) -> list[str]:
    return [block_key(model_key, block) for block in range(record.start, record.end)]


def _check_owner(record: SpanRecord, identity: Identity) -> None:
    if record.owner != identity.public_key_hex:
        raise ValueError(
            f"record {record.node_id!r} is owned by key {record.owner}, not by this identity "
            f"({identity.public_key_hex}); build its node_id with node_id(dht, identity.public_key_hex)"
        )


def _store_signed(dht: hivemind.DHT, model_key: str, record: SpanRecord, identity: Identity, expiration: float) -> None:
    """Sign `record` for every block key of its span (here, not in the DHT process) and store it in one round."""
    _check_owner(record, identity)
    keys = _span_keys(model_key, record)
    data = record.to_dict()
    values = [sign_value(identity, key, record.node_id, data, expiration) for key in keys]
    coro = partial(_store_all, keys=keys, values=values, subkey=record.node_id, expiration=expiration)
    stored = run_on_dht(dht, coro)
    if not any(stored):
        raise SwarmError(
            f"no DHT peer accepted the record for {model_key} blocks {record.start}:{record.end}; "
            "check that the swarm is reachable (--initial-peers)"
        )


async def _store_all(
    _dht: Any, node: Any, *, keys: list[str], values: list[dict[str, Any]], subkey: str, expiration: float
) -> list[bool]:
    """Runs in the DHT process: one store_many for every block key."""
    n = len(keys)
    stored = await node.store_many(keys, values, [expiration] * n, subkeys=[subkey] * n)
    return [bool(stored.get((key, subkey))) for key in keys]
