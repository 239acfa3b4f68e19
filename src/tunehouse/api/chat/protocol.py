"""Wire types of /v1/chat/completions, field for field as OpenAI's.

The request takes exactly the fields of OpenAI's `CreateChatCompletionRequest`: any other field is
a 400 naming it. Which ones are honoured, and which are refused with a 400 naming them (audio,
predicted outputs, web search, ...), is `api/chat/service.py`'s `check_supported`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializationInfo, field_validator, model_serializer


def drop_absent(out: dict, keys: tuple[str, ...]) -> dict:
    """Optional fields the schema does not let be null are left out instead."""
    for key in keys:
        if out.get(key) is None:
            out.pop(key, None)
    return out


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v):
        if isinstance(v, list):
            for part in v:
                kind = part.get("type")
                if kind not in ("text", "refusal"):
                    raise ValueError(f"content parts of type '{kind}' are not supported; only 'text'")
        return v


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class ChatCompletionRequest(BaseModel):
    """In the spec's order; each field's fate (honoured or refused) is in the service's checks."""

    model_config = ConfigDict(extra="forbid")
    metadata: dict[str, str] | None = None  # checked as OpenAI does (16 pairs, 64/512 characters)
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = 1.0
    top_p: Annotated[float, Field(ge=0, le=1)] | None = 1.0
    user: str | None = None
    safety_identifier: Annotated[str, Field(max_length=64)] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: dict[str, Any] | None = None
    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    web_search_options: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    store: bool | None = None
    moderation: dict[str, Any] | None = None
    stream: bool | None = False
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = 1
    prediction: dict[str, Any] | None = None
    seed: int | None = None
    stream_options: StreamOptions | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # Deprecated by OpenAI in favour of tools / tool_choice, still honoured (mapped onto them).
    function_call: Literal["none", "auto"] | dict[str, Any] | None = None
    functions: Annotated[list[dict[str, Any]], Field(min_length=1, max_length=128)] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    annotations: list[Any] = Field(default_factory=list)
    tool_calls: list[ToolCall] | None = None  # left out when there are none (the schema has no null)
    function_call: FunctionCall | None = None  # the legacy `functions` form's answer, left out likewise

    @model_serializer(mode="wrap")
    def _without_absent(self, handler, info: SerializationInfo):
        return drop_absent(handler(self), ("tool_calls", "function_call"))


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage
    service_tier: str | None = "default"
    system_fingerprint: str | None = None  # left out: no fingerprint is kept of the backend yet

    @model_serializer(mode="wrap")
    def _without_absent(self, handler, info: SerializationInfo):
        return drop_absent(handler(self), ("system_fingerprint",))


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    refusal: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: dict[str, Any]
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    service_tier: str | None = "default"
    system_fingerprint: str | None = None  # left out, as on ChatCompletion
    usage: CompletionUsage | None = None

    @model_serializer(mode="wrap")
    def _without_absent(self, handler, info: SerializationInfo):
        return drop_absent(handler(self), ("system_fingerprint",))


# --------------------------------------------------------------------------------------------------
# Stored chat completions (api/chat/stored.py)


class StoredCompletionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]  # chat.completion objects as they were answered, with `metadata`
    first_id: str | None
    last_id: str | None
    has_more: bool


class StoredMessageList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]  # the request's messages, each with an id `<completion id>-<index>`
    first_id: str | None
    last_id: str | None
    has_more: bool


class UpdateStoredCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metadata: dict[str, str] | None


class StoredCompletionDeleted(BaseModel):
    object: Literal["chat.completion.deleted"] = "chat.completion.deleted"
    id: str
    deleted: bool
