"""Turning a generation's tokens into the text deltas a server-sent-events stream carries.

Text already sent cannot be taken back, so a delta holds back what may still change: a trailing incomplete
UTF-8 sequence, and the tail of the text that could be the start of a stop string."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from hivegen.errors import GenerationCancelled, HivegenError

REPLACEMENT = "\ufffd"  # what a tokenizer decodes a split multi-byte character to


class StreamRetracted(HivegenError):
    """Verification voided tokens whose text was already streamed: the stream cannot be corrected in place."""


class TextStream:
    """The visible text of a growing token list: cut before the first stop string, and never showing what a later
    token could still change."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stops: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stops = [s for s in stops if s]
        self.tokens: list[int] = []
        self.sent = ""

    def extend(self, tokens: Sequence[int]) -> str:
        """Add tokens; return the text that may be sent now (possibly empty)."""
        self.tokens.extend(tokens)
        return self._advance(self._visible(final=False))

    def restart(self) -> None:
        """Verification kept only some tokens; the caller extends again with the ones that stand."""
        self.tokens = []

    def finish(self, text: str) -> str:
        """The rest of the generation's final `text`."""
        return self._advance(text)

    def _advance(self, visible: str) -> str:
        if not visible.startswith(self.sent):
            if len(visible) < len(self.sent) and self.sent.startswith(visible):
                return ""  # shorter after a restart, until the standing tokens are back
            raise StreamRetracted(
                "a node was caught returning wrong hidden states after part of this answer was streamed; the "
                "corrected answer is being generated and stored: send the same request again (with a seed, or "
                "greedy) to receive it from the store"
            )
        delta = visible[len(self.sent) :]
        self.sent = visible
        return delta

    def _visible(self, final: bool) -> str:
        text = self.decode(self.tokens)
        hits = [text.find(s) for s in self.stops if s in text]
        if hits:
            return text[: min(hits)]
        if not final:
            text = text.rstrip(REPLACEMENT)
            for keep in range(min(len(text), max((len(s) for s in self.stops), default=0)), 0, -1):
                if any(s.startswith(text[-keep:]) for s in self.stops):
                    return text[:-keep]
        return text


class ChoiceStreamer:
    """The streamer protocol `Client.generate` feeds (the prompt, then tokens; the prompt again after a
    retraction), turned into text deltas for `on_delta`.

    Raises GenerationCancelled at the next token once `cancelled` is set, which ends the generation at its next
    step. If verification voids text already shown, `on_retracted` gets the StreamRetracted error once and the
    streamer goes quiet, ignoring `cancelled`: the generation runs on to its corrected end and is stored, so that
    asking again gets the right answer at once."""

    def __init__(
        self,
        text: TextStream,
        on_delta: Callable[[str], None],
        cancelled: threading.Event,
        on_retracted: Callable[[StreamRetracted], None],
    ) -> None:
        self.text = text
        self.on_delta = on_delta
        self.cancelled = cancelled
        self.on_retracted = on_retracted
        self.retracted = False
        self._prompts = 0

    def put(self, value: torch.Tensor) -> None:
        if self.retracted:
            return
        if self.cancelled.is_set():
            raise GenerationCancelled("the HTTP client went away; the generation was stopped")
        if value.ndim == 2:  # the prompt: first, and again when verification restarts the generation
            self._prompts += 1
            if self._prompts > 1:
                self.text.restart()
            return
        try:
            delta = self.text.extend([int(t) for t in value.reshape(-1).tolist()])
        except StreamRetracted as exc:
            self.retracted = True
            self.on_retracted(exc)
            return
        self.on_delta(delta)

    def finish(self, text: str) -> None:
        """The generation ended with `text`: send what is left of it (unless the stream was retracted)."""
        if not self.retracted:
            self.on_delta(self.text.finish(text))

    def end(self) -> None:
        pass
