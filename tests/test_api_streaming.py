"""Text deltas for server-sent events: nothing is sent that a later token could still change."""

from __future__ import annotations

import threading

import pytest
import torch

from hivegen.api.streaming import ChoiceStreamer, StreamRetracted, TextStream
from hivegen.errors import GenerationCancelled

WORDS = {1: "Hello", 2: " wor", 3: "ld", 4: " END", 5: "!", 6: "\ufffd"}


def decode(tokens: list[int]) -> str:
    return "".join(WORDS[t] for t in tokens)


def test_deltas_add_up_to_the_text() -> None:
    stream = TextStream(decode)
    assert [stream.extend([t]) for t in (1, 2, 3, 5)] == ["Hello", " wor", "ld", "!"]


def test_a_possible_start_of_a_stop_string_is_held_back() -> None:
    stream = TextStream(decode, stops=[" END"])
    assert stream.extend([1]) == "Hello"
    assert stream.extend([2]) == " wor"
    stream_e = TextStream(decode, stops=["ld!"])
    assert stream_e.extend([1, 2]) == "Hello wor"
    assert stream_e.extend([3]) == ""  # "ld" may begin "ld!"
    assert stream_e.extend([5]) == ""  # it did: the answer ends before it
    assert stream_e.finish("Hello wor") == ""


def test_text_after_a_stop_string_is_never_sent() -> None:
    stream = TextStream(decode, stops=[" END"])
    sent = "".join(stream.extend([t]) for t in (1, 4, 2, 3))
    assert sent == "Hello"


def test_an_incomplete_character_waits_for_its_next_token() -> None:
    stream = TextStream(decode)
    assert stream.extend([1, 6]) == "Hello"
    assert stream.finish("Hello\u00e9") == "\u00e9"


def test_a_retraction_of_streamed_text_is_reported() -> None:
    stream = TextStream(decode)
    stream.extend([1, 2])
    stream.restart()
    assert stream.extend([1]) == ""  # the tokens that stand come back first
    with pytest.raises(StreamRetracted, match="send the same request again"):
        stream.extend([5])


def test_the_streamer_reads_prompts_and_tokens_and_stops_when_cancelled() -> None:
    deltas: list[str] = []
    cancelled = threading.Event()
    streamer = ChoiceStreamer(TextStream(decode), deltas.append, cancelled, pytest.fail)
    streamer.put(torch.tensor([[9, 9, 9]]))  # the prompt
    streamer.put(torch.tensor([1]))
    streamer.put(torch.tensor([2, 3]))
    assert deltas == ["Hello", " world"]
    cancelled.set()
    with pytest.raises(GenerationCancelled):
        streamer.put(torch.tensor([5]))


def test_after_a_retraction_the_streamer_goes_quiet_and_lets_the_corrected_run_finish() -> None:
    deltas: list[str] = []
    errors: list[StreamRetracted] = []
    cancelled = threading.Event()
    streamer = ChoiceStreamer(TextStream(decode), deltas.append, cancelled, errors.append)
    streamer.put(torch.tensor([[9]]))
    streamer.put(torch.tensor([1, 2]))
    streamer.put(torch.tensor([[9]]))  # verification restarts the generation: "Hello" stands, " wor" does not
    streamer.put(torch.tensor([1, 5]))
    assert len(errors) == 1 and streamer.retracted
    cancelled.set()  # the HTTP side has ended the stream; the corrected run must still reach the store
    streamer.put(torch.tensor([3]))
    streamer.finish("Hello!ld")
    assert deltas == ["Hello wor"]
