"""What the HTTP API serves, without HTTP: models, each behind one shared `Client`, and generations run on a
bounded pool of worker threads, their tokens handed to the event loop as text deltas."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from hivegen.api.streaming import ChoiceStreamer, TextStream
from hivegen.client.client import Client
from hivegen.client.sampling import MAX_SEED
from hivegen.errors import HivegenError, ModelLoadError
from hivegen.model.demo import DEMO_MODELS, resolve_model_path
from hivegen.store.records import Generation, GenerationRequest

DEFAULT_MAX_CONCURRENCY = 16  # generations running at once (each a session through the swarm)
DEFAULT_MAX_QUEUED = 64  # generations waiting for a worker; beyond this the server answers 429


class ServerBusy(HivegenError):
    """More generations are waiting than the server queues; the client should retry later."""


class UnknownModel(HivegenError):
    """The request names a model this server does not serve."""

    def __init__(self, name: str, served: Sequence[str]) -> None:
        self.name = name
        super().__init__(f"model {name!r} is not served here; this server serves: {', '.join(served)}")


@dataclass
class ServedModel:
    """One model behind the API: its `Client` and the names requests may use for it."""

    client: Client
    aliases: tuple[str, ...] = ()
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def id(self) -> str:
        return self.client.checkpoint.name

    @property
    def fingerprint(self) -> str:
        """The model ref: name and weights digest (what `system_fingerprint` carries)."""
        return f"{self.client.model_ref.name}@{self.client.model_ref.digest}"

    @property
    def context_length(self) -> int | None:
        value = getattr(self.client.checkpoint.text_config, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) and value > 0 else None


@dataclass(frozen=True)
class Choice:
    """One generation's outcome as the API reports it."""

    generation: Generation
    cost: int  # work units charged (0 for a replay)

    @property
    def finish_reason(self) -> str:
        return "length" if self.generation.finish_reason == "length" else "stop"


@dataclass(frozen=True)
class Event:
    """What a running choice tells the event loop: a text delta, its end, or its failure."""

    index: int
    delta: str = ""
    choice: Choice | None = None
    error: BaseException | None = None


@dataclass(frozen=True)
class ChoicePlan:
    """One choice to generate: its request (seed drawn), and whether the store answers it outright."""

    index: int
    request: GenerationRequest
    replayed: bool


class ApiService:
    """The models an API server serves, and the pool its generations run on."""

    def __init__(
        self,
        models: Sequence[ServedModel],
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> None:
        if not models:
            raise ValueError("serve at least one model")
        self.models = list(models)
        self.max_pending = max_concurrency + max_queued
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="hivegen-api")
        self._pending = 0
        self._lock = threading.Lock()
        self._same: dict[str, tuple[threading.Lock, int]] = {}  # request ref -> (lock, users): one run per request

    @classmethod
    def open(
        cls,
        specs: Sequence[str],
        initial_peers: Sequence[str],
        store: str | Path | None = None,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        **client_kwargs: Any,
    ) -> ApiService:
        """Load the local parts of each model (`--model` values: a directory or a demo model's name); the other
        keyword arguments go to each `Client`."""
        models = []
        for spec in specs:
            client = Client(spec, initial_peers, store=store, **client_kwargs)
            models.append(ServedModel(client, aliases=(spec,)))
        return cls(models, max_concurrency=max_concurrency)

    def model(self, name: str) -> ServedModel:
        """The served model a request names: by its id, by the `--model` value it was started with, or by the name
        of the demo model whose prepared directory it is (`smollm2`)."""
        for served in self.models:
            if name == served.id or name in served.aliases:
                return served
        try:
            path = resolve_model_path(name).resolve() if name.strip().lower() in DEMO_MODELS else None
        except ModelLoadError:
            path = None
        for served in self.models:
            if path is not None and served.client.path.resolve() == path:
                return served
        raise UnknownModel(name, [m.id for m in self.models])

    def plan(
        self, served: ServedModel, prompt_ids: Sequence[int], n: int, max_new_tokens: int, **sampling: Any
    ) -> list[ChoicePlan]:
        """The request of each of `n` choices: choice i samples with seed + i when a seed is given (so the whole
        request replays), with a seed of its own otherwise; greedy choices are one request, run once."""
        seed = sampling.pop("seed", None)
        plans = []
        for index in range(n):
            choice_seed = None if seed is None else (seed + index) % (MAX_SEED + 1)
            request = served.client.request(list(prompt_ids), max_new_tokens, seed=choice_seed, **sampling)
            if request.do_sample and request.seed is None:
                request = replace(request, seed=secrets.randbits(63))
            plans.append(ChoicePlan(index, request, served.client.stored_answer(request) is not None))
        return plans

    def start(
        self, served: ServedModel, plans: Sequence[ChoicePlan], loop: asyncio.AbstractEventLoop, stream: bool
    ) -> tuple[asyncio.Queue[Event], threading.Event]:
        """Run every planned choice on the pool; their events (text deltas too, with `stream`) arrive on the
        returned queue. Setting the returned event stops them at their next step (the HTTP client went away)."""
        with self._lock:
            if self._pending + len(plans) > self.max_pending:
                raise ServerBusy(f"{self._pending} generations are running or waiting; retry in a few seconds")
            self._pending += len(plans)
        events: asyncio.Queue[Event] = asyncio.Queue()
        cancelled = threading.Event()
        for plan in plans:
            self._pool.submit(self._run, served, plan, loop, events, cancelled, stream)
        return events, cancelled

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for served in self.models:
            served.client.close()

    def _run(
        self,
        served: ServedModel,
        plan: ChoicePlan,
        loop: asyncio.AbstractEventLoop,
        events: asyncio.Queue[Event],
        cancelled: threading.Event,
        stream: bool,
    ) -> None:
        def send(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: the server is stopping
                loop.call_soon_threadsafe(events.put_nowait, event)

        client = served.client
        streamer = None
        if stream:
            streamer = ChoiceStreamer(
                TextStream(client.decode, plan.request.stop), lambda delta: send(Event(plan.index, delta=delta)),
                cancelled, lambda error: send(Event(plan.index, error=error)),
            )  # fmt: skip
        try:
            with self._one_run_of(plan.request):
                if streamer is not None:
                    streamer.put(torch.tensor([plan.request.prompt_ids]))
                generation = client.run_request(plan.request, streamer=streamer)
                if streamer is not None:
                    if generation.replayed:
                        streamer.put(torch.tensor(generation.tokens, dtype=torch.long))
                    if streamer.retracted:
                        return  # the stream ended with the error; the corrected answer is stored
                    streamer.finish(generation.text)
                send(Event(plan.index, choice=Choice(generation, client.last_cost)))
        except Exception as exc:  # every failure goes to the request that caused it
            send(Event(plan.index, error=exc))
        finally:
            with self._lock:
                self._pending -= 1

    @contextlib.contextmanager
    def _one_run_of(self, request: GenerationRequest) -> Iterator[None]:
        """Identical deterministic requests run one at a time: the second is answered from the store."""
        if request.do_sample and request.seed is None:
            yield
            return
        key = request.ref
        with self._lock:
            lock, users = self._same.get(key, (threading.Lock(), 0))
            self._same[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._lock:
                lock, users = self._same[key]
                if users == 1:
                    del self._same[key]
                else:
                    self._same[key] = (lock, users - 1)
