"""`hivegen chat`: a multi-turn conversation in the terminal, each answer streamed as the swarm generates it.

The history goes through the model's chat template on every turn, so the model sees the whole conversation; each
turn is an ordinary recorded generation (the same conversation again, greedy or seeded, replays from the store)."""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from hivegen.client.params import CLI_NAMES, add_sampling_arguments, check_sampling
from hivegen.files import IDENTITY_DEFAULT, STORE_DEFAULT
from hivegen.peers import add_coordinator_argument, add_peers_argument, check_peers

COMMANDS = {"/reset": "forget the conversation (keeps --system)", "/exit": "leave (so do Ctrl-D and Ctrl-C)",
            "/help": "this list"}  # fmt: skip


@dataclass
class Conversation:
    """The messages so far, and how each answer is sampled."""

    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []


def reply(client: Any, conversation: Conversation, text: str, on_delta: Callable[[str], None], **sampling: Any) -> str:
    """Add the user's `text`, generate the answer (streaming its text to `on_delta`), add it, and return it."""
    from hivegen.api.streaming import ChoiceStreamer, TextStream

    conversation.messages.append({"role": "user", "content": text})
    try:
        prompt = client.encode_chat(conversation.messages)
        stream = TextStream(client.decode, sampling.get("stop", ()))
        streamer = ChoiceStreamer(stream, on_delta, threading.Event(), lambda _: None)
        generation = client.generate(prompt, streamer=streamer, **sampling)  # a replay streams its tokens at once
        if streamer.retracted:  # verification voided text already shown: show the corrected answer whole
            on_delta("\n(a node was caught lying; part of this answer was wrong. The corrected answer:)\n")
            on_delta(generation.text)
        else:
            streamer.finish(generation.text)
    except BaseException:
        conversation.messages.pop()  # the turn did not happen
        raise
    conversation.messages.append({"role": "assistant", "content": generation.text})
    return str(generation.text)


def cmd_chat(args: argparse.Namespace) -> int:
    check_sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, seed=args.seed, names=CLI_NAMES)  # fmt: skip
    check_peers(args.initial_peers)
    from hivegen.client import Client

    out: TextIO = sys.stdout
    print("loading the model's local layers and joining the swarm ...", file=sys.stderr, flush=True)
    with Client(
        args.model, args.initial_peers, store=args.store, identity=args.identity, coordinator=args.coordinator,
        verify=args.verify,
    ) as client:  # fmt: skip
        client.encode_chat([{"role": "user", "content": "hi"}])  # no chat template: say so before the first turn
        _ = client.remote
        conversation = Conversation(system=args.system)
        sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                    "top_k": args.top_k, "seed": args.seed}  # fmt: skip
        print(f"chatting with {client.checkpoint.name}; /help lists commands, /exit leaves", file=sys.stderr)
        while True:
            try:
                line = input("you> " if sys.stdin.isatty() else "")
            except (EOFError, KeyboardInterrupt):
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                conversation.reset()
                print("(conversation reset)", file=sys.stderr, flush=True)
                continue
            if text == "/help" or (text.startswith("/") and " " not in text):
                for name, what in COMMANDS.items():
                    print(f"  {name:7} {what}", file=sys.stderr)
                continue
            out.write("assistant> ")

            def show(delta: str) -> None:
                out.write(delta)
                out.flush()

            reply(client, conversation, text, show, **sampling)
            out.write("\n")
            out.flush()
    return 0


def add_commands(commands: Any) -> None:
    """`hivegen chat` and its options."""
    chat = commands.add_parser(
        "chat",
        help="an interactive multi-turn chat in the terminal",
        description="Chat with a model through the swarm. Commands: "
        + "; ".join(f"{k} {v}" for k, v in COMMANDS.items()),
    )
    chat.add_argument("--model", required=True, help="checkpoint directory, or a prepared demo model name")
    add_peers_argument(chat, required=True, help="DHT multiaddrs of the swarm")
    chat.add_argument("--system", help="a system message that starts (and survives /reset of) the conversation")
    add_sampling_arguments(chat, max_new_tokens=256)
    chat.add_argument("--store", help=f"store of recorded generations {STORE_DEFAULT}")
    chat.add_argument("--identity", help=f"key file of the account that pays nodes {IDENTITY_DEFAULT}")
    add_coordinator_argument(chat, "HOST:PORT of the ledger: pays nodes and hears reports of lying ones")
    chat.add_argument("--verify", help='re-execution of node work: "off", a rate in [0, 1], or "all"')
    chat.set_defaults(handler=cmd_chat)
