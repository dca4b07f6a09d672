"""The client: routing, inference sessions with fail-over, sampling, and RemoteModelForCausalLM."""

from hivegen.client.model import RemoteModelForCausalLM
from hivegen.client.routing import Hop, RoutingCosts, plan_route
from hivegen.client.sampling import SamplingParams
from hivegen.client.session import InferenceSession

__all__ = ["Hop", "InferenceSession", "RemoteModelForCausalLM", "RoutingCosts", "SamplingParams", "plan_route"]
