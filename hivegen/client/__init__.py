"""The client: routing, inference sessions with fail-over, sampling, RemoteModelForCausalLM, and Client (records)."""

from hivegen.client.client import Client
from hivegen.client.model import RemoteModelForCausalLM
from hivegen.client.routing import Hop, RoutingCosts, plan_route
from hivegen.client.sampling import SamplingParams
from hivegen.client.session import InferenceSession

__all__ = [
    "Client",
    "Hop",
    "InferenceSession",
    "RemoteModelForCausalLM",
    "RoutingCosts",
    "SamplingParams",
    "plan_route",
]
