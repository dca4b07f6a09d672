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
from hivegen.dht.swarm import DHT_CALL_TIMEOUT, SwarmError

logger = logging.getLogger(__name__)

MODELS_KEY = "hivegen.models"
# Bounds on what a registry entry may claim; entries beyond them are ignored when read (and never announced).
MAX_NUM_BLOCKS = 1024  # decoder blocks: several times any real model's layer count (the largest have ~160)
MAX_MODEL_KEY_CHARS = 256  # a checkpoint's model key is its name plus 13 characters
MAX_NAME_CHARS = 256


@dataclass(frozen=True)
class ModelInfo:
    model_key: str  # the model's identity in the swarm (name + weights digest prefix)
    name: str  # readable name
    num_blocks: int  # decoder blocks in the model

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "num_blocks": self.num_blocks}


def registry_problem(model_key: object, name: object, num_blocks: object) -> str | None:
    """What makes a registry entry unacceptable (None if nothing): strangers write it and the status page shows it,
    so its strings are short printable text and its block count is a real model's."""
    if not isinstance(model_key, str) or not 0 < len(model_key) <= MAX_MODEL_KEY_CHARS or not model_key.isprintable():
        return f"the model key must be printable text of 1 to {MAX_MODEL_KEY_CHARS} characters"
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS or not name.isprintable():
        return f"the name must be printable text of 1 to {MAX_NAME_CHARS} characters"
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or not 0 < num_blocks <= MAX_NUM_BLOCKS:
        return f"num_blocks must be an integer in 1..{MAX_NUM_BLOCKS}"
    return None


def announce_model(dht: hivemind.DHT, info: ModelInfo, ttl: float, identity: Identity) -> bool:
    """Register `info` for `ttl` seconds under subkey "<model_key>@<identity's key>", signed by `identity`.

    Every node serving the model keeps its own entry fresh; nobody can overwrite another's. Raises ValueError for
    an entry every reader would ignore (see registry_problem).
    """
    problem = registry_problem(info.model_key, info.name, info.num_blocks)
    if problem is not None:
        raise ValueError(f"cannot register model {info.model_key[:80]!r}: {problem}")
    subkey = owned_subkey(info.model_key, identity.public_key_hex)
    expiration = get_dht_time() + ttl
    value = sign_value(identity, MODELS_KEY, subkey, dict(info.to_dict()), expiration)
    return bool(dht.store(MODELS_KEY, value, expiration, subkey=subkey))


def fetch_models(dht: hivemind.DHT, timeout: float = DHT_CALL_TIMEOUT) -> dict[str, ModelInfo]:
    """Every registered model (model_key -> info); unsigned, forged, malformed and out-of-bounds entries are skipped.

    When announcers disagree about a model, the description given by the most owners wins (ties: the
    entry that expires last), so one liar cannot change what everybody else says. Raises SwarmError if the DHT
    does not answer within `timeout` seconds.
    """
    try:
        future = dht.get(MODELS_KEY, latest=True, return_future=True)
    except Exception as e:
        raise SwarmError(f"the DHT is not running ({type(e).__name__}: {e}); start it before using it") from e
    try:
        found = future.result(timeout=timeout)
    except Exception as e:
        future.cancel()
        raise SwarmError(f"could not read the model registry: {type(e).__name__}: {e}") from e
    if found is None or not isinstance(found.value, dict):
        return {}
    key_id = dht_key_id(MODELS_KEY)
    votes: dict[str, Counter[tuple[str, int]]] = {}
    last_seen: dict[tuple[str, str, int], float] = {}
    for subkey, entry in found.value.items():
        value, expiration = getattr(entry, "value", None), getattr(entry, "expiration_time", None)
        parts = split_owned(subkey)
        if parts is None or not isinstance(expiration, float) or not isinstance(value, dict):
            logger.debug("skipping a malformed model registry entry %.200r", subkey)
            continue
        problem = registry_problem(parts[0], value.get("name"), value.get("num_blocks"))
        if problem is not None:
            logger.debug("skipping the model registry entry %.200r: %s", subkey, problem)
            continue
        if not verify_value(key_id, subkey, value, expiration):
            logger.debug("skipping a model registry entry %.200r not signed by its owner", subkey)
            continue
        model_key, description = parts[0], (value["name"], value["num_blocks"])
        votes.setdefault(model_key, Counter())[description] += 1
        last_seen[(model_key, *description)] = max(last_seen.get((model_key, *description), 0.0), expiration)
    models: dict[str, ModelInfo] = {}
    for model_key, counts in votes.items():
        name, num_blocks = max(counts, key=lambda d: (counts[d], last_seen[(model_key, *d)]))
        models[model_key] = ModelInfo(model_key, name, num_blocks)
    return models
