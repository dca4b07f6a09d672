"""Client: generations as records. Every generation is committed to a content-addressed store, and
a request the store can answer (exactly, as a prefix, or by continuing a shorter run) spends no
more of the swarm's compute than it must. A record says how the nodes' work behind it was verified; a
generation whose verification failed is never committed."""

from __future__ import annotations

import functools
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, cast

import torch
from transformers import AutoTokenizer, BatchEncoding, GenerationConfig, PreTrainedTokenizerBase

from hivegen.client.model import RemoteModelForCausalLM, Streamer
from hivegen.client.params import check_sampling
from hivegen.client.trace import TraceRecorder
from hivegen.coordinator.client import LedgerClient, open_account
from hivegen.credits.identity import Identity
from hivegen.errors import CreditsError, InvalidParameterError
from hivegen.model.checkpoint import ModelCheckpoint
from hivegen.model.demo import resolve_model_path
from hivegen.store.backend import ObjectStore
from hivegen.store.directory import open_store
from hivegen.store.index import GenerationIndex
from hivegen.store.records import Generation, GenerationRequest, ModelRef

REPLAY_POLICIES = ("any", "verified", "never")


class Client:
    """Generate through the swarm with records: `generate`, `resample`, `trace`."""

    def __init__(
        self,
        model: str | Path,
        initial_peers: Sequence[str] = (),
        store: ObjectStore | str | Path | None = None,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        eos_token_ids: Sequence[int] | None = None,
        identity: Identity | str | Path | None = None,
        coordinator: str | None = None,
        verify: Any = None,
        replay: str = "any",
        timeout: float | None = None,
        **remote_kwargs: Any,
    ) -> None:
        """`identity` (an Identity or key file; default ~/.hivegen/identity) signs the receipts that pay nodes
        which charge credits; `coordinator` (HOST:PORT of the ledger) lets `balance()` read what is left and
        receives reports of nodes caught lying.

        `verify` ("off", None for the default sampling, a rate in [0, 1], or "all") says how much node work is
        re-executed on other nodes; `replay` says which records may answer a request: "any", "verified" (only
        records whose every hop was re-executed and matched) or "never"; `timeout` fixes the seconds a node
        may take per step (default: 10x its measured step time, at least 2 s). Other keyword arguments go to
        RemoteModelForCausalLM.from_pretrained."""
        if replay not in REPLAY_POLICIES:
            raise ValueError(f"replay must be one of {REPLAY_POLICIES}, not {replay!r}")
        self.replay = replay
        self.path = resolve_model_path(str(model))
        self.checkpoint = ModelCheckpoint.open(self.path)
        self.model_ref = ModelRef(self.checkpoint.name, self.checkpoint.digest)
        self.store = open_store(store)
        self.index = GenerationIndex(self.store)
        self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(self.path)
        self.initial_peers = list(initial_peers)
        self._remote_kwargs = {**remote_kwargs, "identity": identity, "coordinator": coordinator, "verify": verify,
                               "timeout": timeout}  # fmt: skip
        self.coordinator = coordinator
        self._last = threading.local()  # last_cost per thread: one Client may serve concurrent requests
        self._remote: RemoteModelForCausalLM | None = None  # joined only when the network is needed
        self._remote_lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer refuses concurrent use ("Already borrowed")
        self._trace: TraceRecorder | None = None
        try:
            config = GenerationConfig.from_pretrained(self.path)
        except OSError:
            config = GenerationConfig.from_model_config(self.checkpoint.config)
        eos = config.eos_token_id if eos_token_ids is None else list(eos_token_ids)  # () disables eos
        self.eos_token_ids: tuple[int, ...] = () if eos is None else tuple([eos] if isinstance(eos, int) else eos)

    @property
    def last_cost(self) -> int:
        """Work units this thread's last generate/resample/run_request signed for (0 for a replay)."""
        return int(getattr(self._last, "cost", 0))

    @last_cost.setter
    def last_cost(self, units: int) -> None:
        self._last.cost = units

    @property
    def remote(self) -> RemoteModelForCausalLM:
        """The swarm side, joined on first use (a replay never needs it)."""
        with self._remote_lock:
            if self._remote is None:
                self._remote = RemoteModelForCausalLM.from_pretrained(
                    self.path, self.initial_peers, **self._remote_kwargs
                )
            return self._remote

    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 32,
        *,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        streamer: Streamer | None = None,
        timeout: float | None = None,
    ) -> Generation:
        """Generate (greedy unless a temperature > 0 is given) and commit the record; replay when possible.

        `streamer` (transformers' protocol) gets the prompt, then each token as it is chosen or replayed; if
        verification retracts tokens (a node was caught lying), it gets the prompt and the tokens that stand
        again, then the rest. `timeout` fixes the seconds a node may take per step for this generation.
        """
        request = self.request(prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                               stop=stop)  # fmt: skip
        if streamer is not None:
            streamer.put(torch.tensor([request.prompt_ids]))
        run = functools.partial(self.run_request, streamer=streamer, timeout=timeout)
        self.last_cost = 0  # a call a trace replays never reaches run_request
        generation = self._trace.call(request, run) if self._trace is not None else run(request)
        if streamer is not None:
            if generation.replayed:
                streamer.put(torch.tensor(generation.tokens))
            streamer.end()
        return generation

    def request(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int,
        *,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> GenerationRequest:
        """The request `generate` would make (its seed stays None until a run draws one)."""
        check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                       stop=stop)  # fmt: skip
        if stop and self.tokenizer is None:
            raise ValueError(f"stop strings need a tokenizer, and {self.path} has none; pass tokenizer=...")
        do_sample = temperature is not None and temperature > 0
        return GenerationRequest(
            model=self.model_ref,
            prompt_ids=tuple(self.encode(prompt)),
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=float(temperature) if do_sample and temperature is not None else 1.0,
            top_k=top_k if do_sample else None,
            top_p=top_p if do_sample else None,
            seed=seed if do_sample else None,
            stop=tuple(stop),
            eos_token_ids=self.eos_token_ids,
        )

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a conversation through the tokenizer's chat template, ready for the assistant's turn."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise InvalidParameterError(
                "messages", f"{self.checkpoint.name} has no chat template; send a plain prompt (/v1/completions)"
            )
        with self._tokenizer_lock:
            encoded = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, return_dict=True)
        return [int(t) for t in cast(BatchEncoding, encoded)["input_ids"]]

    def stored_answer(self, request: GenerationRequest) -> Generation | None:
        """The stored generation that would answer `request` outright (a replay, no node), if there is one now."""
        if request.do_sample and request.seed is None:
            return None
        reuse = self.index.plan(request, accept=self._replayable)
        return reuse.source if reuse.mode == "replay" else None

    def resample(
        self, ref: str, from_token: int, seed: int | None = None, temperature: float | None = None
    ) -> Generation:
        """Keep the first `from_token` tokens of generation `ref` and sample the rest anew (one prefill)."""
        source = self.index.load(ref)
        if not 0 <= from_token <= len(source.tokens):
            raise ValueError(f"from_token must be in 0..{len(source.tokens)} (the generation's length)")
        request = source.request
        if temperature is not None:
            request = replace(request, do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0)
        if not request.do_sample:
            raise ValueError("resampling a greedy generation gives the same tokens; pass a temperature > 0")
        request = replace(request, prefix_ids=tuple(source.tokens[:from_token]), seed=seed)
        return self.run_request(request, parent=source.ref)

    def trace(self, name: str, replay: str | None = None, strict: bool = False) -> TraceRecorder:
        """Record the generations made inside `with client.trace(name) as t:`; replay a recorded trace."""
        return TraceRecorder(self, name, replay=replay, strict=strict)

    def run_request(
        self,
        request: GenerationRequest,
        parent: str | None = None,
        streamer: Streamer | None = None,
        timeout: float | None = None,
    ) -> Generation:
        """Answer `request` from the store if it can, else from the swarm; commit and return the record."""
        if request.do_sample and request.seed is None:
            request = replace(request, seed=secrets.randbits(63))
        self.last_cost = 0
        reuse = self.index.plan(request, accept=self._replayable)
        if reuse.mode == "replay" and reuse.source is not None:
            source = reuse.source
            if source.request_ref == request.ref:
                return replace(source, replayed=True)
            record = Generation(request, reuse.tokens, self._text(reuse.tokens, request), reuse.finish_reason,
                                parent=source.ref, created_at=time.time(),
                                verification=source.verification)  # fmt: skip
            return replace(self.index.commit(record), replayed=True)
        if reuse.mode == "continue" and reuse.source is not None:
            generated = self._run(request, reuse.tokens, reuse.source.ref, streamer, timeout)
            return self.index.commit(_inherit(generated, reuse.source))
        generated = self._run(request, request.prefix_ids, parent, streamer, timeout)
        if request.prefix_ids and parent:  # a resample: its first tokens are the parent's
            generated = _inherit(generated, self.index.load(parent))
        return self.index.commit(generated)

    def _replayable(self, generation: Generation) -> bool:
        """Whether the replay policy lets `generation` answer a request."""
        return self.replay == "any" or (self.replay == "verified" and generation.verified)

    @property
    def identity(self) -> Identity:
        """The identity that pays (loaded, or created, on first use)."""
        return self.remote.payer.identity if self.remote.payer is not None else Identity.load_or_create()

    def balance(self) -> int:
        """This client's balance in work units (hivegen.credits.units.format_credits shows it in credits) on the
        coordinator's ledger; a new account is opened, claiming its starter grant (solving its proof of work)."""
        if not self.coordinator:
            raise CreditsError("no coordinator: pass Client(..., coordinator='HOST:PORT') to read the balance")
        with LedgerClient(self.coordinator) as ledger:
            return open_account(ledger, self.identity)

    def close(self) -> None:
        if self._remote is not None:
            self._remote.close()
            self._remote = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(
        self,
        request: GenerationRequest,
        generated: Sequence[int],
        parent: str | None,
        streamer: Streamer | None,
        timeout: float | None = None,
    ) -> Generation:
        remote = self.remote
        tokens = list(generated)
        if streamer is not None and tokens:
            streamer.put(torch.tensor(tokens))

        def on_token(token: torch.Tensor) -> None:
            tokens.append(int(token))
            if streamer is not None:
                streamer.put(token)

        def on_retract(valid: int) -> None:
            del tokens[valid:]
            if streamer is not None:  # what was shown is void: show the prompt and the tokens that stand again
                streamer.put(torch.tensor(request.prompt_ids))
                streamer.put(torch.tensor(tokens))

        def stop(_: torch.Tensor) -> bool:
            if tokens[-1] in request.eos_token_ids:
                return True
            return bool(request.stop) and self._stop_index(tokens, request) is not None

        report = remote.generate_checked(
            torch.tensor([request.prompt_ids]),
            None,
            request.max_new_tokens,
            on_token,
            on_retract,
            generated=torch.tensor([tokens]) if tokens else None,
            do_sample=request.do_sample,
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            seed=request.seed,
            eos_token_id=list(request.eos_token_ids),
            stop=stop,
            timeout=timeout,
        )
        finish = "length"
        if tokens and tokens[-1] in request.eos_token_ids:
            finish = "eos"
        elif request.stop and self._stop_index(tokens, request) is not None:
            finish = "stop"
        self.last_cost = remote.last_cost
        steps = [t.seconds for t in remote.last_timings]
        positions = len(request.prompt_ids) + len(generated) + max(0, len(steps) - 1)
        return Generation(
            request=request,
            tokens=tuple(tokens),
            text=self._text(tokens, request),
            finish_reason=finish,
            route=tuple(asdict(hop) for hop in remote.last_route),
            step_seconds=tuple(steps),
            work={"positions": positions if steps else 0,
                  "block_positions": (positions if steps else 0) * self.checkpoint.num_blocks},
            parent=parent,
            created_at=time.time(),
            verification=report.to_record(),
        )  # fmt: skip

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt (a string through the tokenizer, or ids as given); safe from many threads."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.path} has no tokenizer: pass the prompt as token ids")
            with self._tokenizer_lock:
                return list(self.tokenizer(prompt)["input_ids"])
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        return ids

    def decode(self, tokens: Sequence[int]) -> str:
        """The text of generated tokens, special tokens left out ("" without a tokenizer); safe from many threads."""
        if self.tokenizer is None:
            return ""
        with self._tokenizer_lock:
            return str(self.tokenizer.decode(list(tokens), skip_special_tokens=True))

    def _stop_index(self, tokens: Sequence[int], request: GenerationRequest) -> int | None:
        text = self.decode(tokens)
        hits = [text.find(s) for s in request.stop if s and s in text]
        return min(hits) if hits else None

    def _text(self, tokens: Sequence[int], request: GenerationRequest) -> str:
        """The decoded output, cut before the first stop string."""
        text = self.decode(tokens)
        cut = self._stop_index(tokens, request) if request.stop else None
        return text if cut is None else text[:cut]


def _inherit(generation: Generation, source: Generation) -> Generation:
    """A generation whose first tokens came from `source` is verified only as far as `source` was."""
    if source.verified or not generation.verification:
        return generation
    return replace(generation, verification={**generation.verification, "verified": False, "prefix_of": source.ref})


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase | None:
    try:
        return AutoTokenizer.from_pretrained(path)  # type: ignore[no-any-return]
    except (OSError, ValueError, KeyError, TypeError):
        return None
