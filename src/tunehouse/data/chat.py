"""Chat examples → token ids and a mask of the tokens that carry loss.

The base model's own chat template renders every example, so training sees exactly the text
inference will produce. Which tokens are trained is found by rendering prefixes: an assistant
message's span is what its own rendering adds after the generation prompt. This works for any
prefix-stable template (ChatML, Llama 3, Mistral, …) without `{% generation %}` markers.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any


class TemplateError(ValueError):
    """The chat template cannot render this example in a way we can mask."""


@dataclass
class TokenizedExample:
    input_ids: list[int]
    trained: list[bool]  # same length as input_ids; True where the loss is computed
    n_tokens: int  # before truncation
    truncated: bool

    @property
    def n_trained(self) -> int:
        return sum(self.trained)


def content_text(content: Any) -> str:
    """OpenAI content is a string, a list of text parts, or null."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return str(content)


# Templates without tool support (SmolLM2's ChatML) get the tools as this preamble, appended to the
# system message, in training and in serving alike (the Hermes / Qwen 2.5 wording).
TOOLS_PREAMBLE = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def preamble(tools: list[dict]) -> str:
    return TOOLS_PREAMBLE.format(tools="\n".join(json.dumps(t) for t in tools))


def with_preamble(messages: list[dict], tools: list[dict]) -> list[dict]:
    """The messages with the tools preamble appended to the system message (or as a first one).
    Call with normalized messages (roles system/user/assistant/tool, text content)."""
    text = preamble(tools)
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        first["content"] = (first.get("content") or "").rstrip() + "\n\n" + text
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _tool_calls_text(tool_calls: list[dict]) -> str:
    # Templates without tool support still need the calls in the text: Hermes-style tags, which
    # the serving side parses back into OpenAI tool_calls.
    parts = []
    for call in tool_calls:
        fn = call.get("function", {})
        args = fn.get("arguments", "{}")
        with contextlib.suppress(json.JSONDecodeError):
            args = json.loads(args) if isinstance(args, str) else args
        parts.append(
            "<tool_call>\n" + json.dumps({"name": fn.get("name"), "arguments": args}) + "\n</tool_call>"
        )
    return "\n".join(parts)


def normalize_messages(messages: list[dict], *, template_has_tools: bool = False) -> list[dict]:
    """Messages as a plain-string template expects them: text content, `developer` as `system`,
    tool calls rendered in the text when the template does not handle them itself."""
    out = []
    for m in messages:
        role = m.get("role")
        role = "system" if role == "developer" else role
        text = content_text(m.get("content"))
        msg: dict[str, Any] = {"role": role, "content": text}
        calls = m.get("tool_calls") or (
            [{"function": m["function_call"]}] if m.get("function_call") else None
        )
        if calls:
            if template_has_tools:
                msg["tool_calls"] = calls
            else:
                msg["content"] = (text + "\n" if text else "") + _tool_calls_text(calls)
        if role in ("tool", "function") and not template_has_tools:
            msg["role"] = "tool"
        if "tool_call_id" in m:
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out


def template_supports_tools(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return "tool_calls" in template


def render(tokenizer, messages: list[dict], *, add_generation_prompt: bool, tools: list | None = None) -> str:
    kwargs = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )


def tokenize_chat(tokenizer, example: dict, *, max_length: int | None = None) -> TokenizedExample:
    """One training line ({"messages": [...], "tools"?: [...]}) → ids and trained-token mask.

    Assistant messages with weight 0 are context, not targets. Over-long examples are truncated
    from the end, as OpenAI does.
    """
    has_tools = template_supports_tools(tokenizer)
    raw = example["messages"]
    messages = normalize_messages(raw, template_has_tools=has_tools)
    tools = example.get("tools") or None
    if tools and not has_tools:
        # The prompt serving builds for a request with these tools (tunehouse.inference.hf).
        messages = with_preamble(messages, tools)
        if len(messages) > len(raw):
            raw = [{"role": "system"}, *raw]  # the preamble's own system message
        tools = None
    full = render(tokenizer, messages, add_generation_prompt=False, tools=tools)

    spans: list[tuple[int, int]] = []
    for i, (m, r) in enumerate(zip(messages, raw, strict=True)):
        if m["role"] != "assistant" or r.get("weight", 1) == 0:
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools) if i else ""
        upto = render(tokenizer, messages[: i + 1], add_generation_prompt=False, tools=tools)
        if i and not upto.startswith(before) or not full.startswith(upto):
            raise TemplateError(
                f"the chat template does not render message {i + 1} as a prefix of the conversation"
            )
        # Without a generation prompt for the empty prefix, start at the header of this message.
        start = len(before) if i else len(render(tokenizer, [], add_generation_prompt=True, tools=tools))
        spans.append((start, len(upto)))

    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    trained = [any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]]
    n = len(ids)
    truncated = max_length is not None and n > max_length
    if truncated:
        ids, trained = ids[:max_length], trained[:max_length]
    return TokenizedExample(input_ids=ids, trained=trained, n_tokens=n, truncated=truncated)


def prompt_ids(tokenizer, example: dict) -> list[int]:
    """A reinforcement line's prompt ({"messages": [... ending with a user turn], "tools"?}) as
    token ids, ending with the generation prompt: what the model continues, rendered exactly as
    `tokenize_chat` renders a conversation (and as serving renders a request)."""
    has_tools = template_supports_tools(tokenizer)
    messages = normalize_messages(example["messages"], template_has_tools=has_tools)
    tools = example.get("tools") or None
    if tools and not has_tools:
        messages, tools = with_preamble(messages, tools), None
    text = render(tokenizer, messages, add_generation_prompt=True, tools=tools)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
