"""Traces: journaled flows of generations. Replaying one returns the recorded outputs for the calls
that match in order, so only new or changed calls reach the swarm."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from hivegen.errors import TraceDivergenceError
from hivegen.store.encoding import is_ref
from hivegen.store.records import TRACE_KIND, Generation, GenerationRequest

if TYPE_CHECKING:
    from hivegen.client.client import Client

TRACES = "traces"  # pointer namespace: trace name -> latest trace ref


@dataclass(frozen=True)
class TraceCall:
    request: str  # request ref
    generation: str  # generation ref


class TraceRecorder:
    """`with client.trace(name, replay=ref) as t:` — records each generate() inside the block, in order."""

    def __init__(self, client: Client, name: str, replay: str | None = None, strict: bool = False) -> None:
        self.client = client
        self.name = name
        self.strict = strict
        self.replay_of = replay
        self.recorded: list[TraceCall] = load_trace(client, replay) if replay else []
        self.calls: list[Generation] = []
        self.diverged_at: int | None = None
        self.ref = ""

    def __enter__(self) -> TraceRecorder:
        if self.client._trace is not None:
            raise RuntimeError("traces do not nest: leave the current `client.trace(...)` block first")
        self.client._trace = self
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.client._trace = None
        if exc_type is None or self.calls:
            self.commit()

    def call(self, request: GenerationRequest, run: Callable[[GenerationRequest], Generation]) -> Generation:
        index = len(self.calls)
        if self.diverged_at is None and index < len(self.recorded):
            recorded = self.client.index.load(self.recorded[index].generation)
            if _matches(request, recorded.request):
                generation = replace(recorded, replayed=True)
                self.calls.append(generation)
                return generation
            self.diverged_at = index
            if self.strict:
                raise TraceDivergenceError(self.name, index, _difference(request, recorded.request))
        generation = run(request)
        self.calls.append(generation)
        return generation

    def commit(self) -> str:
        """Store the trace object and point `traces/<name>` at it; returns its ref."""
        calls = [{"request": g.request_ref, "generation": g.ref} for g in self.calls]
        data: dict[str, Any] = {"name": self.name, "calls": calls, "replay_of": self.replay_of}
        links = [c["generation"] for c in calls] + [c["request"] for c in calls]
        self.ref = self.client.store.put_object(TRACE_KIND, data, links=links)
        self.client.store.set_pointer(TRACES, _pointer_key(self.name), self.ref)
        return self.ref

    def rewind(self, n: int) -> str:
        """Drop the last n calls and commit, so a replay of the returned ref generates them anew."""
        if not 0 <= n <= len(self.calls):
            raise ValueError(f"cannot rewind {n} calls of a trace with {len(self.calls)}")
        self.calls = self.calls[: len(self.calls) - n]
        return self.commit()


def load_trace(client: Client, ref_or_name: str) -> list[TraceCall]:
    """The calls of a trace, given its ref or its name."""
    ref = ref_or_name if is_ref(ref_or_name) else client.store.get_pointer(TRACES, _pointer_key(ref_or_name))
    if not ref:
        raise ValueError(f"no trace named {ref_or_name!r} in {client.store.location}")
    obj = client.store.get_object(ref)
    if obj.kind != TRACE_KIND:
        raise ValueError(f"object {ref} is a {obj.kind!r}, not a trace")
    return [TraceCall(c["request"], c["generation"]) for c in obj.data["calls"]]


def _matches(new: GenerationRequest, recorded: GenerationRequest) -> bool:
    """Same call: equal requests, where a call that left its seed to chance takes the recorded seed."""
    if new.seed is None and new.do_sample:
        return new.ignoring_seed() == recorded.ignoring_seed()
    return new == recorded


def _difference(new: GenerationRequest, recorded: GenerationRequest) -> str:
    changed = [f.name for f in fields(GenerationRequest) if getattr(new, f.name) != getattr(recorded, f.name)]
    if new.seed is None and new.do_sample and "seed" in changed:
        changed.remove("seed")
    return "changed " + ", ".join(changed)


def _pointer_key(name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name).lstrip("._-")
    if not safe:
        raise ValueError(f"trace name {name!r} needs at least one letter or digit")
    return safe[:200]
