"""Format checks for training files: every problem in one pass, each with its line number and a fix.

The file is read line by line as bytes, so memory stays bounded whatever its size (only the first
`MAX_STORED_PER_KIND` problems of each kind are kept; the counts stay exact). Two formats
(REFERENCE.md §6.1, §6.2):

- supervised: ``{"messages": [...], "tools"?: [...], "parallel_tool_calls"?: bool, "functions"?: [...]}``
- dpo: ``{"input": {"messages": [...], "tools"?, "parallel_tool_calls"?},
  "preferred_output": [assistant message], "non_preferred_output": [assistant message]}``

A file in the other format (or the legacy prompt/completion format) gets one ``wrong_format`` error
instead of a problem on every line. Token-level checks (truncation, special tokens, examples whose
every trained token is lost) need the base model's tokenizer and live in `analysis.py`.

Lenient on purpose: CRLF line ends and a missing final newline are fine; a UTF-8 byte order mark
and blank lines are warnings, and `iter_examples` (what training reads) skips them the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Severity = Literal["error", "warning"]

MAX_STORED_PER_KIND = 1000
METHODS = {"supervised": "chat", "dpo": "preference", "reinforcement": "prompt"}
BOM = b"\xef\xbb\xbf"

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MESSAGE_KEYS = frozenset(
    {"role", "content", "name", "weight", "tool_calls", "tool_call_id", "function_call", "refusal"}
)
CHAT_KEYS = frozenset({"messages", "tools", "parallel_tool_calls", "functions"})
PREFERENCE_KEYS = frozenset({"input", "preferred_output", "non_preferred_output"})
_FORMAT_NAMES = {
    "chat": "the chat format ({\"messages\": [...]}) used by method 'supervised'",
    "preference": 'the preference format ({"input", "preferred_output", "non_preferred_output"}) '
    "used by method 'dpo'",
    "completions": "the legacy prompt/completion format",
    "prompt": 'the prompt format ({"messages": [...ending with a user message], ...fields the grader '
    "reads}) used by method 'reinforcement'",
}


@dataclass
class Problem:
    code: str
    message: str  # a sentence that says what is wrong and how to fix it
    line: int | None  # 1-based line number in the file; None for file-level problems
    severity: Severity
    field: str | None = None  # e.g. "messages[2].role"

    def to_dict(self) -> dict:
        return {
            "code": self.code,
            "message": self.message,
            "line": self.line,
            "severity": self.severity,
            "field": self.field,
        }

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        return where + self.message


@dataclass
class ValidationReport:
    n_examples: int
    errors: list[Problem] = field(default_factory=list)  # at most MAX_STORED_PER_KIND per code
    warnings: list[Problem] = field(default_factory=list)
    stats: dict | None = None
    estimate: dict | None = None
    # Extensions beyond the minimal contract:
    error_counts: dict[str, int] = field(default_factory=dict)  # exact, even past the stored cap
    warning_counts: dict[str, int] = field(default_factory=dict)
    format: str | None = None  # "chat" | "preference" | None (unknown)
    file_kind: str = "training"  # "training" | "validation": used in messages
    validation: ValidationReport | None = None  # the validation file's own report, if any

    # -- collecting -------------------------------------------------------------------------------
    def add(self, problem: Problem) -> None:
        counts = self.error_counts if problem.severity == "error" else self.warning_counts
        n = counts.get(problem.code, 0)
        counts[problem.code] = n + 1
        if n < MAX_STORED_PER_KIND:
            (self.errors if problem.severity == "error" else self.warnings).append(problem)

    # -- reading ----------------------------------------------------------------------------------
    @property
    def n_errors(self) -> int:
        return sum(self.error_counts.values())

    @property
    def n_warnings(self) -> int:
        return sum(self.warning_counts.values())

    @property
    def ok(self) -> bool:
        """No errors in this file nor in the attached validation file (warnings are fine)."""
        return not self.error_counts and (self.validation is None or self.validation.ok)

    @property
    def error_param(self) -> str | None:
        """Which job parameter a failure points at: "training_file" or "validation_file"."""
        if self.error_counts:
            return f"{self.file_kind}_file"
        if self.validation is not None:
            return self.validation.error_param
        return None

    def job_error(self) -> tuple[str, str] | None:
        """(code, message) for the fine-tuning job's `error` when the file is not ok, worded as OpenAI
        does; the attached validation file's problems are reported when the training file has none."""
        if not self.error_counts:
            return self.validation.job_error() if self.validation is not None else None
        what = f"{self.file_kind.capitalize()} file"
        if set(self.error_counts) == {"invalid_n_examples"}:
            return "invalid_n_examples", self.errors[0].message
        real = [p for p in self.errors if p.code != "invalid_n_examples"] + [
            p for p in self.errors if p.code == "invalid_n_examples"
        ]
        real.sort(key=lambda p: -1 if p.line is None else p.line)
        n = self.n_errors
        shown = "; ".join(str(p) for p in real[:5])
        more = f"; and {n - 5} more" if n > 5 else ""
        message = (
            f"The job failed due to an invalid {what.lower()}. "
            f"{n} problem{'s' if n != 1 else ''} found: {shown}{more}. "
            f"Run `tunehouse data check` on the file to see them all."
        )
        return f"invalid_{self.file_kind}_file", message

    def to_dict(self) -> dict:
        return {
            "file_kind": self.file_kind,
            "format": self.format,
            "n_examples": self.n_examples,
            "ok": self.ok,
            "error_counts": dict(self.error_counts),
            "warning_counts": dict(self.warning_counts),
            "errors": [p.to_dict() for p in self.errors],
            "warnings": [p.to_dict() for p in self.warnings],
            "stats": self.stats,
            "estimate": self.estimate,
            "validation": self.validation.to_dict() if self.validation is not None else None,
        }


# ---------------------------------------------------------------------------------------------------
# Per-example checks. They append (code, severity, field, message) tuples: cheap on the happy path,
# and the same functions serve `validate_file` and `iter_examples`.

Found = list[tuple[str, Severity, str | None, str]]


def _type_name(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number"
    )


def _content_problems(content: Any, role: str, has_calls: bool, f: str, out: Found, *, present: bool) -> None:
    if not present:
        if not has_calls:
            out.append(
                ("message_missing_key", "error", f, f"{role} message has no `content`; add the message text")
            )
        return
    if content is None:
        if not has_calls:
            out.append(
                (
                    "missing_content",
                    "error",
                    f,
                    f"{role} message has null content; only an assistant message with tool_calls or "
                    "function_call may have null content",
                )
            )
        return
    if isinstance(content, str):
        if not content.strip() and not has_calls:
            out.append(("missing_content", "error", f, f"{role} message content is empty; add the text"))
        return
    if isinstance(content, list):
        text = False
        for j, part in enumerate(content):
            pf = f"{f}[{j}]"
            if not isinstance(part, dict):
                out.append(
                    (
                        "invalid_type",
                        "error",
                        pf,
                        f'content part is {_type_name(part)}; use {{"type": "text", "text": "..."}}',
                    )
                )
                continue
            ptype = part.get("type")
            if ptype == "text":
                t = part.get("text")
                if not isinstance(t, str):
                    out.append(
                        ("invalid_type", "error", pf + ".text", "a text content part needs a string `text`")
                    )
                elif t.strip():
                    text = True
            elif ptype in ("image_url", "input_audio", "file", "refusal"):
                out.append(
                    (
                        "unsupported_content",
                        "error",
                        pf,
                        f"content parts of type '{ptype}' are not supported: the base models are text-only; "
                        "keep only text parts",
                    )
                )
                text = True  # do not also report the message as empty
            else:
                out.append(
                    (
                        "invalid_type",
                        "error",
                        pf + ".type",
                        f'unknown content part type {ptype!r}; use {{"type": "text", "text": "..."}}',
                    )
                )
                text = True
        if not text and not has_calls:
            out.append(("missing_content", "error", f, f"{role} message has no text; add the text"))
        return
    out.append(
        (
            "invalid_type",
            "error",
            f,
            f"content is {_type_name(content)}; it must be a string or a list of text parts",
        )
    )


def _check_tool_calls(
    calls: Any, f: str, out: Found, seen_ids: set[str], tool_names: set[str] | None
) -> list[str]:
    ids: list[str] = []
    if not isinstance(calls, list) or not calls:
        out.append(
            ("invalid_tool_calls", "error", f, "tool_calls must be a non-empty array of {id, type, function}")
        )
        return ids
    for j, call in enumerate(calls):
        cf = f"{f}[{j}]"
        if not isinstance(call, dict):
            out.append(
                (
                    "invalid_tool_calls",
                    "error",
                    cf,
                    f"a tool call is {_type_name(call)}; it must be an object",
                )
            )
            continue
        cid = call.get("id")
        if not isinstance(cid, str) or not cid:
            out.append(("message_missing_key", "error", cf + ".id", "a tool call needs a string `id`"))
        elif cid in seen_ids:
            out.append(
                (
                    "tool_call_id_mismatch",
                    "error",
                    cf + ".id",
                    f"tool call id {cid!r} is used twice; ids must be unique",
                )
            )
        else:
            seen_ids.add(cid)
            ids.append(cid)
        if call.get("type", "function") != "function":
            out.append(("invalid_type", "error", cf + ".type", 'tool call `type` must be "function"'))
        fn = call.get("function")
        if not isinstance(fn, dict):
            out.append(
                (
                    "message_missing_key",
                    "error",
                    cf + ".function",
                    "a tool call needs `function`: {name, arguments}",
                )
            )
            continue
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            out.append(
                ("message_missing_key", "error", cf + ".function.name", "a tool call needs a function `name`")
            )
        elif tool_names is not None and name not in tool_names:
            out.append(
                (
                    "unknown_tool",
                    "warning",
                    cf + ".function.name",
                    f"tool call names {name!r}, which is not among this line's `tools`",
                )
            )
        args = fn.get("arguments")
        if not isinstance(args, str):
            out.append(
                (
                    "invalid_type",
                    "error",
                    cf + ".function.arguments",
                    'function `arguments` must be a JSON-encoded string, e.g. "{\\"city\\": \\"Paris\\"}"',
                )
            )
        else:
            try:
                json.loads(args)
            except ValueError:
                out.append(
                    (
                        "invalid_tool_arguments",
                        "warning",
                        cf + ".function.arguments",
                        "function `arguments` is not valid JSON",
                    )
                )
    return ids


def _check_messages(
    messages: list,
    prefix: str,
    out: Found,
    *,
    parallel: bool = True,
    tool_names: set[str] | None = None,
) -> tuple[int, int, str | None]:
    """Checks each message; returns (assistant messages, trained assistant messages, last role)."""
    n_assistant = n_trained = 0
    last_role: str | None = None
    seen_ids: set[str] = set()
    issued: set[str] = set()  # tool call ids that an assistant message made
    answered: set[str] = set()
    open_function_call = False
    pending_from: int | None = None  # index of the assistant message whose calls await answers
    for i, m in enumerate(messages):
        f = f"{prefix}[{i}]"
        if not isinstance(m, dict):
            out.append(
                ("data_type", "error", f, f"message is {_type_name(m)}; each message must be an object")
            )
            continue
        role = m.get("role")
        if "role" not in m:
            out.append(("message_missing_key", "error", f + ".role", "message has no `role`; add one"))
            role = None
        elif not isinstance(role, str) or role not in ROLES:
            out.append(
                (
                    "unrecognized_role",
                    "error",
                    f + ".role",
                    f"role {role!r} is not recognized; use system, developer, user, assistant or tool",
                )
            )
            role = None
        for key in m:
            if key not in MESSAGE_KEYS:
                out.append(
                    (
                        "message_unrecognized_key",
                        "error",
                        f"{f}.{key}",
                        f"message key {key!r} is not recognized; allowed keys are role, content, name, "
                        "weight (assistant), tool_calls (assistant), tool_call_id (tool)",
                    )
                )
        name = m.get("name")
        if name is not None and not isinstance(name, str):
            out.append(("invalid_type", "error", f + ".name", "`name` must be a string"))

        calls = m.get("tool_calls")
        fcall = m.get("function_call")
        has_calls = bool(calls) or bool(fcall)
        rolename = role or "a"

        # Answers for an earlier assistant's tool calls must come before the next turn.
        if pending_from is not None and role in ("assistant", "user", "system", "developer"):
            missing = sorted(issued - answered)
            if missing:
                out.append(
                    (
                        "missing_tool_response",
                        "warning",
                        f"{prefix}[{pending_from}].tool_calls",
                        f"tool call(s) {', '.join(missing)} get no tool message with a matching tool_call_id",
                    )
                )
            pending_from = None
            issued.clear()
            answered.clear()

        if role == "assistant":
            n_assistant += 1
            if "weight" in m:
                w = m["weight"]
                if type(w) is not int or w not in (0, 1):
                    out.append(
                        (
                            "invalid_weight",
                            "error",
                            f + ".weight",
                            f"weight is {w!r}; it must be 0 or 1 (an integer)",
                        )
                    )
                elif w == 1:
                    n_trained += 1
            else:
                n_trained += 1
            if calls is not None:
                ids = _check_tool_calls(calls, f + ".tool_calls", out, seen_ids, tool_names)
                if not parallel and isinstance(calls, list) and len(calls) > 1:
                    out.append(
                        (
                            "invalid_tool_calls",
                            "error",
                            f + ".tool_calls",
                            f"{len(calls)} tool calls in one message but this line sets parallel_tool_calls: "
                            "false; split them into separate turns or drop that setting",
                        )
                    )
                if ids:
                    issued.update(ids)
                    pending_from = i
            if fcall is not None:
                if (
                    not isinstance(fcall, dict)
                    or not isinstance(fcall.get("name"), str)
                    or not isinstance(fcall.get("arguments"), str)
                ):
                    out.append(
                        (
                            "invalid_type",
                            "error",
                            f + ".function_call",
                            'function_call must be {"name": str, "arguments": JSON string}',
                        )
                    )
                else:
                    open_function_call = True
        else:
            if "weight" in m:
                out.append(
                    (
                        "invalid_weight",
                        "error",
                        f + ".weight",
                        "`weight` is only allowed on assistant messages; remove it",
                    )
                )
            for key in ("tool_calls", "function_call"):
                if key in m:
                    out.append(
                        (
                            "message_unrecognized_key",
                            "error",
                            f"{f}.{key}",
                            f"`{key}` is only allowed on assistant messages",
                        )
                    )
        if "tool_call_id" in m and role not in ("tool", None):
            out.append(
                (
                    "message_unrecognized_key",
                    "error",
                    f + ".tool_call_id",
                    "`tool_call_id` is only allowed on tool messages",
                )
            )
        if role == "tool":
            tid = m.get("tool_call_id")
            if not isinstance(tid, str) or not tid:
                out.append(
                    (
                        "message_missing_key",
                        "error",
                        f + ".tool_call_id",
                        "tool message needs the `tool_call_id` of the assistant tool call it answers",
                    )
                )
            elif not seen_ids:
                out.append(
                    (
                        "tool_message_without_call",
                        "error",
                        f,
                        "tool message does not follow an assistant message with tool_calls; add the "
                        "assistant's tool_calls before it",
                    )
                )
            elif tid not in issued:
                out.append(
                    (
                        "tool_call_id_mismatch",
                        "error",
                        f + ".tool_call_id",
                        f"tool_call_id {tid!r} matches no tool call of the preceding assistant message "
                        f"(ids: {', '.join(sorted(issued)) or 'none'})",
                    )
                )
            elif tid in answered:
                out.append(
                    (
                        "tool_call_id_mismatch",
                        "error",
                        f + ".tool_call_id",
                        f"tool call {tid!r} is answered twice",
                    )
                )
            else:
                answered.add(tid)
        elif role == "function":
            if not isinstance(name, str) or not name:
                out.append(
                    (
                        "message_missing_key",
                        "error",
                        f + ".name",
                        "function message needs the function `name`",
                    )
                )
            if not open_function_call:
                out.append(
                    (
                        "tool_message_without_call",
                        "error",
                        f,
                        "function message does not follow an assistant function_call",
                    )
                )
            open_function_call = False

        _content_problems(
            m.get("content"),
            rolename,
            has_calls and role == "assistant",
            f + ".content",
            out,
            present="content" in m,
        )
        last_role = role
    if pending_from is not None and pending_from != len(messages) - 1:
        missing = sorted(issued - answered)
        if missing:
            out.append(
                (
                    "missing_tool_response",
                    "warning",
                    f"{prefix}[{pending_from}].tool_calls",
                    f"tool call(s) {', '.join(missing)} get no tool message with a matching tool_call_id",
                )
            )
    return n_assistant, n_trained, last_role


def _check_tools(obj: dict, prefix: str, out: Found) -> tuple[bool, set[str] | None]:
    """Checks `tools`, `functions` and `parallel_tool_calls`; returns (parallel, declared tool names)."""
    parallel = obj.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        out.append(
            (
                "invalid_type",
                "error",
                prefix + "parallel_tool_calls",
                "parallel_tool_calls must be true or false",
            )
        )
        parallel = True
    names: set[str] | None = None
    tools = obj.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            out.append(
                ("invalid_tools", "error", prefix + "tools", "`tools` must be an array of function tools")
            )
        else:
            names = set()
            for j, t in enumerate(tools):
                fn = t.get("function") if isinstance(t, dict) else None
                if (
                    not isinstance(t, dict)
                    or t.get("type", "function") != "function"
                    or not isinstance(fn, dict)
                ):
                    out.append(
                        (
                            "invalid_tools",
                            "error",
                            f"{prefix}tools[{j}]",
                            'each tool must be {"type": "function", "function": {"name", "description", "parameters"}}',
                        )
                    )
                    continue
                if not isinstance(fn.get("name"), str) or not fn["name"]:
                    out.append(
                        (
                            "invalid_tools",
                            "error",
                            f"{prefix}tools[{j}].function.name",
                            "a tool needs a `name`",
                        )
                    )
                    continue
                if "parameters" in fn and not isinstance(fn["parameters"], dict):
                    out.append(
                        (
                            "invalid_tools",
                            "error",
                            f"{prefix}tools[{j}].function.parameters",
                            "tool `parameters` must be a JSON Schema object",
                        )
                    )
                names.add(fn["name"])
    functions = obj.get("functions")
    if functions is not None:
        if not isinstance(functions, list) or not 1 <= len(functions) <= 128:
            out.append(
                (
                    "invalid_functions",
                    "error",
                    prefix + "functions",
                    "`functions` must be an array of 1 to 128 functions",
                )
            )
        else:
            names = names if names is not None else set()
            for j, fn in enumerate(functions):
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    out.append(
                        (
                            "invalid_functions",
                            "error",
                            f"{prefix}functions[{j}]",
                            "each function needs a `name`",
                        )
                    )
                else:
                    names.add(fn["name"])
    return parallel, names


def _not_an_object(obj: Any) -> Found | None:
    """The problem of a line that is not a JSON object (nothing else can be checked then)."""
    if isinstance(obj, dict):
        return None
    return [("data_type", "error", None, f"line is {_type_name(obj)}; each line must be a JSON object")]


def _messages_list(obj: dict, out: Found) -> list | None:
    """The line's `messages`, or None with the problem added when it is not a non-empty list."""
    messages = obj.get("messages")
    if isinstance(messages, list) and messages:
        return messages
    out.append(
        (
            "missing_messages_list",
            "error",
            "messages",
            "line has no `messages` list"
            if messages is None
            else "`messages` must be a non-empty array of messages",
        )
    )
    return None


def check_chat_example(obj: Any) -> Found:
    """Problems of one supervised (chat) line, already parsed."""
    if (problem := _not_an_object(obj)) is not None:
        return problem
    out: Found = []
    for key in obj:
        if key not in CHAT_KEYS:
            out.append(
                (
                    "unrecognized_key",
                    "warning",
                    key,
                    f"key {key!r} is not part of the chat format and is ignored "
                    "(allowed: messages, tools, parallel_tool_calls, functions)",
                )
            )
    messages = _messages_list(obj, out)
    if messages is None:
        return out
    parallel, names = _check_tools(obj, "", out)
    n_assistant, n_trained, _ = _check_messages(
        messages, "messages", out, parallel=parallel, tool_names=names
    )
    if n_assistant == 0:
        out.append(
            (
                "example_missing_assistant_message",
                "error",
                "messages",
                "example has no assistant message; add the reply the model should learn",
            )
        )
    elif n_trained == 0 and not any(c == "invalid_weight" for c, *_ in out):
        out.append(
            (
                "all_labels_masked",
                "error",
                "messages",
                "every assistant message has weight 0, so nothing would be trained; set weight 1 on at "
                "least one",
            )
        )
    return out


def _check_output(value: Any, key: str, out: Found) -> dict | None:
    if not isinstance(value, list) or len(value) != 1:
        out.append(
            (
                "invalid_preference_output",
                "error",
                key,
                f"`{key}` must be an array holding exactly one assistant message",
            )
        )
        return None
    msg = value[0]
    if not isinstance(msg, dict):
        out.append(("data_type", "error", key + "[0]", f"`{key}[0]` must be a message object"))
        return None
    if msg.get("role") != "assistant":
        out.append(
            (
                "invalid_preference_output",
                "error",
                key + "[0].role",
                f"`{key}` must hold an assistant message (role {msg.get('role')!r})",
            )
        )
        return None
    _check_messages(value, key, out)
    return msg


def check_preference_example(obj: Any) -> Found:
    """Problems of one DPO (preference) line, already parsed."""
    if (problem := _not_an_object(obj)) is not None:
        return problem
    out: Found = []
    for key in obj:
        if key in ("preferred_completion", "non_preferred_completion"):
            new = key.replace("completion", "output")
            out.append(("missing_key", "error", key, f"`{key}` is the old name: rename it to `{new}`"))
        elif key not in PREFERENCE_KEYS:
            out.append(
                (
                    "unrecognized_key",
                    "warning",
                    key,
                    f"key {key!r} is not part of the preference format and is ignored",
                )
            )
    inp = obj.get("input")
    if not isinstance(inp, dict):
        out.append(
            (
                "missing_key" if inp is None else "invalid_type",
                "error",
                "input",
                'line needs `input`: {"messages": [...]} with the conversation before the preferred reply',
            )
        )
    else:
        messages = inp.get("messages")
        if not isinstance(messages, list) or not messages:
            out.append(
                (
                    "missing_messages_list",
                    "error",
                    "input.messages",
                    "`input.messages` must be a non-empty array",
                )
            )
        else:
            parallel, names = _check_tools(inp, "input.", out)
            _, _, last = _check_messages(messages, "input.messages", out, parallel=parallel, tool_names=names)
            if last == "assistant":
                out.append(
                    (
                        "invalid_preference_input",
                        "error",
                        f"input.messages[{len(messages) - 1}]",
                        "the last input message is an assistant message; the conversation must end with the "
                        "user (or tool) turn that the preferred and non-preferred outputs answer",
                    )
                )
    outputs = []
    for key in ("preferred_output", "non_preferred_output"):
        if key not in obj:
            if key.replace("output", "completion") not in obj:
                out.append(
                    ("missing_key", "error", key, f'line has no `{key}`; add [{{"role": "assistant", ...}}]')
                )
            continue
        outputs.append(_check_output(obj[key], key, out))
    if len(outputs) == 2 and outputs[0] is not None and outputs[0] == outputs[1]:
        out.append(
            (
                "identical_outputs",
                "warning",
                "non_preferred_output",
                "preferred and non-preferred outputs are identical, so the pair teaches nothing",
            )
        )
    return out


def check_prompt_example(obj: Any) -> Found:
    """Problems of one reinforcement line: a conversation that ends where the model answers (a user
    or tool message), with optional tools. Every other key is the grader's (`{{item.*}}`), so none
    is unrecognized; whether the grader finds what it references is checked with the grader
    (evals.definitions), which this layer does not know."""
    if (problem := _not_an_object(obj)) is not None:
        return problem
    out: Found = []
    messages = _messages_list(obj, out)
    if messages is None:
        return out
    parallel, names = _check_tools(obj, "", out)
    _check_messages(messages, "messages", out, parallel=parallel, tool_names=names)
    last = messages[-1].get("role") if isinstance(messages[-1], dict) else None
    if last not in ("user", "tool"):
        out.append(
            (
                "prompt_not_ending_with_user",
                "error",
                f"messages[{len(messages) - 1}]",
                f"a reinforcement prompt must end with a user (or tool) message, the turn the model "
                f"answers; this one ends with {last!r}. Move the reference answer to a field the grader "
                "reads, e.g. {{item.reference}}",
            )
        )
    return out


_CHECKERS: dict[str, Callable[[Any], Found]] = {
    "chat": check_chat_example,
    "preference": check_preference_example,
    "prompt": check_prompt_example,
}


def sniff_format(obj: Any) -> str | None:
    """Which format one parsed line is in: "chat", "preference", "completions", or None."""
    if not isinstance(obj, dict):
        return None
    if "messages" in obj:
        return "chat"
    if "input" in obj and (
        "preferred_output" in obj or "non_preferred_output" in obj or "preferred_completion" in obj
    ):
        return "preference"
    if "prompt" in obj and "completion" in obj:
        return "completions"
    return None


def _format_for(method: str) -> str:
    try:
        return METHODS[method]
    except KeyError:
        raise ValueError(f"unsupported method {method!r}; expected one of {', '.join(METHODS)}") from None


# ---------------------------------------------------------------------------------------------------
# Reading


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, bytes without the line end). CRLF and a missing final newline are fine."""
    with open(path, "rb", buffering=1 << 20) as f:
        for lineno, raw in enumerate(f, 1):
            if raw[-1:] == b"\n":
                raw = raw[:-1]
                if raw[-1:] == b"\r":
                    raw = raw[:-1]
            yield lineno, raw


def validate_file(
    path: Path, *, method: str = "supervised", min_examples: int = 10, file_kind: str = "training"
) -> ValidationReport:
    """Pure format check of a JSONL training file, streaming; collects every problem.

    Raises OSError when the file cannot be read, ValueError for an unknown method.
    """
    expected = _format_for(method)
    check = _CHECKERS[expected]
    report = ValidationReport(n_examples=0, file_kind=file_kind, format=None)
    add = report.add
    loads = json.loads
    n = 0
    mode = expected  # becomes "skip" once the file is found to be in another format
    for lineno, raw in _lines(path):
        if raw[:3] == BOM:
            add(
                Problem(
                    "bom",
                    "line starts with a UTF-8 byte order mark; it is ignored, but save the file as UTF-8 "
                    "without BOM",
                    lineno,
                    "warning",
                )
            )
            raw = raw[3:]
        if not raw.strip():
            add(Problem("blank_line", "line is blank and is skipped; remove it", lineno, "warning"))
            continue
        n += 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            add(
                Problem(
                    "non_utf8",
                    f"line is not valid UTF-8 (byte {e.start + 1} of the line is 0x{raw[e.start]:02x}); "
                    "save the file as UTF-8",
                    lineno,
                    "error",
                )
            )
            continue
        try:
            obj = loads(text)
        except ValueError as e:
            detail = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
            add(
                Problem(
                    "invalid_json",
                    f"line is not valid JSON ({detail}); each line must be one complete JSON object",
                    lineno,
                    "error",
                )
            )
            continue
        if mode == "skip":
            continue
        if report.format is None:
            found = sniff_format(obj)
            if found is not None:
                report.format = found
                # Prompts are chat lines without the answer: "chat" is what sniffing sees.
                if found != expected and not (expected == "prompt" and found == "chat"):
                    add(
                        Problem(
                            "wrong_format",
                            f"Invalid file format: the file is in {_FORMAT_NAMES[found]}, but the job's method "
                            f"is {method!r}, which needs {_FORMAT_NAMES[expected]}. Use the matching method "
                            "or convert the file.",
                            lineno,
                            "error",
                        )
                    )
                    mode = "skip"
                    continue
        found_problems = check(obj)
        if found_problems:
            for code, severity, fld, message in found_problems:
                add(Problem(code, message, lineno, severity, fld))
    report.n_examples = n
    if n == 0:
        add(
            Problem(
                "empty_file",
                f"{file_kind.capitalize()} file has no examples; add one JSON object per line",
                None,
                "error",
            )
        )
    elif n < min_examples:
        add(
            Problem(
                "invalid_n_examples",
                f"{file_kind.capitalize()} file has {n} example(s), but must have at least "
                f"{min_examples} examples",
                None,
                "error",
            )
        )
    return report


def iter_examples(path: Path, *, method: str = "supervised") -> Iterator[tuple[int, dict]]:
    """(line number, example) for every line that passes the format checks, read the way
    `validate_file` reads (BOM and blank lines skipped, CRLF accepted). What training should read."""
    check = _CHECKERS[_format_for(method)]
    for lineno, raw in _lines(path):
        if raw[:3] == BOM:
            raw = raw[3:]
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except ValueError:
            continue
        if not any(sev == "error" for _, sev, _, _ in check(obj)):
            yield lineno, obj
