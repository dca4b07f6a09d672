"""The swarm's model registry: one DHT key listing every model some node serves, so a coordinator can
show the whole swarm (block keys alone cannot be enumerated)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import hivemind
from hivemind.utils import get_dht_time

logger = logging.getLogger(__name__)

MODELS_KEY = "hivegen.models"


@dataclass(frozen=True)
class ModelInfo:
    model_key: str  # the model's identity in the swarm (name + weights digest prefix)
    name: str  # readable name
    num_blocks: int  # decoder blocks in the model

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "num_blocks": self.num_blocks}


def announce_model(dht: hivemind.DHT, info: ModelInfo, ttl: float) -> bool:
    """Register `info` under the registry key for `ttl` seconds (every node serving the model refreshes it)."""
    return bool(dht.store(MODELS_KEY, info.to_dict(), get_dht_time() + ttl, subkey=info.model_key))


def fetch_models(dht: hivemind.DHT) -> dict[str, ModelInfo]:
    """Every registered model; malformed entries are skipped."""
    found = dht.get(MODELS_KEY, latest=True)
    if found is None or not isinstance(found.value, dict):
        return {}
    models: dict[str, ModelInfo] = {}
    for model_key, entry in found.value.items():
        value = getattr(entry, "value", None)
        if (
            isinstance(model_key, str)
            and isinstance(value, dict)
            and isinstance(value.get("name"), str)
            and isinstance(value.get("num_blocks"), int)
            and value["num_blocks"] > 0
        ):
            models[model_key] = ModelInfo(model_key, value["name"], value["num_blocks"])
        else:
            logger.debug("skipping a malformed model registry entry %r", model_key)
    return models
