"""Wire types of the legacy /v1/completions endpoint, field for field as OpenAI's."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from tunehouse.api.chat.protocol import CompletionUsage, StreamOptions, drop_absent


class CompletionRequest(BaseModel):
    """Exactly the fields of OpenAI's `CreateCompletionRequest` (any other is a 400 naming it);
    `suffix`, `best_of` other than 1 or `n`, and `echo` with `logprobs` are refused by the service."""

    model_config = ConfigDict(extra="forbid")
    model: str
    # A string, a list of strings, a list of token ids, or a list of lists of token ids.
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: Annotated[int, Field(ge=1, le=20)] | None = None
    echo: bool | None = False
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    n: Annotated[int, Field(ge=1, le=128)] | None = 1
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = 1.0
    top_p: Annotated[float, Field(ge=0, le=1)] | None = 1.0
    user: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "content_filter"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None  # left out, as on ChatCompletion
    usage: CompletionUsage | None = None

    @model_serializer(mode="wrap")
    def _without_absent(self, handler):
        return drop_absent(handler(self), ("system_fingerprint",))
