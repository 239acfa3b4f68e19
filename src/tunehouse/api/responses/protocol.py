"""Wire types of /v1/responses, field for field as OpenAI's.

The request takes exactly the fields of OpenAI's `CreateResponse`: any other field is a 400 naming
it. Which ones are honoured, and which are refused with a 400 naming them (hosted tools, reasoning,
conversations, prompt templates, ...), is `api/responses/checks.py`'s `check_request`. Input items,
tools and `text.format` stay plain JSON here: the service checks them item by item, so that an
error names the exact place (`input[2].content[0].type`).

The Response object itself is built by `response_object` in the spec's field order (it is stored as
JSON and answered as stored, with its status moving while a background response runs)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class CreateResponseRequest(BaseModel):
    """In the spec's order (ModelResponseProperties, ResponseProperties, then CreateResponse's own)."""

    model_config = ConfigDict(extra="forbid")
    metadata: dict[str, str] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    user: str | None = None
    safety_identifier: Annotated[str, Field(max_length=64)] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: dict[str, Any] | None = None
    previous_response_id: str | None = None
    model: str
    background: bool | None = None
    max_tool_calls: Annotated[int, Field(ge=0)] | None = None
    text: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast", "ultrafast"] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    reasoning: dict[str, Any] | None = None
    input: str | list[Any] | None = None
    include: list[str] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    instructions: str | None = None
    moderation: dict[str, Any] | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    conversation: str | dict[str, Any] | None = None
    context_management: list[Any] | None = None
    max_output_tokens: Annotated[int, Field(ge=16)] | None = None


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool


class ResponseItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]  # the input items, each with its id
    first_id: str | None
    last_id: str | None
    has_more: bool


def response_object(
    *,
    id: str,
    created_at: int,
    status: str,
    model: str,
    req: CreateResponseRequest,
    tools: list[dict],
    tool_choice: str | dict,
    text: dict,
    output: list[dict] | None = None,
    usage: dict | None = None,
    error: dict | None = None,
    incomplete_details: dict | None = None,
    completed_at: int | None = None,
) -> dict:
    """The Response object, in OpenAI's field order. `tools`, `tool_choice` and `text` are the
    request's, normalised (defaults filled in). `user` and `usage` are left out when absent (the
    schema does not let them be null)."""
    out = {
        "id": id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": bool(req.background),
        "completed_at": completed_at,
        "error": error,
        "incomplete_details": incomplete_details,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "max_tool_calls": req.max_tool_calls,
        "model": model,
        "output": output or [],
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id,
        "prompt_cache_key": req.prompt_cache_key,
        "prompt_cache_retention": req.prompt_cache_retention,
        "reasoning": None,
        "safety_identifier": req.safety_identifier,
        "service_tier": "default",  # the tier that served it, as chat completions answer
        "store": req.store is not False,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "text": text,
        "tool_choice": tool_choice,
        "tools": tools,
        "top_logprobs": req.top_logprobs or 0,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "truncation": req.truncation or "disabled",
        "usage": usage,
        "user": req.user,
        "metadata": req.metadata or {},
    }
    for key in ("usage", "user"):
        if out[key] is None:
            del out[key]
    return out
