"""The OpenAI-compatible wire format: request bodies (pydantic models, validated on arrival) and
the response, chunk and error objects, as plain dicts.

Parameters lorakit serves: `model`, `prompt` / `messages`, `max_tokens` (chat also
`max_completion_tokens`), `temperature`, `top_p`, `stop`, `seed`, `stream`,
`stream_options.include_usage`, `n`, `presence_penalty` / `frequency_penalty` (in [-2, 2]),
log-probabilities (completions `logprobs` 0 to 5; chat `logprobs: true` with `top_logprobs` 0
to 20), `user` (ignored). Parameters it does not serve (`echo`, `best_of` > 1, `suffix`,
`logit_bias`, tools, JSON mode) are refused with a 400 when given a value that would change the
output, never silently dropped; unknown keys are ignored, as OpenAI's own server does with new
client fields.

Log-probability objects, per choice, one entry per generated token (the end token and the tokens
of a stop string included, as `usage` counts them): chat `{"content": [{token, logprob, bytes,
top_logprobs: [{token, logprob, bytes}, ...]}]}`; completions `{tokens, token_logprobs,
top_logprobs: [{token: logprob}, ...], text_offset}`, the offsets counted in characters from the
start of the choice's text. A streamed chunk carries the entries of the tokens generated since
the previous chunk.

Text must be Unicode: the JSON escape `\\ud800` decodes to a lone surrogate, which no tokenizer can
encode and no response can echo, so every string of a request body is checked on arrival (400
naming the field). Token ids are JSON integers, never booleans (`true` is not token 1).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from ..model_io import join_text_parts
from .errors import ServeError
from .sampling import Logprob, TokenLogprobs

MAX_STOP = 16           # stop strings per request
MAX_STOP_CHARS = 256    # characters per stop string

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
MaxTokens = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=-(2 ** 63), le=2 ** 64 - 1)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
TokenId = Annotated[StrictInt, Field(ge=0)]


def _unicode(value: Any) -> Any:
    """`value`, or a ValueError for a string in it (or in its lists and dicts) with a lone surrogate."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"contains a lone surrogate (\\u{ord(value[e.start]):04x} at character {e.start}); "
                             "text must be valid Unicode") from None
    elif isinstance(value, (list, tuple)):
        for item in value:
            _unicode(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _unicode(key)
            _unicode(item)
    return value


class _Body(BaseModel):
    """A part of a request body: unknown keys ignored, every string checked to be Unicode."""

    model_config = ConfigDict(extra="ignore")

    @field_validator("*")
    @classmethod
    def _text_is_unicode(cls, value: Any) -> Any:
        return _unicode(value)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """What completions and chat share."""

    model: str = Field(min_length=1)
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[int, Field(ge=1)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def check_supported(self) -> None:
        """400 for a parameter given a value lorakit does not serve."""
        if self.logit_bias:
            raise ServeError("logit_bias is not supported by lorakit serve; leave it out", 400, param="logit_bias")

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(dict.fromkeys(self.stop))

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def choices(self) -> int:
        """Choices per prompt (`n`)."""
        return 1 if self.n is None else self.n


class CompletionRequest(_Sampling):
    prompt: (str | Annotated[list[str], Field(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)])
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None
    """Report log-probabilities, with this many alternatives per token."""
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _no_boolean_ids(cls, value: Any) -> Any:
        """Booleans among token ids are refused by name (TokenId is strict); the union's own error
        would say the prompt "should be a valid string"."""
        for row in value if isinstance(value, list) else ():
            if any(isinstance(x, bool) for x in (row if isinstance(row, list) else [row])):
                raise ValueError("token ids must be integers, not booleans (true / false)")
        return value

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise ServeError("echo is not supported by lorakit serve; leave it out", 400, param="echo")
        if self.best_of not in (None, 1):
            raise ServeError("best_of is not supported by lorakit serve; leave it out", 400, param="best_of")
        if self.suffix:
            raise ServeError("suffix (insertion) is not supported by lorakit serve; leave it out", 400, param="suffix")

    def prompts(self) -> list[str | list[int]]:
        """Each prompt as text or token ids (a list of ints is one prompt of token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TextPart(_Body):
    type: str
    text: str | None = None


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ServeError(f"messages[{index}] has a {part.type!r} content part; lorakit serve takes text only",
                                 400, param=f"messages.{index}.content")
            parts.append(part.text)
        return join_text_parts(parts)


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise ServeError("top_logprobs needs logprobs: true", 400, param="top_logprobs")
        if self.tools:
            raise ServeError("tools are not supported by lorakit serve; leave them out", 400, param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ServeError("response_format other than text is not supported by lorakit serve", 400,
                             param="response_format")

    def chat_messages(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them."""
        return [{"role": m.role, "content": m.text(i)} for i, m in enumerate(self.messages)]

    def route_text(self) -> str:
        """What the router reads: the last user message."""
        users = [m for m in self.chat_messages() if m["role"] == "user"]
        return users[-1]["content"] if users else self.chat_messages()[-1]["content"]

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def alternatives(self) -> int | None:
        """Alternatives per token in the log-probabilities, None for no log-probabilities."""
        return (self.top_logprobs or 0) if self.logprobs else None


class AdapterLoad(_Body):
    model_config = ConfigDict(extra="forbid")
    name: str
    path: str


# -- responses --------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _entry(logprob: Logprob) -> dict:
    return {"token": logprob.token, "logprob": logprob.logprob, "bytes": list(logprob.bytes)}


def chat_logprobs(entries: Sequence[TokenLogprobs] | None) -> dict | None:
    """A chat choice's (or chunk's) `logprobs`; None when the request asked for none."""
    if entries is None:
        return None
    return {"content": [{**_entry(e.chosen), "top_logprobs": [_entry(t) for t in e.top]} for e in entries],
            "refusal": None}


def completion_logprobs(entries: Sequence[TokenLogprobs] | None) -> dict | None:
    """A completion choice's (or chunk's) `logprobs`; None when the request asked for none. The
    offsets are in the choice's whole text, in a chunk too."""
    if entries is None:
        return None
    return {"tokens": [e.chosen.token for e in entries], "token_logprobs": [e.chosen.logprob for e in entries],
            "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
            "text_offset": [e.offset for e in entries]}


def completion(rid: str, created: int, model: str, choices: list[tuple[str, str, dict | None]], use: dict) -> dict:
    """`choices`: (text, finish_reason, logprobs) per choice."""
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}
                        for i, (text, reason, logprobs) in enumerate(choices)],
            "usage": use}


def completion_chunk(rid: str, created: int, model: str, index: int, text: str, reason: str | None,
                     logprobs: dict | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}]}


def chat_completion(rid: str, created: int, model: str, choices: list[tuple[str, str, dict | None]],
                    use: dict) -> dict:
    """`choices`: (text, finish_reason, logprobs) per choice."""
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                         "finish_reason": reason} for i, (text, reason, logprobs) in enumerate(choices)],
            "usage": use}


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict, reason: str | None,
               logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}


def usage_chunk(rid: str, created: int, model: str, obj: str, use: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def model_card(name: str, created: int, parent: str | None) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "lorakit", "parent": parent}
