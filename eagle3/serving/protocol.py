"""The OpenAI API's shapes: request bodies (validated: what we cannot honour exactly is refused, not ignored),
their translation into an engine Request, and the response, chunk, usage and error objects."""

from __future__ import annotations

import time
import uuid
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from eagle3.decoding.engine import Request, SpeculativeResult
from eagle3.decoding.sampling import MAX_SEED, MAX_TEMPERATURE, MIN_TEMPERATURE, SamplingParams

MAX_STOPS = 4  # as OpenAI


class ApiError(Exception):
    """An error the client sees, in the OpenAI error shape, with its HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    """Fields both endpoints take. Unknown fields are ignored (clients send extras); known ones that would
    change the output in ways eagle3 does not implement are refused in `unsupported`."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(default=0, ge=-1)  # 0 or -1 (vLLM's spelling): no top-k cut
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: Union[str, list[str], None] = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Union[bool, int, None] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def unsupported(self) -> None:
        """Refuses what would change the output in a way eagle3 does not implement."""
        if self.n != 1:
            raise ApiError(400, "n must be 1 (one choice per request)", param="n")
        if self.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        if self.presence_penalty or self.frequency_penalty:
            raise ApiError(400, "presence and frequency penalties are not supported", param="presence_penalty")
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported", param="logit_bias")

    def sampling(self) -> SamplingParams:
        # Temperatures below MIN_TEMPERATURE would overflow the softmax; they mean greedy, as in vLLM.
        temperature = 0.0 if self.temperature < MIN_TEMPERATURE else self.temperature
        return SamplingParams(temperature, self.top_p, max(self.top_k, 0), self.seed)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[dict], None] = None

    def text(self) -> str:
        """The message's text: a string, or its text parts joined (images and other parts are refused)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"only text content parts are supported, got type {part.get('type')!r}",
                               param="messages")  # fmt: skip
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def conversation(self) -> list[dict]:
        """The messages as a chat template takes them ("developer" is the newer name of "system")."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Common):
    prompt: Union[str, list[int], list[str]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if self.best_of not in (None, 1):
            raise ApiError(400, "best_of must be 1", param="best_of")
        if self.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) != 1:
            raise ApiError(400, "one prompt per request", param="prompt")


def engine_request(body: _Common, prompt_ids: list[int], max_len: int, max_tokens: int | None) -> Request:
    """The engine's request, or a 400 when the prompt and the answer do not fit max_len positions."""
    room = max_len - len(prompt_ids)
    if not prompt_ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    if room < 1 or (max_tokens is not None and max_tokens > room):
        asked = f" and max_tokens asks for {max_tokens}" if max_tokens is not None else ""
        raise ApiError(400, f"this server's context is {max_len} tokens; the prompt has {len(prompt_ids)}{asked}",
                       param="max_tokens", code="context_length_exceeded")  # fmt: skip
    return Request(prompt_ids, max_tokens or room, body.sampling(), tuple(body.stop or ()))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def finish_reason(result: SpeculativeResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def usage(result: SpeculativeResult) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.new_tokens,
            "total_tokens": result.prompt_tokens + result.new_tokens}  # fmt: skip


def speculation(result: SpeculativeResult) -> dict:
    """eagle3's own figures for a response (an extra field, which OpenAI clients keep)."""
    return {"method": result.method, "rounds": result.rounds, "drafted_rounds": len(result.accept_lengths),
            "tau": round(result.tau, 3)}  # fmt: skip


def chat_response(rid: str, model: str, result: SpeculativeResult) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "logprobs": None, "finish_reason": finish_reason(result)}],
            "usage": usage(result), "eagle3": speculation(result)}  # fmt: skip


def completion_response(rid: str, model: str, result: SpeculativeResult) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish_reason(result)}],
            "usage": usage(result), "eagle3": speculation(result)}  # fmt: skip


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}  # fmt: skip


def completion_chunk(rid: str, model: str, text: str, finish: str | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}  # fmt: skip
