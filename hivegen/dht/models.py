"""The swarm's model registry: one DHT key listing every model some node serves, so a coordinator can
show the whole swarm (block keys alone cannot be enumerated)."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import hivemind
from hivemind.utils import get_dht_time

from hivegen.credits.identity import Identity
from hivegen.dht.signing import dht_key_id, owned_subkey, sign_value, split_owned, verify_value

logger = logging.getLogger(__name__)

MODELS_KEY = "hivegen.models"


@dataclass(frozen=True)
class ModelInfo:
    model_key: str  # the model's identity in the swarm (name + weights digest prefix)
    name: str  # readable name
    num_blocks: int  # decoder blocks in the model

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "num_blocks": self.num_blocks}


def announce_model(dht: hivemind.DHT, info: ModelInfo, ttl: float, identity: Identity) -> bool:
    """Register `info` for `ttl` seconds under subkey "<model_key>@<identity's key>", signed by `identity`.

    Every node serving the model keeps its own entry fresh; nobody can overwrite another's.
    """
    subkey = owned_subkey(info.model_key, identity.public_key_hex)
    expiration = get_dht_time() + ttl
    value = sign_value(identity, MODELS_KEY, subkey, dict(info.to_dict()), expiration)
    return bool(dht.store(MODELS_KEY, value, expiration, subkey=subkey))


def fetch_models(dht: hivemind.DHT) -> dict[str, ModelInfo]:
    """Every registered model (model_key -> info); unsigned, forged and malformed entries are skipped.

    When announcers disagree about a model, the description given by the most owners wins (ties: the
    entry that expires last), so one liar cannot change what everybody else says.
    """
    found = dht.get(MODELS_KEY, latest=True)
    if found is None or not isinstance(found.value, dict):
        return {}
    key_id = dht_key_id(MODELS_KEY)
    votes: dict[str, Counter[tuple[str, int]]] = {}
    last_seen: dict[tuple[str, str, int], float] = {}
    for subkey, entry in found.value.items():
        value, expiration = getattr(entry, "value", None), getattr(entry, "expiration_time", None)
        parts = split_owned(subkey)
        if (
            parts is None
            or not isinstance(expiration, float)
            or not isinstance(value, dict)
            or not isinstance(value.get("name"), str)
            or isinstance(value.get("num_blocks"), bool)
            or not isinstance(value.get("num_blocks"), int)
            or value["num_blocks"] <= 0
        ):
            logger.debug("skipping a malformed model registry entry %r", subkey)
            continue
        if not verify_value(key_id, subkey, value, expiration):
            logger.debug("skipping a model registry entry %r not signed by its owner", subkey)
            continue
        model_key, description = parts[0], (value["name"], value["num_blocks"])
        votes.setdefault(model_key, Counter())[description] += 1
        last_seen[(model_key, *description)] = max(last_seen.get((model_key, *description), 0.0), expiration)
    models: dict[str, ModelInfo] = {}
    for model_key, counts in votes.items():
        name, num_blocks = max(counts, key=lambda d: (counts[d], last_seen[(model_key, *d)]))
        models[model_key] = ModelInfo(model_key, name, num_blocks)
    return models
