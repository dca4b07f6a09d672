"""Which accounts run nodes: the owners of the span records announced in the DHT for a model.

The ledger pays receipts only to these accounts, so a ring of fresh keys cannot move grants into one account
without announcing a node for a registered model (see README, "Credits").
"""

from __future__ import annotations

import logging
import threading
import time

import hivemind

from hivegen.credits.identity import account_of
from hivegen.dht import fetch_models, fetch_spans
from hivegen.dht.signing import split_owned

logger = logging.getLogger(__name__)
LOOKUP_TIMEOUT_S = 5.0  # a slow DHT delays receipts this long at most (they are retried)


class ServingAccounts:
    """Whether an account owns a node announced for a model, from the DHT.

    Answers are cached `ttl` seconds; an account missing from an answer older than `recheck` seconds triggers one
    fresh lookup, so a node that has just announced is paid without waiting. Lookups run one at a time and the
    model registry is cached too, so a flood of receipts naming made-up models or accounts cannot fan out into
    DHT traffic.
    """

    def __init__(self, dht: hivemind.DHT, ttl: float = 30.0, recheck: float = 0.5) -> None:
        self.dht = dht
        self.ttl = ttl
        self.recheck = recheck
        self._models: tuple[float, dict[str, int]] = (float("-inf"), {})  # when fetched, model_key -> num_blocks
        self._accounts: dict[str, tuple[float, frozenset[str]]] = {}
        self._lock = threading.Lock()

    def __call__(self, model_key: str, account: str) -> bool:
        with self._lock:
            now = time.monotonic()
            cached = self._accounts.get(model_key)
            if cached is not None and now - cached[0] < self.ttl:
                when, accounts = cached
                if account in accounts or now - when < self.recheck:
                    return account in accounts
            return account in self._lookup(model_key, now)

    def _lookup(self, model_key: str, now: float) -> frozenset[str]:
        try:
            if model_key not in self._models[1] and now - self._models[0] >= self.recheck:
                models = fetch_models(self.dht, timeout=LOOKUP_TIMEOUT_S)
                self._models = (now, {key: info.num_blocks for key, info in models.items()})
            num_blocks = self._models[1].get(model_key)
            if num_blocks is None:
                return frozenset()
            accounts = set()
            for record in fetch_spans(self.dht, model_key, num_blocks, timeout=LOOKUP_TIMEOUT_S).values():
                owned = split_owned(record.node_id)
                if owned is not None:
                    accounts.add(account_of(owned[1]))
        except Exception as exc:  # a DHT hiccup: answer from what we knew
            logger.warning("could not look up the nodes of %s: %s", model_key[:64], exc)
            cached = self._accounts.get(model_key)
            return cached[1] if cached else frozenset()
        answer = frozenset(accounts)
        self._accounts[model_key] = (now, answer)
        if len(self._accounts) > 1024:  # bounded: models come and go
            del self._accounts[min(self._accounts, key=lambda key: self._accounts[key][0])]
        return answer
