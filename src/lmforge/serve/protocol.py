"""The OpenAI API as `lmforge serve` speaks it: request bodies (validated by pydantic; anything
else is a 400 naming the parameter), response and stream-chunk bodies, and the error shape
`{"error": {"message", "type", "param", "code"}}`.

Parameters that OpenAI defines but a local model cannot honour (logprobs, penalties, tools, ...)
are accepted at their neutral value and refused otherwise, so that a client never gets silently
different behaviour from what it asked for.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 4
"""Stop strings a request may give (OpenAI's limit)."""


def _unicode_text(text: str) -> str:
    """`text` if it can be encoded as UTF-8. JSON's escapes can spell a lone surrogate ("\\ud800"),
    which is no character: the tokenizer would fail on it with a 500, so it is refused here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise ValueError(
            f"the text holds a lone surrogate ({ascii(bad)} at character {exc.start}), which is not a character "
            "and cannot be encoded as UTF-8: send valid Unicode text (a surrogate pair, or the character itself)"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_unicode_text)]
"""A request string: any text that can be encoded as UTF-8."""


class APIError(Exception):
    """A request the server refuses, answered with `status` and the OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind


def error_body(
    message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"
) -> dict[str, Any]:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    """Send a last chunk with the usage and no choices (before data: [DONE])."""


class _Sampling(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="forbid")

    model: Text
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    """0: greedy decoding."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = Field(default=None, validate_default=True)
    """One stop string or up to four; they end the answer and are not part of it."""
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    """The same seed and the same request give the same text; absent: a fresh seed each time."""
    n: int = Field(default=1, ge=1)
    user: Text | None = None
    """Recorded by nothing; accepted for clients that always send it."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings (got {len(stops)})")
        if any(not s for s in stops):
            raise ValueError("a stop string cannot be empty")
        return stops

    @field_validator("n")
    @classmethod
    def _one_answer(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported (one answer a request): send n requests, each with its own seed")
        return n

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("penalties are not supported: leave it at 0")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict | None) -> dict | None:
        if value:
            raise ValueError("logit_bias is not supported: leave it out")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: Any) -> Any:
        if value not in (None, False, 0):
            raise ValueError("logprobs are not supported: leave it out")
        return value


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: Text | list[Text]
    max_tokens: int | None = Field(default=None, ge=1)
    """Tokens to write at most. Default: 16, as OpenAI's."""
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str:
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError(f"one prompt a request (got a list of {len(prompt)}): send one request per prompt")
            return prompt[0]
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported: the answer is the new text only")
        return echo

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, best_of: int | None) -> int | None:
        if best_of not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return best_of

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("suffix (insertion) is not supported")
        return suffix


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = None

    def text(self) -> str:
        """The message's text (the text parts joined)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]


class ChatRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """Tokens to write at most (max_tokens is its older name). Default: what the context leaves,
    up to `model.DEFAULT_CHAT_TOKENS`."""
    response_format: ResponseFormat | None = None
    top_logprobs: int | None = None

    def limit(self) -> int | None:
        """The answer's token limit the request sets, if any."""
        return self.max_completion_tokens or self.max_tokens

    def limit_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"


class ClassifyRequest(BaseModel):
    """POST /v1/classify: {"model", "input": a text or a list of texts}."""

    model_config = ConfigDict(extra="forbid")
    model: Text
    input: Text | list[Text] = Field(min_length=1)


def new_id(prefix: str) -> str:
    """A response id such as cmpl-3f2a...: unique, opaque."""
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's usage object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(rid: str, model: str, text: str, finish: str | None, counts: dict | None) -> dict[str, Any]:
    """A text_completion: the whole answer, or (`counts` None) one stream chunk of it."""
    body: dict[str, Any] = {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }
    if counts is not None:
        body["usage"] = counts
    return body


def chat_body(rid: str, model: str, text: str, finish: str, counts: dict) -> dict[str, Any]:
    """A chat.completion: the whole answer."""
    message = {"role": "assistant", "content": text}
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": counts,
    }


def chat_chunk(rid: str, model: str, delta: dict[str, str], finish: str | None) -> dict[str, Any]:
    """A chat.completion.chunk: the role first, then pieces of content, then the finish reason."""
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def usage_chunk(rid: str, model: str, obj: str, counts: dict[str, int]) -> dict[str, Any]:
    """The last chunk of a stream that asked for stream_options.include_usage: no choices."""
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": counts}
