"""The checks of a /v1/responses request, and its translation into chat's terms.

`check_request` validates what pydantic cannot, each refused field a 400 naming it, and returns a
`Plan`: tools and `tool_choice` in chat's form (`inference/tools.py`), `text.format` as chat's
`response_format` (constrained decoding), the input as items with ids (as `input_items` lists
them). `to_messages` renders a conversation's items as chat messages: function calls join the
assistant turn as `tool_calls`, their outputs become `tool` messages. Used by the endpoint
(`service.py`) and by batches over /v1/responses (`api/batches/service.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from tunehouse import ids
from tunehouse.api.chat import service as chat
from tunehouse.api.chat.service import check_metadata
from tunehouse.api.responses.protocol import CreateResponseRequest
from tunehouse.errors import InvalidRequest
from tunehouse.inference import tools as tool_calls
from tunehouse.inference.constrained import InvalidResponseFormat, validate_response_format
from tunehouse.inference.engine import SamplingParams

log = logging.getLogger(__name__)

LOGPROBS = "message.output_text.logprobs"


def _unsupported(param: str, what: str) -> InvalidRequest:
    return InvalidRequest(
        f"Unsupported parameter: '{param}' {what}", param=param, code="unsupported_parameter"
    )


def _invalid(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="invalid_value")


def _unknown(param: str) -> InvalidRequest:
    return InvalidRequest(
        f"Unrecognized request argument supplied: '{param}'.", param=param, code="unknown_parameter"
    )


@dataclass
class Plan:
    """A checked request, in the terms of the chat generation call."""

    spec: tool_calls.ToolSpec | None  # function calling, in chat's form
    tools: list[dict]  # echoed on the Response (FunctionTool form, defaults filled in)
    tool_choice: str | dict  # echoed
    text: dict  # echoed: {"format": ..., "verbosity": ...}
    response_format: dict | None  # chat's form of text.format
    logprobs: bool
    max_calls: int | None  # function calls kept at most (parallel_tool_calls, max_tool_calls)
    input_items: list[dict] = field(default_factory=list)  # this request's input, with ids


# --------------------------------------------------------------------------------------------------
# Checking the request


def check_refused(req: CreateResponseRequest) -> None:
    """The spec's fields this server cannot honour: each is a 400 naming it, never ignored."""
    if req.prompt is not None:
        raise _unsupported("prompt", "(stored prompt templates) is not supported by this server.")
    if req.reasoning is not None:
        raise _unsupported(
            "reasoning", "is not supported with this model: the models served here do not reason."
        )
    if req.moderation is not None:
        raise _unsupported("moderation", "is not supported by this server: it runs no moderation model.")
    if req.conversation is not None:
        raise _unsupported(
            "conversation",
            "is not supported by this server (it has no Conversations API): use 'previous_response_id'.",
        )
    if req.context_management is not None:
        raise _unsupported("context_management", "(compaction) is not supported by this server.")
    if req.background and req.stream:
        raise _unsupported(
            "stream",
            "together with 'background' is not supported by this server: create the background "
            "response without streaming and poll it with retrieve.",
        )
    if req.background and req.store is False:
        raise _invalid(
            "store", "Invalid value for 'store': background responses must be stored (store: true)."
        )
    chat.check_prompt_cache(req.prompt_cache_retention, req.prompt_cache_options)
    for key in req.stream_options or {}:
        if key != "include_obfuscation":
            raise _unknown(f"stream_options.{key}")
    if req.stream_options is not None and not req.stream:
        raise _invalid(
            "stream_options", "Invalid value for 'stream_options': it is only allowed with 'stream: true'."
        )
    for i, value in enumerate(req.include or []):
        if value != LOGPROBS:
            raise _unsupported(
                f"include[{i}]",
                f"{value!r} is not supported by this server: the only value it can include is '{LOGPROBS}'.",
            )
    if req.top_logprobs and LOGPROBS not in (req.include or []):
        raise _invalid(
            "top_logprobs",
            f"Invalid value for 'top_logprobs': include '{LOGPROBS}' in 'include' to use 'top_logprobs'.",
        )


def _text(req: CreateResponseRequest) -> tuple[dict, dict | None]:
    """`text` echoed with defaults, and its format as chat's `response_format` (constrained decoding)."""
    text = req.text or {}
    for key in text:
        if key not in ("format", "verbosity"):
            raise _unknown(f"text.{key}")
    if text.get("verbosity") not in (None, "medium"):
        raise _unsupported(
            "text.verbosity", "other than 'medium' (the default) is not supported by this server."
        )
    fmt = text.get("format") or {"type": "text"}
    if not isinstance(fmt, dict):
        raise _invalid("text.format", "Invalid 'text.format': expected an object.")
    kind = fmt.get("type")
    allowed = {
        "text": {"type"},
        "json_object": {"type"},
        "json_schema": {"type", "name", "schema", "strict", "description"},
    }
    if kind not in allowed:
        raise _invalid(
            "text.format.type",
            f"Invalid value for 'text.format.type': {kind!r}. Supported values are: 'text', 'json_object', and 'json_schema'.",
        )
    for key in fmt:
        if key not in allowed[kind]:
            raise _unknown(f"text.format.{key}")
    if kind == "json_schema":
        if "name" not in fmt:
            raise InvalidRequest(
                "Missing required parameter: 'text.format.name'.",
                param="text.format.name",
                code="missing_required_parameter",
            )
        if "schema" not in fmt:
            raise InvalidRequest(
                "Missing required parameter: 'text.format.schema'.",
                param="text.format.schema",
                code="missing_required_parameter",
            )
        response_format = {
            "type": "json_schema",
            "json_schema": {k: v for k, v in fmt.items() if k != "type"},
        }
    else:
        response_format = {"type": kind}
    try:
        validate_response_format(response_format)
    except InvalidResponseFormat as e:
        message = (
            str(e)
            .replace("response_format.json_schema", "text.format")
            .replace("response_format", "text.format")
        )
        raise _invalid("text.format", message) from None
    echo = {"format": fmt, "verbosity": "medium"}
    return echo, None if kind == "text" else response_format


def _tools(req: CreateResponseRequest) -> tuple[tool_calls.ToolSpec | None, list[dict], str | dict]:
    """Responses' flat function tools → chat's, validated by the same code; hosted tools refused."""
    chat_tools, echo = [], []
    for i, tool in enumerate(req.tools or []):
        if not isinstance(tool, dict):
            raise _invalid(f"tools[{i}]", f"Invalid 'tools[{i}]': expected an object.")
        kind = tool.get("type")
        if kind != "function":
            raise _unsupported(
                f"tools[{i}].type",
                f"{kind!r} is not supported by this server: only 'function' tools (your code runs "
                "them); it hosts no web search, file search, computer, code interpreter or MCP tools.",
            )
        for key in tool:
            if key not in ("type", "name", "description", "parameters", "strict"):
                raise _unknown(f"tools[{i}].{key}")
        strict = tool.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise _invalid(f"tools[{i}].strict", f"Invalid 'tools[{i}].strict': expected a boolean.")
        strict = True if strict is None else strict  # the Responses API's default
        fn = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
        chat_tools.append({"type": "function", "function": {**fn, "strict": strict}})
        echo.append(
            {
                "type": "function",
                "name": tool.get("name"),
                "description": tool.get("description"),
                "parameters": tool.get("parameters"),
                "strict": strict,
            }
        )
    choice = req.tool_choice
    chat_choice: str | dict | None = choice
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise _unsupported(
                "tool_choice",
                f"of type {choice.get('type')!r} is not supported by this server: use 'none', 'auto', "
                "'required' or {'type': 'function', 'name': ...}.",
            )
        if set(choice) != {"type", "name"} or not isinstance(choice.get("name"), str):
            raise _invalid(
                "tool_choice", "Invalid 'tool_choice': expected {'type': 'function', 'name': ...}."
            )
        chat_choice = {"type": "function", "function": {"name": choice["name"]}}
    try:
        spec = tool_calls.validate(chat_tools or None, chat_choice, req.parallel_tool_calls)
    except tool_calls.InvalidTools as e:
        param = e.param.replace(".function.", ".")
        raise _invalid(param, str(e).replace(".function.", ".")) from None
    return spec, echo, choice if choice is not None else "auto"


def check_request(req: CreateResponseRequest) -> Plan:
    check_refused(req)
    check_metadata(req.metadata)
    text, response_format = _text(req)
    spec, tools, tool_choice = _tools(req)
    if req.input is None and req.previous_response_id is None:
        raise InvalidRequest(
            "Missing required parameter: 'input'.", param="input", code="missing_required_parameter"
        )
    limits = [
        n for n in (req.max_tool_calls, None if req.parallel_tool_calls is not False else 1) if n is not None
    ]
    if req.user or req.safety_identifier or req.prompt_cache_key:
        # Accepted as OpenAI does; as for chat completions they go to the server's log only.
        log.info(
            "response for model %s: user=%r safety_identifier=%r prompt_cache_key=%r",
            req.model,
            req.user,
            req.safety_identifier,
            req.prompt_cache_key,
        )
    return Plan(
        spec=spec,
        tools=tools,
        tool_choice=tool_choice,
        text=text,
        response_format=response_format,
        logprobs=LOGPROBS in (req.include or []),
        max_calls=min(limits) if limits else None,
        input_items=input_items(req.input),
    )


# --------------------------------------------------------------------------------------------------
# Input items


def _text_parts(content: Any, param: str, allowed: tuple[str, ...]) -> list[dict]:
    """A message's content (a string or a list of text parts) as the list of parts input_items
    shows. Images, files and audio are refused: the models served here read text only."""
    if isinstance(content, str):
        return [{"type": allowed[0], "text": content}]
    if not isinstance(content, list):
        raise _invalid(param, f"Invalid '{param}': expected a string or a list of content parts.")
    parts = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise _invalid(where, f"Invalid '{where}': expected an object.")
        kind = part.get("type")
        if kind not in allowed:
            if kind in ("input_image", "input_file", "input_audio"):
                raise _unsupported(
                    f"{where}.type", f"{kind!r} is not supported by this server: its models read text only."
                )
            raise _invalid(
                f"{where}.type",
                f"Invalid value for '{where}.type': {kind!r}. Supported values are: "
                + ", ".join(f"'{a}'" for a in allowed)
                + ".",
            )
        for key in part:
            if key not in ("type", "text", "annotations", "logprobs"):
                raise _unknown(f"{where}.{key}")
        if not isinstance(part.get("text"), str):
            raise _invalid(f"{where}.text", f"Invalid '{where}.text': expected a string.")
        parts.append({"type": kind, "text": part["text"]})
    return parts


def _message_item(item: dict, param: str) -> dict:
    role = item.get("role")
    for key in item:
        if key not in ("type", "role", "content", "id", "status"):
            raise _unknown(f"{param}.{key}")
    if role in ("user", "system", "developer"):
        parts = _text_parts(item.get("content"), f"{param}.content", ("input_text",))
        return {
            "id": ids.response_item_id("msg"),
            "type": "message",
            "role": role,
            "content": parts,
            "status": "completed",
        }
    if role == "assistant":
        parts = _text_parts(item.get("content"), f"{param}.content", ("output_text", "input_text"))
        return {
            "id": item.get("id") or ids.response_item_id("msg"),
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [
                {"type": "output_text", "text": p["text"], "annotations": [], "logprobs": []} for p in parts
            ],
        }
    raise _invalid(
        f"{param}.role",
        f"Invalid value for '{param}.role': {role!r}. Supported values are: 'user', 'assistant', 'system', and 'developer'.",
    )


def _string(item: dict, key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        if value is None:
            raise InvalidRequest(
                f"Missing required parameter: '{param}.{key}'.",
                param=f"{param}.{key}",
                code="missing_required_parameter",
            )
        raise _invalid(f"{param}.{key}", f"Invalid '{param}.{key}': expected a string.")
    return value


def input_items(value: str | list | None) -> list[dict]:
    """The request's `input` as items with ids: messages, function calls and their outputs."""
    if value is None:
        return []
    if isinstance(value, str):
        return [
            {
                "id": ids.response_item_id("msg"),
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": value}],
                "status": "completed",
            }
        ]
    out = []
    for i, item in enumerate(value):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise _invalid(param, f"Invalid '{param}': expected an object.")
        kind = item.get("type", "message")
        if kind == "message":
            out.append(_message_item(item, param))
        elif kind == "function_call":
            for key in item:
                if key not in ("type", "id", "call_id", "name", "arguments", "status"):
                    raise _unknown(f"{param}.{key}")
            out.append(
                {
                    "id": item.get("id") or ids.response_item_id("fc"),
                    "type": "function_call",
                    "call_id": _string(item, "call_id", param),
                    "name": _string(item, "name", param),
                    "arguments": _string(item, "arguments", param),
                    "status": "completed",
                }
            )
        elif kind == "function_call_output":
            for key in item:
                if key not in ("type", "id", "call_id", "output", "status"):
                    raise _unknown(f"{param}.{key}")
            output = item.get("output")
            if not isinstance(output, str):
                output = "".join(p["text"] for p in _text_parts(output, f"{param}.output", ("input_text",)))
            out.append(
                {
                    "id": item.get("id") or ids.response_item_id("fco"),
                    "type": "function_call_output",
                    "call_id": _string(item, "call_id", param),
                    "output": output,
                    "status": "completed",
                }
            )
        else:
            raise _unsupported(
                f"{param}.type",
                f"{kind!r} is not supported by this server: input items are messages, 'function_call' "
                "and 'function_call_output' (use 'previous_response_id' to continue from a stored response).",
            )
    return out


def to_messages(instructions: str | None, items: list[dict]) -> list[dict]:
    """The conversation as chat messages: function calls join the assistant turn they belong to as
    `tool_calls`; their outputs become `tool` messages. A function output must answer a call made
    earlier in the conversation (a 400 naming it, as OpenAI)."""
    messages: list[dict] = [{"role": "system", "content": instructions}] if instructions else []
    calls: set[str] = set()
    for item in items:
        kind = item["type"]
        if kind == "message":
            text = "".join(p.get("text", "") for p in item["content"])
            messages.append({"role": item["role"], "content": text})
        elif kind == "function_call":
            calls.add(item["call_id"])
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if item["call_id"] not in calls:
                raise _invalid(
                    "input",
                    f"No tool call found for function call output with call_id {item['call_id']}.",
                )
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return messages


# --------------------------------------------------------------------------------------------------
# Output items and stream events


def sampling_params(req: CreateResponseRequest, plan: Plan) -> SamplingParams:
    return SamplingParams(
        max_tokens=req.max_output_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        logprobs=plan.logprobs,
        top_logprobs=req.top_logprobs or 0,
        **chat.constraint(plan.spec, plan.response_format),
    )


def tool_names(plan: Plan) -> list[str] | None:
    """The functions whose calls are parsed out of the answer (None: plain text)."""
    return plan.spec.names if plan.spec is not None and plan.spec.parse else None
