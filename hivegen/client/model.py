"""RemoteModelForCausalLM: a Hugging Face-style model whose blocks run on the swarm."""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Generator, Sequence
from pathlib import Path
from typing import Any, Protocol

import hivemind
import torch
from transformers import GenerationConfig

from hivegen.client.bans import BanList
from hivegen.client.payer import Payer
from hivegen.client.routing import Hop, RoutingCosts
from hivegen.client.sampling import SamplingParams, choose_next
from hivegen.client.session import FAILOVER_SECONDS, InferenceSession, StepTiming
from hivegen.client.swarm import SwarmView
from hivegen.client.verification import VerificationReport, VerifyPolicy
from hivegen.client.verify import Reporter, Verifier
from hivegen.credits.identity import Identity
from hivegen.errors import GenerationRetracted, VerificationError
from hivegen.model.checkpoint import ModelCheckpoint
from hivegen.model.demo import resolve_model_path
from hivegen.model.head import Blocks, ClientHead, position_ids_from_mask
from hivegen.proto.tensors import dtype_from_name


class Streamer(Protocol):
    """What transformers' streamers implement: the prompt first, then each new token, then end()."""

    def put(self, value: torch.Tensor) -> None: ...

    def end(self) -> None: ...


MAX_RETRACTIONS = 4  # regenerations after proven lies in one generate() (each bans at least one node)


class RemoteModelForCausalLM:
    """Embeddings, final norm and LM head run here; every decoder block runs on remote nodes.

    Nodes' answers are checked as they arrive, and re-executed on other nodes as `verifier.policy` says once
    a generation ends; `timeout` fixes the step deadline (default: from measurements of each node).
    """

    def __init__(
        self,
        checkpoint: ModelCheckpoint,
        head: ClientHead,
        swarm: SwarmView,
        payer: Payer | None = None,
        verifier: Verifier | None = None,
        timeout: float | None = None,
        failover_seconds: float = FAILOVER_SECONDS,
    ) -> None:
        self.checkpoint = checkpoint
        self.payer = payer
        self.verifier = verifier if verifier is not None else Verifier(VerifyPolicy())
        self.timeout = timeout
        self.failover_seconds = failover_seconds
        self.config = checkpoint.config
        self.head = head
        self.swarm = swarm
        self.model_key = checkpoint.model_key
        try:
            self.generation_config = GenerationConfig.from_pretrained(checkpoint.path)
        except OSError:
            self.generation_config = GenerationConfig.from_model_config(checkpoint.config)
        self._last = threading.local()  # last_*: each thread sees its own generations (one model, many users)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        initial_peers: Sequence[str] = (),
        *,
        dtype: str | torch.dtype | None = None,
        device: str = "cpu",
        dht: hivemind.DHT | None = None,
        allowed_nodes: Collection[str] | None = None,
        costs: RoutingCosts | None = None,
        route_wait: float = 10.0,
        heal_wait: float = 0.0,
        spans_ttl: float = 5.0,
        identity: Identity | str | Path | None = None,
        verify: VerifyPolicy | str | float | bool | None = None,
        timeout: float | None = None,
        failover_seconds: float = FAILOVER_SECONDS,
        bans: BanList | str | Path | None = None,
        coordinator: str | None = None,
    ) -> RemoteModelForCausalLM:
        """Load only the local parts of the checkpoint in `path` (or of a prepared demo model: "smollm2") and join
        the swarm via `initial_peers`.

        Nodes that charge credits are paid with receipts signed by `identity` (an Identity or a key file;
        default: ~/.hivegen/identity, created on first use).

        `verify` says how much node work is re-executed on other nodes: "off", None (the default sampling),
        a rate in [0, 1], or "all". Nodes caught lying are banned in `bans` (a BanList or a JSON file; default
        ~/.hivegen/banned-nodes.json) and reported to `coordinator` (HOST:PORT) with evidence. `timeout` fixes
        the seconds a node may take per step (default: 10x its measured step time, at least 2 s);
        `failover_seconds` bounds how long one step keeps routing around failed nodes. `route_wait` is how long
        a generation waits for blocks nobody serves yet (nodes starting); `heal_wait`, how long it waits, after a
        node failed, for its blocks to be served again when no other node serves them (a node placed automatically
        moves there); 0 reports them missing at once.
        """
        checkpoint = ModelCheckpoint.open(resolve_model_path(str(path)))  # a directory, or a demo name: "smollm2"
        if isinstance(dtype, str):
            dtype = dtype_from_name(dtype)
        head = ClientHead(checkpoint, dtype=dtype or checkpoint.default_dtype(device), device=device)
        if not isinstance(bans, BanList):
            bans = BanList.default() if bans is None else BanList(Path(bans))
        swarm = SwarmView(
            checkpoint.model_key,
            checkpoint.num_blocks,
            initial_peers,
            hidden_size=int(checkpoint.config.hidden_size),
            dht=dht,
            costs=costs,
            allowed_nodes=allowed_nodes,
            route_wait=route_wait,
            heal_wait=heal_wait,
            spans_ttl=spans_ttl,
            bans=bans,
        )
        payer = Payer(checkpoint.model_key, head.skeleton.block_parameters(), identity)
        reporter = _coordinator_reporter(coordinator, payer) if coordinator else None
        verifier = Verifier(VerifyPolicy.parse(verify), report=reporter)
        return cls(checkpoint, head, swarm, payer, verifier, timeout=timeout, failover_seconds=failover_seconds)

    @property
    def last_route(self) -> list[Hop]:
        """The chain of nodes of this thread's last generation (as it ended, after any fail-over)."""
        return getattr(self._last, "route", [])

    @last_route.setter
    def last_route(self, route: list[Hop]) -> None:
        self._last.route = route

    @property
    def last_timings(self) -> list[StepTiming]:
        """The steps of this thread's last generation, timed."""
        return getattr(self._last, "timings", [])

    @last_timings.setter
    def last_timings(self, timings: list[StepTiming]) -> None:
        self._last.timings = timings

    @property
    def last_charges(self) -> dict[str, int]:
        """Node account -> work units signed for, in this thread's last generation."""
        return getattr(self._last, "charges", {})

    @last_charges.setter
    def last_charges(self, charges: dict[str, int]) -> None:
        self._last.charges = charges

    @property
    def last_verification(self) -> VerificationReport:
        """What verification found in this thread's last generation."""
        report = getattr(self._last, "verification", None)
        return report if report is not None else VerificationReport(self.verifier.policy.mode)

    @last_verification.setter
    def last_verification(self, report: VerificationReport) -> None:
        self._last.verification = report

    @property
    def last_cost(self) -> int:
        """Work units the last generation's receipts let nodes collect (0 when every node served for free)."""
        return sum(self.last_charges.values())

    def inference_session(self, max_length: int, batch_size: int = 1, timeout: float | None = None) -> InferenceSession:
        """A session through every block; `timeout` (default: the model's) fixes the seconds a node may take per
        step, else each node's deadline comes from the client's measurements of it."""
        return InferenceSession(
            self.swarm,
            max_length=max_length,
            batch_size=batch_size,
            payer=self.payer,
            timeout=self.timeout if timeout is None else timeout,
            failover_seconds=self.failover_seconds,
            attest=self.verifier.policy.enabled,
            on_fault=self.verifier.convict_fault,
        )

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        streamer: Streamer | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Like transformers' generate: returns [batch, prompt + new] token ids, finished rows padded.

        Tokens that verification retracts (a node was caught lying) are generated again without the liar; a
        streamer has already been shown them, so it gets the prompt and every token again after a retraction.
        """
        if streamer is not None:
            streamer.put(input_ids.cpu())
        new: list[torch.Tensor] = []

        def on_token(tokens: torch.Tensor) -> None:
            new.append(tokens)
            if streamer is not None:
                streamer.put(tokens.cpu())

        def on_retract(valid: int) -> None:
            del new[valid:]
            if streamer is not None:  # start over: the prompt and the tokens that stand
                streamer.put(input_ids.cpu())
                for tokens in new:
                    streamer.put(tokens.cpu())

        self.generate_checked(input_ids, attention_mask, max_new_tokens, on_token, on_retract, **kwargs)
        if streamer is not None:
            streamer.end()
        if not new:
            return input_ids
        return torch.cat([input_ids.cpu(), torch.stack(new, dim=1)], dim=1)

    def generate_checked(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        max_new_tokens: int,
        on_token: Callable[[torch.Tensor], None],
        on_retract: Callable[[int], None],
        *,
        generated: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> VerificationReport:
        """Run generate_stream to its end, regenerating whatever verification retracts.

        `on_token` gets each step's tokens; `on_retract(n)` says that only the first n generated tokens
        (counting `generated`) stand, and generation resumes after them. Returns what verification found over
        every run (also in `last_verification`); `last_charges` sums the work units of every run.
        """
        kept: list[torch.Tensor] = [] if generated is None else list(generated.unbind(dim=1))
        report = VerificationReport(self.verifier.policy.mode)
        charges: dict[str, int] = {}
        try:
            for _ in range(MAX_RETRACTIONS + 1):
                prefix = torch.stack(kept, dim=1) if kept else None
                try:
                    for tokens in self.generate_stream(input_ids, attention_mask, max_new_tokens, generated=prefix,
                                                       **kwargs):  # fmt: skip
                        kept.append(tokens)
                        on_token(tokens)
                except GenerationRetracted as exc:
                    report.merge(self.last_verification)
                    del kept[exc.valid_tokens :]
                    on_retract(exc.valid_tokens)
                    continue
                finally:
                    for account, credits in self.last_charges.items():
                        charges[account] = charges.get(account, 0) + credits
                report.merge(self.last_verification)
                return report
            raise VerificationError(
                f"generation retracted {MAX_RETRACTIONS + 1} times: too many lying nodes ({', '.join(report.liars)})",
                report.liars,
            )
        finally:
            self.last_charges = charges
            self.last_verification = report

    def generate_stream(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        *,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        generated: torch.Tensor | None = None,
        stop: Callable[[torch.Tensor], bool] | None = None,
        timeout: float | None = None,
    ) -> Generator[torch.Tensor, None, None]:
        """Yield the next token of every row, one step at a time ([batch] tensors).

        `generated` [batch, k] continues a run that already produced k of the max_new_tokens: one
        prefill of prompt + those tokens, then sampling resumes at position k exactly as an
        uninterrupted run would have (the sampler is keyed by seed and position). `stop(tokens)`, called after
        each step's tokens are yielded, ends the generation early when it returns True. `timeout` fixes the
        seconds a node may take per step (default: 10x its measured step time, at least 2 s).

        When the generation ends (not when the caller closes the generator early), the verifier re-executes
        hops as its policy says, before the nodes are paid; if it proves that a node lied, the generator raises
        GenerationRetracted naming how many tokens stand (`generate` resumes from there by itself).
        """
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, length>0], got shape {list(input_ids.shape)}")
        if max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(torch.int64)
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {list(mask.shape)} differs from input_ids {list(input_ids.shape)}")
        if bool((mask[:, -1] == 0).any()):
            raise ValueError("a row ends with padding: pad prompts on the left (tokenizer.padding_side = 'left')")
        params = self._sampling_params(do_sample, temperature, top_k, top_p, seed)
        eos = self._eos_ids(eos_token_id)
        pad = pad_token_id if pad_token_id is not None else self.generation_config.pad_token_id
        pad = pad if pad is not None else (eos[0] if eos else 0)
        self.last_route, self.last_timings, self.last_charges = [], [], {}
        self.last_verification = VerificationReport(self.verifier.policy.mode)
        done = 0 if generated is None else int(generated.shape[1])
        if generated is not None and (generated.ndim != 2 or generated.shape[0] != input_ids.shape[0]):
            raise ValueError(f"generated must be [batch, k], got shape {list(generated.shape)}")
        if done >= max_new_tokens:
            return
        batch, prompt_len = input_ids.shape
        if generated is not None:
            input_ids = torch.cat([input_ids, generated.to(input_ids.dtype)], dim=1)
            mask = torch.cat([mask, torch.ones_like(generated, dtype=torch.int64)], dim=1)
        positions = position_ids_from_mask(mask)
        step_ids = input_ids
        step_mask = mask
        unfinished = torch.ones(batch, dtype=torch.bool)
        eos_tensor = torch.tensor(eos, dtype=torch.long)
        session = self.inference_session(prompt_len + max_new_tokens, batch, timeout)
        try:
            self.last_route = session.route
            self.last_timings = session.timings
            for index in range(done, max_new_tokens):
                logits = self.head.step(step_ids, positions, _through(session, positions, step_mask))
                tokens = choose_next(logits, params, index).cpu()
                if eos:
                    tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad))
                    unfinished &= ~torch.isin(tokens, eos_tensor)
                self.last_route = session.route
                yield tokens
                if not bool(unfinished.any()) or index + 1 == max_new_tokens or (stop is not None and stop(tokens)):
                    break
                positions = positions[:, -1:] + 1
                step_mask = torch.ones((batch, 1), dtype=torch.int64)
                step_ids = tokens[:, None]
            report = self.verifier.verify(session)  # before the nodes are paid: liars are not
            self.last_verification = report
            if report.first_bad_step is not None:
                raise GenerationRetracted(done + report.first_bad_step, report.liars)
        finally:
            session.close()  # settles with the nodes that charge
            self.last_charges = session.charges

    def close(self) -> None:
        self.verifier.close()  # reports of liars still on their way
        self.swarm.close()

    def __enter__(self) -> RemoteModelForCausalLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _sampling_params(
        self,
        do_sample: bool | None,
        temperature: float | None,
        top_k: int | None,
        top_p: float | None,
        seed: int | None,
    ) -> SamplingParams:
        gc = self.generation_config
        return SamplingParams(
            do_sample=bool(gc.do_sample) if do_sample is None else do_sample,
            temperature=float(temperature if temperature is not None else (gc.temperature or 1.0)),
            top_k=top_k if top_k is not None else (gc.top_k if gc.do_sample else None),
            top_p=top_p if top_p is not None else (gc.top_p if gc.do_sample else None),
            seed=seed,
        ).with_seed()

    def _eos_ids(self, eos_token_id: int | Sequence[int] | None) -> list[int]:
        eos = eos_token_id if eos_token_id is not None else self.generation_config.eos_token_id
        if eos is None:
            return []
        return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def _through(session: InferenceSession, positions: torch.Tensor, mask: torch.Tensor) -> Blocks:
    """The blocks of one step: the session's chain of nodes, at these positions under this padding mask."""
    return lambda hidden: session.step(hidden, positions, mask)


def _coordinator_reporter(coordinator: str, payer: Payer) -> Reporter:
    """Send evidence against lying nodes to the coordinator, signed by the client's identity."""
    from hivegen.coordinator.client import report_node

    def report(evidence: Any) -> None:
        report_node(coordinator, payer.identity, evidence)

    return report
