"""The generation index: finds a recorded generation for a request, or the one to continue from.

Pointers (namespace: key -> value):
- `requests`: request ref -> generation ref (exact replay)
- `stem-<first 58 hex of the stem>`: generation ref -> generation ref, one namespace per stem (every output
  of a request whatever its max_new_tokens), so a look-up reads only that request's outputs
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from hivegen.store.backend import ObjectStore, StoreError
from hivegen.store.records import GENERATION_KIND, REQUEST_KIND, Generation, GenerationRequest

REQUESTS = "requests"
STEM_PREFIX = "stem-"


def stem_namespace(stem: str) -> str:
    """The pointer namespace of a stem (namespaces are at most 64 characters; 58 hex digits are 232 bits)."""
    return STEM_PREFIX + stem[:58]


@dataclass(frozen=True)
class Reuse:
    """How a request can use the store: `replay` a stored output (maybe truncated), `continue` one, or nothing."""

    mode: str  # "replay", "continue" or "none"
    source: Generation | None = None
    tokens: tuple[int, ...] = ()  # tokens to replay, or the stored prefix to continue from
    finish_reason: str = ""


class GenerationIndex:
    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def commit(self, generation: Generation) -> Generation:
        """Store the request and the generation, index both; return the generation with its ref."""
        self.store.put(generation.request.encode())
        ref = self.store.put(generation.encode())
        self.store.set_pointer(REQUESTS, generation.request_ref, ref)
        self.store.set_pointer(stem_namespace(generation.request.stem), ref, ref)
        return replace(generation, ref=ref)

    def load(self, ref: str) -> Generation:
        obj = self.store.get_object(ref)
        if obj.kind != GENERATION_KIND:
            raise StoreError(f"object {ref} is a {obj.kind!r}, not a generation")
        request_obj = self.store.get_object(obj.data["request"])
        if request_obj.kind != REQUEST_KIND:
            raise StoreError(f"generation {ref} points to a {request_obj.kind!r} instead of a request")
        return Generation.from_data(obj.data, GenerationRequest.from_data(request_obj.data), ref)

    def find(self, request: GenerationRequest) -> Generation | None:
        ref = self.store.get_pointer(REQUESTS, request.ref)
        return self.load(ref) if ref else None

    def same_stem(self, request: GenerationRequest) -> list[Generation]:
        stored = [self.load(ref) for ref in self.store.list_pointers(stem_namespace(request.stem)).values()]
        return [g for g in stored if g.request.stem == request.stem]

    def all_refs(self) -> set[str]:
        """Every indexed generation's ref."""
        refs = set(self.store.list_pointers(REQUESTS).values())
        for namespace in self.store.namespaces():
            if namespace.startswith(STEM_PREFIX):
                refs |= set(self.store.list_pointers(namespace).values())
        return refs

    def plan(self, request: GenerationRequest, accept: Callable[[Generation], bool] | None = None) -> Reuse:
        """The cheapest way to answer `request` from what is stored, using only records `accept` allows."""
        exact = self.find(request)
        if exact is not None and (accept is None or accept(exact)):
            return Reuse("replay", exact, exact.tokens, exact.finish_reason)
        wanted = request.max_new_tokens
        candidates = [g for g in self.same_stem(request) if accept is None or accept(g)]
        for stored in candidates:
            if len(stored.tokens) >= wanted:  # a longer run: its first `wanted` tokens are the answer
                reason = stored.finish_reason if len(stored.tokens) == wanted else "length"
                return Reuse("replay", stored, stored.tokens[:wanted], reason)
            if stored.finish_reason != "length":  # it ended (eos/stop) before reaching `wanted`
                return Reuse("replay", stored, stored.tokens, stored.finish_reason)
        shorter = [g for g in candidates if g.finish_reason == "length"]
        if shorter:
            longest = max(shorter, key=lambda g: len(g.tokens))
            return Reuse("continue", longest, longest.tokens)
        return Reuse("none")
