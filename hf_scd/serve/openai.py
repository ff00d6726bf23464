"""The OpenAI-style HTTP surface: request bodies, validated; what a decode replica is asked to do; and the response
bodies and server-sent-event chunks built from what it yields.

Fields clients commonly send and this app honours: `model`, `prompt` (text or token ids) or `messages`,
`max_tokens` (or `max_completion_tokens`), `temperature` (0 is greedy), `top_p`, `stop`, `stream`,
`stream_options.include_usage`. Options it cannot honour (`n` > 1, `logprobs`, `echo`, `best_of`, tools) are refused
with a 400, never silently ignored. `kv_transfer` ("auto", "always", "never") overrides the link policy for one
request: for benchmarks and debugging.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import RequestError

KVTransfer = Literal["auto", "always", "never"]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: object = None
    echo: bool = False
    best_of: int | None = None
    tools: list | None = None
    kv_transfer: KVTransfer = "auto"

    @model_validator(mode="after")
    def _supported(self):
        refused = {
            "n": self.n != 1,
            "logprobs": self.logprobs not in (None, False, 0),
            "echo": self.echo,
            "best_of": self.best_of not in (None, 1),
            "tools": bool(self.tools),
        }
        for name, asked in refused.items():
            if asked:
                raise ValueError(f"{name!r} is not supported by this server")
        if isinstance(self.stop, list) and (len(self.stop) > 4 or not all(self.stop)):
            raise ValueError("'stop' takes at most 4 non-empty strings")
        return self

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Request):
    prompt: str | list[int] = Field(min_length=1)
    max_tokens: int | None = Field(16, ge=1)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


@dataclass(frozen=True)
class Generation:
    """One request as a decode replica sees it: exactly one of `prompt` (text), `prompt_ids` or `messages`."""

    prompt: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[dict] | None = None
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stops: list[str] = field(default_factory=list)
    kv_transfer: KVTransfer = "auto"


def generation(request: CompletionRequest | ChatRequest, max_new_tokens: int) -> Generation:
    """The decode replica's job for a validated request; a `RequestError` past the server's `max_new_tokens`."""
    if isinstance(request, ChatRequest):
        asked = request.max_completion_tokens or request.max_tokens or max_new_tokens
        source = {"messages": [message.model_dump() for message in request.messages]}
    else:
        asked = request.max_tokens or max_new_tokens
        text = isinstance(request.prompt, str)
        source = {"prompt": request.prompt} if text else {"prompt_ids": list(request.prompt)}
    if asked > max_new_tokens:
        raise RequestError(f"max_tokens is {asked}; this server generates at most {max_new_tokens} tokens")
    options = {"temperature": request.temperature, "top_p": request.top_p, "kv_transfer": request.kv_transfer}
    return Generation(**source, max_new_tokens=asked, stops=request.stops(), **options)


def error_body(message: str, code: str, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


@dataclass
class Reply:
    """Builds one request's response bodies (OpenAI's shapes), whole or as SSE chunks."""

    model: str
    chat: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        prefix = "chatcmpl" if self.chat else "cmpl"
        return {
            "id": f"{prefix}-{self.id}",
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def whole(self, text: str, finish_reason: str, usage: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope(self.object, [choice]) | {"usage": usage}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, first: bool = False) -> str:
        if self.chat:
            delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return sse(self._envelope("chat.completion.chunk", [choice]))
        return sse(self._envelope(self.object, [{"index": 0, "text": text or "", "finish_reason": finish_reason}]))

    def usage_chunk(self, usage: dict) -> str:
        obj = "chat.completion.chunk" if self.chat else self.object
        return sse(self._envelope(obj, []) | {"usage": usage})


def sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int, transfer: dict) -> dict:
    """OpenAI's usage block, with what the cache transfer did under `hf_scd`."""
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total} | {
        "hf_scd": transfer
    }
