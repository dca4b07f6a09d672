"""Typed records of generations: requests (what was asked) and generations (what came back).

A request is everything that determines the output: the model (name + weights digest), the
prompt's token ids, the tokens forced at the start of the output (for resampling), sampling
parameters with their seed, stop strings, eos ids and max_new_tokens. Its `stem` is the same
without max_new_tokens: generations sharing a stem are prefixes of one another.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from hivegen.store.encoding import canonical_bytes, encode_object, ref_of

REQUEST_KIND = "generation.request"
GENERATION_KIND = "generation"
TRACE_KIND = "trace"
FINISH_REASONS = ("length", "eos", "stop")


@dataclass(frozen=True)
class ModelRef:
    """Which weights: a readable name and the SHA-256 of the checkpoint's config and weight files."""

    name: str
    digest: str


@dataclass(frozen=True)
class GenerationRequest:
    model: ModelRef
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # drawn and recorded when sampling without one
    stop: tuple[str, ...] = ()
    eos_token_ids: tuple[int, ...] = ()
    prefix_ids: tuple[int, ...] = ()  # output tokens forced before sampling starts (resampling)

    def to_data(self) -> dict[str, Any]:
        data = asdict(self)
        data["model"] = asdict(self.model)
        return data

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> GenerationRequest:
        fields = dict(data)
        fields["model"] = ModelRef(**fields["model"])
        for name in ("prompt_ids", "stop", "eos_token_ids", "prefix_ids"):
            fields[name] = tuple(fields.get(name, ()))
        return cls(**fields)

    def encode(self) -> bytes:
        return encode_object(REQUEST_KIND, self.to_data())

    @property
    def ref(self) -> str:
        return ref_of(self.encode())

    @property
    def stem(self) -> str:
        """Identifies the request up to max_new_tokens: outputs of the same stem share prefixes."""
        data = self.to_data()
        del data["max_new_tokens"]
        return ref_of(canonical_bytes({"kind": "generation.stem", "data": data}))

    def with_max_new_tokens(self, n: int) -> GenerationRequest:
        return replace(self, max_new_tokens=n)

    def ignoring_seed(self) -> GenerationRequest:
        return replace(self, seed=None)


@dataclass(frozen=True)
class Generation:
    """What a request produced, with how it was produced. `ref` and `replayed` are not part of the record."""

    request: GenerationRequest
    tokens: tuple[int, ...]  # generated tokens (prefix_ids included), not the prompt
    text: str
    finish_reason: str
    route: tuple[dict[str, Any], ...] = ()  # hops that served it: node_id, address, start, end
    step_seconds: tuple[float, ...] = ()  # wall time of each network step (prefill first)
    work: dict[str, int] = field(default_factory=dict)  # positions and block-positions computed remotely
    parent: str | None = None  # the generation this one reused or continued, if any
    created_at: float = 0.0
    # How node work was re-executed to check it: {"mode", "verified", "hops": [...], "liars", "evidence"}; empty
    # for records made before verification existed, and for replays (which keep their source's).
    verification: dict[str, Any] = field(default_factory=dict)
    ref: str = ""
    replayed: bool = False

    @property
    def verified(self) -> bool:
        """Every hop that produced it was re-executed on another node and matched."""
        return bool(self.verification.get("verified"))

    @property
    def request_ref(self) -> str:
        return self.request.ref

    def to_data(self) -> dict[str, Any]:
        return {
            "request": self.request_ref,
            "tokens": list(self.tokens),
            "text": self.text,
            "finish_reason": self.finish_reason,
            "route": list(self.route),
            "step_seconds": list(self.step_seconds),
            "work": dict(self.work),
            "parent": self.parent,
            "created_at": self.created_at,
            "verification": dict(self.verification),
        }

    def links(self) -> list[str]:
        return [self.request_ref] + ([self.parent] if self.parent else [])

    def encode(self) -> bytes:
        return encode_object(GENERATION_KIND, self.to_data(), links=self.links())

    @classmethod
    def from_data(cls, data: dict[str, Any], request: GenerationRequest, ref: str) -> Generation:
        return cls(
            request=request,
            tokens=tuple(data["tokens"]),
            text=data["text"],
            finish_reason=data["finish_reason"],
            route=tuple(data["route"]),
            step_seconds=tuple(data["step_seconds"]),
            work=dict(data["work"]),
            parent=data["parent"],
            created_at=data["created_at"],
            verification=dict(data.get("verification") or {}),
            ref=ref,
        )

    @property
    def total_work(self) -> int:
        return int(self.work.get("block_positions", 0))
