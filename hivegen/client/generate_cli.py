"""`hivegen generate`: one answer through the swarm, streamed to the terminal, recorded in the store; the same
command again is answered from the store before anything heavy is loaded (hivegen.client.shortcut)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Any, cast

from hivegen.client.params import CLI_NAMES, add_sampling_arguments, check_sampling
from hivegen.client.shortcut import command_key, deterministic, recorded_answer, remember
from hivegen.console import progress
from hivegen.credits.units import format_credits
from hivegen.errors import ModelLoadError
from hivegen.files import IDENTITY_DEFAULT, STORE_DEFAULT
from hivegen.model.demo import resolve_model_path
from hivegen.peers import add_coordinator_argument, add_peers_argument, check_peers
from hivegen.store.directory import open_store
from hivegen.store.inspect import verified_label
from hivegen.store.records import Generation


def cmd_generate(args: argparse.Namespace) -> int:
    check_sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, names=CLI_NAMES)  # fmt: skip
    check_peers(args.initial_peers)
    path = resolve_model_path(args.model)
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
                "top_p": args.top_p, "seed": args.seed}  # fmt: skip
    key = command_key(path, args.prompt, args.chat, sampling)
    fast = args.replay != "never" and deterministic(sampling)
    if fast and (answer := recorded_answer(open_store(args.store), key, args.replay == "verified")) is not None:
        print(answer.text, flush=True)
        summarize(replace(answer, replayed=True), 0)
        return 0
    generation, cost, charges, payer = _generate(args, path, sampling)
    if deterministic(sampling):
        remember(open_store(args.store), key, generation)
    summarize(generation, cost, charges, payer)
    return 0


def _generate(args: argparse.Namespace, path: Any, sampling: dict[str, Any]) -> tuple[Generation, int, dict, str]:
    """The full path: tokenizer, chat template, Client; the swarm is joined only if the store cannot answer."""
    from transformers import AutoTokenizer, BatchEncoding, TextStreamer

    from hivegen.client import Client

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ModelLoadError(
            f"{path} has no tokenizer that loads ({why}); `hivegen generate` needs one for --prompt: use a "
            "checkpoint with its tokenizer files"
        ) from None
    use_chat = args.chat if args.chat is not None else tokenizer.chat_template is not None
    if use_chat:
        # With return_dict=True this returns a BatchEncoding; transformers types it as a union of every mode.
        encoded = cast(BatchEncoding, tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, return_dict=True))  # fmt: skip
        prompt_ids = list(encoded["input_ids"])
    else:
        prompt_ids = list(tokenizer(args.prompt)["input_ids"])
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with Client(
        path, args.initial_peers, store=args.store, tokenizer=tokenizer, identity=args.identity,
        coordinator=args.coordinator, verify=args.verify, replay=args.replay, timeout=args.timeout,
    ) as client:  # fmt: skip
        request = client.request(prompt_ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, seed=args.seed)  # fmt: skip
        if client.stored_answer(request) is None:
            with progress("loading the model's local layers and joining the swarm"):
                _ = client.remote
        generation = client.generate(prompt_ids, streamer=streamer, **sampling)
        charges = client.remote.last_charges if client.last_cost else {}
        payer = client.identity.account if charges else ""
        return generation, client.last_cost, charges, payer


def summarize(generation: Generation, cost: int, charges: dict[str, int] | None = None, payer: str = "") -> None:
    """The line under the answer: how it ended, where it came from, what it cost, how it was verified, its ref."""
    source = "replayed from the store" if generation.replayed else f"{len(generation.step_seconds)} network steps"
    paid = ", ".join(f"{account}: {format_credits(units)}" for account, units in (charges or {}).items())
    spent = f"{format_credits(cost)} credits" + (f" paid by {payer} ({paid})" if paid else "")
    verified = verified_label(generation.verification)
    alone = sum(h.get("result") == "unverifiable" for h in generation.verification.get("hops", []))
    if alone:
        verified += f" ({alone} with no other node to re-run them)"
    print(f"[{generation.finish_reason}; {source}; cost {spent}; verified {verified}; ref {generation.ref[:16]}]",
          file=sys.stderr, flush=True)  # fmt: skip
    for liar in generation.verification.get("liars", []):
        print(f"[node {liar} was caught returning wrong hidden states: banned and regenerated without]",
              file=sys.stderr, flush=True)  # fmt: skip


def add_commands(commands: Any) -> None:
    """`hivegen generate` and its options."""
    gen = commands.add_parser("generate", help="generate text through the swarm, streamed to the terminal")
    gen.add_argument("--model", required=True, help="checkpoint directory, or a prepared demo model name")
    add_peers_argument(gen, required=True, help="DHT multiaddrs of the swarm")
    gen.add_argument("--prompt", required=True, help="the text to answer (or to continue, with --no-chat)")
    add_sampling_arguments(gen, max_new_tokens=64)
    gen.add_argument("--store", help=f"record the generation here {STORE_DEFAULT}")
    gen.add_argument("--identity", help=f"key file that pays nodes which charge {IDENTITY_DEFAULT}")
    add_coordinator_argument(gen, "HOST:PORT of the ledger: pays nodes and hears reports of lying ones")
    gen.add_argument("--verify", default="default",
                     help="re-run node work elsewhere: off, default (sampled), all, or a rate in [0, 1]")  # fmt: skip
    gen.add_argument("--replay", choices=["any", "verified", "never"], default="any",
                     help="which stored records may answer at once (default: any)")  # fmt: skip
    gen.add_argument("--timeout", type=float, help="seconds a node may take per step (default: from measurements)")
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                     help="wrap the prompt in the tokenizer's chat template (default: if it has one)")  # fmt: skip
    gen.set_defaults(handler=cmd_generate)
