"""Function calling: `tools` in the prompt, `tool_choice` as a grammar, tool calls parsed back out.

The text format is the one training data uses (`tunehouse.data.chat`), Hermes style, so a model
fine-tuned on tool-call examples answers in the format this module parses:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Chat templates that render tools themselves (their template mentions `tool_calls`) get the tools
through `apply_chat_template(tools=...)`. Templates that do not (SmolLM2's ChatML) get the tools as
a preamble appended to the system message, `tunehouse.data.chat.TOOLS_PREAMBLE` (the Hermes / Qwen 2.5
wording), as training does, so a model fine-tuned on tool calls sees the prompt it was trained on.

`tool_choice`:
- "none": the tools are left out of the prompt and the output is plain text.
- "auto" (the default with tools): the model decides; any well-formed `<tool_call>` blocks in its
  answer become `tool_calls`.
- "required" / {"type": "function", "function": {"name": ...}}: constrained decoding (llguidance)
  makes the answer one tool call (or several, with `parallel_tool_calls`) to one of the tools (or
  the named one), with arguments that validate against its `parameters` schema.

This module imports neither torch nor transformers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from tunehouse import ids
from tunehouse.inference.constrained import InvalidResponseFormat, compile_lark, json_options

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


class InvalidTools(ValueError):
    """`tools` or `tool_choice` is malformed (a 400 on `param`)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class ToolSpec:
    """What a request asks of function calling, once validated."""

    tools: list[dict]  # as sent (OpenAI's {"type": "function", "function": {...}})
    choice: str  # "none" | "auto" | "required" | "named"
    named: str | None = None
    parallel: bool = True
    names: list[str] = field(default_factory=list)

    @property
    def in_prompt(self) -> bool:
        return self.choice != "none"

    @property
    def parse(self) -> bool:
        return self.choice != "none"


def validate(tools: list | None, tool_choice: str | dict | None, parallel: bool | None) -> ToolSpec | None:
    """Check `tools` and `tool_choice` as OpenAI does. Returns None when the request has no tools."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise InvalidTools(
                "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
                "tool_choice",
            )
        return None
    names = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise InvalidTools(
                f"Invalid 'tools[{i}]': expected an object with type 'function' and a 'function' object.",
                f"tools[{i}]",
            )
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidTools(
                f"Invalid 'tools[{i}].function.name': it must be 1 to 64 characters of a-z, A-Z, 0-9, "
                "underscores and dashes.",
                f"tools[{i}].function.name",
            )
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise InvalidTools(
                f"Invalid 'tools[{i}].function.parameters': expected a JSON Schema object.",
                f"tools[{i}].function.parameters",
            )
        names.append(name)
    if len(set(names)) != len(names):
        raise InvalidTools("Invalid 'tools': function names must be unique.", "tools")

    named = None
    if tool_choice is None:
        choice = "auto"
    elif isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise InvalidTools(
                f"Invalid value for 'tool_choice': {tool_choice!r}. Supported values are: 'none', 'auto', "
                "'required', or an object naming a function.",
                "tool_choice",
            )
        choice = tool_choice
    else:
        fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
        named = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type") != "function" or not isinstance(named, str):
            raise InvalidTools(
                "Invalid 'tool_choice': expected {'type': 'function', 'function': {'name': ...}}.",
                "tool_choice",
            )
        if named not in names:
            raise InvalidTools(
                f"Invalid 'tool_choice': function '{named}' is not among the tools.", "tool_choice"
            )
        choice = "named"
    spec = ToolSpec(tools=tools, choice=choice, named=named, parallel=parallel is not False, names=names)
    if spec.choice in ("required", "named"):
        grammar(spec)  # a parameters schema that does not compile is the client's error
    return spec


def grammar(spec: ToolSpec) -> str:
    """The llguidance grammar of a forced answer: tool calls only, in the training format, each with
    arguments that validate against its function's `parameters` (strict where the tool says so)."""
    tools = [t for t in spec.tools if spec.choice != "named" or t["function"]["name"] == spec.named]
    rules = []
    alternatives = []
    for i, tool in enumerate(tools):
        fn = tool["function"]
        schema = dict(fn.get("parameters") or {"type": "object"})
        schema["x-guidance"] = json_options(strict=bool(fn.get("strict")))
        name = json.dumps(fn["name"])[1:-1]  # names are [a-zA-Z0-9_-]: nothing to escape
        rules.append(f"args{i}: %json {json.dumps(schema)}")
        alternatives.append(
            f'"{OPEN}\\n{{\\"name\\": \\"{name}\\", \\"arguments\\": " args{i} "}}\\n{CLOSE}"'
        )
    call = "call: " + " | ".join(alternatives)
    start = 'start: call ("\\n" call)*' if spec.parallel else "start: call"
    try:
        return compile_lark("\n".join([start, call, *rules]) + "\n")
    except InvalidResponseFormat as e:
        raise InvalidTools(
            f"Invalid 'tools': a function's parameters schema cannot be used: {e}", "tools"
        ) from None


# --------------------------------------------------------------------------------------------------
# Parsing the model's answer into OpenAI tool calls, piece by piece


@dataclass
class ToolCallDelta:
    """A streamed piece of a tool call, as OpenAI's `delta.tool_calls[0]`: the first piece of a call
    carries its id and name, the next ones fragments of its `arguments` string."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def wire(self) -> dict:
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
            out["function"] = {"name": self.name, "arguments": self.arguments}
        else:
            out["function"] = {"arguments": self.arguments}
        return out


_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"arguments"\s*:\s*')
_TAIL = re.compile(r"\s*\}\s*$")


def _longest_prefix_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a start of `marker` (text that must wait)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class ToolCallParser:
    """Splits a model's answer, fed in pieces, into content text and tool-call deltas.

    Text outside `<tool_call>` blocks is content. Inside a block, the call's name is handed out as
    soon as `{"name": "...", "arguments": ` is complete, then the arguments text as it arrives,
    holding back only what could be the block's closing `}` and tag. A block whose JSON turns out
    broken (or names no known tool) before its name went out is handed back as content, as vLLM's
    parsers do. Feeding the whole text at once gives the same calls as feeding it token by token."""

    def __init__(self, names: list[str]):
        self.names = set(names)
        self.buffer = ""  # text not handed out yet
        self.inside = False
        self.calls: list[dict] = []  # complete calls: {"id", "name", "arguments"}
        self.index = -1  # index of the call being streamed
        self.header_sent = False
        self.args_sent = ""

    def feed(self, text: str, *, final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        self.buffer += text
        content, deltas = "", []
        while True:
            if not self.inside:
                at = self.buffer.find(OPEN)
                if at < 0:
                    keep = 0 if final else _longest_prefix_suffix(self.buffer, OPEN)
                    content += self.buffer[: len(self.buffer) - keep]
                    self.buffer = self.buffer[len(self.buffer) - keep :]
                    break
                content += self.buffer[:at]
                self.buffer = self.buffer[at + len(OPEN) :]
                self.inside, self.header_sent, self.args_sent = True, False, ""
                continue
            end = self.buffer.find(CLOSE)
            body = self.buffer if end < 0 else self.buffer[:end]
            if not self.header_sent:
                m = _HEADER.match(body)
                if m and m.group(1) in self.names:
                    self.index += 1
                    call_id = ids.tool_call_id()
                    self.calls.append({"id": call_id, "name": m.group(1), "arguments": ""})
                    deltas.append(ToolCallDelta(index=self.index, id=call_id, name=m.group(1)))
                    self.header_sent = True
            if end < 0:
                if self.header_sent and not final:
                    args = _HEADER.match(body).group(0)
                    raw = body[len(args) :]
                    hold = re.search(r"\s*\}?\s*<?/?[a-z_]*>?$", raw)  # maybe the closing `}` and tag
                    ready = raw[: hold.start()] if hold else raw
                    if len(ready) > len(self.args_sent):
                        deltas.append(ToolCallDelta(index=self.index, arguments=ready[len(self.args_sent) :]))
                        self.args_sent = ready
                if final:  # cut by max_tokens inside a block
                    if self.header_sent:
                        rest = body[_HEADER.match(body).end() :]
                        if len(rest) > len(self.args_sent) and rest.startswith(self.args_sent):
                            deltas.append(
                                ToolCallDelta(index=self.index, arguments=rest[len(self.args_sent) :])
                            )
                            self.calls[-1]["arguments"] = rest
                    else:
                        content += OPEN + self.buffer
                    self.buffer = ""
                break
            # The block is complete: check it and hand out what is left of its arguments.
            self.buffer = self.buffer[end + len(CLOSE) :]
            self.inside = False
            call = _parse_call(body)
            if not self.header_sent:
                if call is None or call[0] not in self.names:
                    content += OPEN + body + CLOSE  # not a tool call after all
                    continue
                self.index += 1
                call_id = ids.tool_call_id()
                self.calls.append({"id": call_id, "name": call[0], "arguments": ""})
                deltas.append(ToolCallDelta(index=self.index, id=call_id, name=call[0]))
            args = self._final_arguments(body, call)
            if args.startswith(self.args_sent) and len(args) > len(self.args_sent):
                deltas.append(ToolCallDelta(index=self.index, arguments=args[len(self.args_sent) :]))
            self.calls[-1]["arguments"] = args if args.startswith(self.args_sent) else self.args_sent
        return content, deltas

    @staticmethod
    def _final_arguments(body: str, call: tuple[str, Any] | None) -> str:
        """The arguments as the model wrote them when the call has the usual key order (so streamed
        fragments add up to it), else re-serialized."""
        m = _HEADER.match(body)
        if m and call is not None:
            raw = _TAIL.sub("", body[m.end() :]).strip()
            try:
                if json.loads(raw) == call[1]:
                    return raw if not isinstance(call[1], str) else call[1]
            except json.JSONDecodeError:
                pass
        if call is None:
            return _TAIL.sub("", body[m.end() :]).strip() if m else ""
        return call[1] if isinstance(call[1], str) else json.dumps(call[1])


def _parse_call(body: str) -> tuple[str, Any] | None:
    try:
        doc = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str):
        return None
    args = doc.get("arguments", doc.get("parameters", {}))
    return doc["name"], args


def parse(text: str, names: list[str]) -> tuple[str | None, list[dict]]:
    """A whole answer → (content or None, tool calls as {"id", "name", "arguments"})."""
    parser = ToolCallParser(names)
    content, _ = parser.feed(text, final=True)
    if parser.calls:
        return content.strip() or None, parser.calls
    return content, parser.calls
