"""The client: routing, inference sessions with fail-over, sampling, RemoteModelForCausalLM, and Client (records).

Names are imported on first use, so that light modules of the package (`hivegen.client.params`) can be imported
without torch, transformers and hivemind."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hivegen.client.client import Client
    from hivegen.client.model import RemoteModelForCausalLM
    from hivegen.client.routing import Hop, RoutingCosts, plan_route
    from hivegen.client.sampling import SamplingParams
    from hivegen.client.session import InferenceSession

_WHERE = {
    "Client": "hivegen.client.client",
    "Hop": "hivegen.client.routing",
    "InferenceSession": "hivegen.client.session",
    "RemoteModelForCausalLM": "hivegen.client.model",
    "RoutingCosts": "hivegen.client.routing",
    "SamplingParams": "hivegen.client.sampling",
    "plan_route": "hivegen.client.routing",
}
__all__ = [
    "Client",
    "Hop",
    "InferenceSession",
    "RemoteModelForCausalLM",
    "RoutingCosts",
    "SamplingParams",
    "plan_route",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'hivegen.client' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
