"""The OpenAI API's request bodies as hivegen reads them: the fields it honours are typed and checked, fields
that would change the answer but are not supported are refused by name, and harmless unknown fields are ignored
(clients send `user`, `metadata`, `store`, ...)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from hivegen.client.params import check_sampling

MAX_N = 8  # choices per request: each is a generation through the swarm
MAX_PROMPTS = 16  # prompts per /v1/completions request
MAX_MESSAGES = 256
MAX_STOP = 4  # as OpenAI


class ApiParameterError(ValueError):
    """A request field is invalid; `param` names it as the request spelled it."""

    def __init__(self, param: str, message: str) -> None:
        self.param = param
        super().__init__(message)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        """The message's text; image, audio or file parts are refused (hivegen serves text decoders)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ApiParameterError(
                    f"messages[{index}].content", f"content parts of type {part.type!r} are not supported; send text"
                )
            texts.append(part.text)
        return "".join(texts)


class SamplingFields(BaseModel):
    """What /v1/chat/completions and /v1/completions share."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not OpenAI's, but vLLM's and llama.cpp's
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stops) > MAX_STOP:
            raise ApiParameterError("stop", f"at most {MAX_STOP} stop sequences, not {len(stops)}")
        return stops

    @property
    def token_limit(self) -> int | None:
        """The most tokens to generate per choice, as the request gave it (None: the server's default)."""
        return self.max_tokens

    @property
    def token_limit_field(self) -> str:
        return "max_tokens"

    def check(self) -> None:
        """Refuse what hivegen does not do, then check the sampling values in the one shared place."""
        if not 1 <= self.n <= MAX_N:
            raise ApiParameterError("n", f"must be an integer in [1, {MAX_N}], not {self.n}")
        for field in ("presence_penalty", "frequency_penalty"):
            if getattr(self, field) not in (None, 0, 0.0):
                raise ApiParameterError(field, f"{field} is not supported by hivegen; leave it out or 0")
        if self.logit_bias:
            raise ApiParameterError("logit_bias", "logit_bias is not supported by hivegen; leave it out")
        if self.logprobs not in (None, False, 0):
            raise ApiParameterError("logprobs", "logprobs are not supported by hivegen; leave them out")
        if self.stream_options is not None and not self.stream:
            raise ApiParameterError("stream_options", "stream_options is only allowed when stream is true")
        check_sampling(
            max_new_tokens=self.token_limit,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            stop=self.stop_strings(),
            names={"max_new_tokens": self.token_limit_field},
        )


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    top_logprobs: int | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def token_limit_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def check(self) -> None:
        if self.tools or self.functions or self.tool_choice not in (None, "none"):
            raise ApiParameterError("tools", "tool calls are not supported by hivegen; send plain messages")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise ApiParameterError("response_format", "only response_format {'type': 'text'} is supported")
        if self.top_logprobs:
            raise ApiParameterError("top_logprobs", "logprobs are not supported by hivegen; leave them out")
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise ApiParameterError("max_completion_tokens", "differs from max_tokens; send one of them")
        super().check()

    def conversation(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them (`developer` is the newer name of `system`)."""
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
            for i, m in enumerate(self.messages)
        ]


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check(self) -> None:
        if self.echo:
            raise ApiParameterError("echo", "echo is not supported by hivegen; leave it out")
        if self.suffix:
            raise ApiParameterError("suffix", "suffix (insertion) is not supported by hivegen; leave it out")
        if self.best_of not in (None, self.n):
            raise ApiParameterError("best_of", "best_of is not supported by hivegen; leave it out or equal to n")
        super().check()

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            prompts: list[str | list[int]] = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]  # type: ignore[arg-type]
        else:
            prompts = list(prompt)  # type: ignore[arg-type]
        if not prompts or len(prompts) > MAX_PROMPTS:
            raise ApiParameterError("prompt", f"send 1 to {MAX_PROMPTS} prompts, not {len(prompts)}")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ApiParameterError("prompt", f"prompt {i} is empty")
        return prompts
