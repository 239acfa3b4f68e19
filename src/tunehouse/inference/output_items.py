"""Engine output → the output items of OpenAI's Responses API, and the stream events that build them.

Shared by /v1/responses (streamed or not, api/responses/service.py) and batches over /v1/responses
(jobs/batch.py), so every path gives the same items for the same text: a message with one
`output_text` part, and one `function_call` item per tool-call block the model wrote (parsed by
`inference/tools.py`, in the format training uses). Imports neither torch nor transformers.
"""

from __future__ import annotations

from tunehouse import ids
from tunehouse.inference import tools as tool_calls
from tunehouse.inference.engine import Delta, TokenLogprob


def _logprobs(entries: list[TokenLogprob] | None) -> list[dict]:
    return [
        {
            "token": e.token,
            "logprob": e.logprob,
            "bytes": e.bytes,
            "top_logprobs": [
                {"token": t.token, "logprob": t.logprob, "bytes": t.bytes} for t in e.top_logprobs
            ],
        }
        for e in entries or []
    ]


class OutputBuilder:
    """Engine deltas → output items, and the stream events that build them (without sequence
    numbers). Text goes into a message item's `output_text` part; each tool-call block the model
    writes becomes a `function_call` item. Whitespace between items opens no message."""

    def __init__(self, tool_names: list[str] | None, *, max_calls: int | None, logprobs: bool):
        """`tool_names`: the functions whose calls are parsed out of the text (None: plain text)."""
        self.parser = tool_calls.ToolCallParser(tool_names) if tool_names is not None else None
        self.max_calls = max_calls
        self.logprobs = logprobs
        self.items: list[dict] = []
        self.open: dict | None = None  # the item being written
        self.pending = ""  # whitespace not yet given to a message
        self.pending_logprobs: list[dict] = []
        self.call_items: dict[int, dict] = {}  # parser's call index → its item
        self.finish_reason: str | None = None

    # -- items
    def _close(self, status: str) -> list[dict]:
        item, self.open = self.open, None
        if item is None:
            return []
        index = self.items.index(item)
        item["status"] = status
        if item["type"] == "message":
            part = item["content"][0]
            return [
                {
                    "type": "response.output_text.done",
                    "item_id": item["id"],
                    "output_index": index,
                    "content_index": 0,
                    "text": part["text"],
                    "logprobs": part["logprobs"],
                },
                {
                    "type": "response.content_part.done",
                    "item_id": item["id"],
                    "output_index": index,
                    "content_index": 0,
                    "part": dict(part),
                },
                {"type": "response.output_item.done", "output_index": index, "item": _copy(item)},
            ]
        call = self.parser.calls[item.pop("_k")] if self.parser is not None else None
        if call is not None and call["arguments"]:
            item["arguments"] = call["arguments"]
        return [
            {
                "type": "response.function_call_arguments.done",
                "item_id": item["id"],
                "output_index": index,
                "name": item["name"],
                "arguments": item["arguments"],
            },
            {"type": "response.output_item.done", "output_index": index, "item": _copy(item)},
        ]

    def _text(self, text: str, logprobs: list[dict]) -> list[dict]:
        events: list[dict] = []
        if not text and not logprobs:
            return events
        if self.open is None or self.open["type"] != "message":
            if not text.strip():
                self.pending += text
                self.pending_logprobs += logprobs
                return events
            events += self._close("completed")
            events += self._open_message()
            text, logprobs = self.pending + text, self.pending_logprobs + logprobs
            self.pending, self.pending_logprobs = "", []
        item = self.open
        part = item["content"][0]
        part["text"] += text
        part["logprobs"] += logprobs
        events.append(
            {
                "type": "response.output_text.delta",
                "item_id": item["id"],
                "output_index": self.items.index(item),
                "content_index": 0,
                "delta": text,
                "logprobs": logprobs,
            }
        )
        return events

    def _call(self, piece: tool_calls.ToolCallDelta) -> list[dict]:
        events: list[dict] = []
        if piece.id is not None:  # a new call
            if self.max_calls is not None and len(self.call_items) >= self.max_calls:
                return events  # beyond `max_tool_calls` / `parallel_tool_calls: false`: not made
            events += self._close("completed")
            self.pending, self.pending_logprobs = "", []
            item = {
                "id": ids.response_item_id("fc"),
                "type": "function_call",
                "status": "in_progress",
                "arguments": "",
                "call_id": piece.id,
                "name": piece.name,
            }
            self.items.append(item)
            self.call_items[piece.index] = item
            self.open = item
            events.append(
                {
                    "type": "response.output_item.added",
                    "output_index": len(self.items) - 1,
                    "item": _copy(item),
                }
            )
            item["_k"] = piece.index
        item = self.call_items.get(piece.index)
        if item is None or item is not self.open or not piece.arguments:
            return events
        item["arguments"] += piece.arguments
        events.append(
            {
                "type": "response.function_call_arguments.delta",
                "item_id": item["id"],
                "output_index": self.items.index(item),
                "delta": piece.arguments,
            }
        )
        return events

    def feed(self, delta: Delta) -> list[dict]:
        final = delta.finish_reason is not None
        logprobs = _logprobs(delta.logprobs) if self.logprobs else []
        if self.parser is None:
            events = self._text(delta.text, logprobs)
        else:
            text, pieces = self.parser.feed(delta.text, final=final)
            events = self._text(text, logprobs)
            for piece in pieces:
                events += self._call(piece)
        if final:
            self.finish_reason = delta.finish_reason
        return events

    def finish(self) -> list[dict]:
        """Close what is open; an answer with no item at all is an (empty) message."""
        events: list[dict] = []
        if not self.items:
            events += self._text_forced()
        events += self._close(self.item_status)
        return events

    def _open_message(self) -> list[dict]:
        """A new assistant message item with one empty output_text part, and its two events."""
        item = {
            "id": ids.response_item_id("msg"),
            "type": "message",
            "status": "in_progress",
            "content": [],
            "role": "assistant",
        }
        self.items.append(item)
        self.open = item
        index = len(self.items) - 1
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        events = [
            {"type": "response.output_item.added", "output_index": index, "item": _copy(item)},
            {
                "type": "response.content_part.added",
                "item_id": item["id"],
                "output_index": index,
                "content_index": 0,
                "part": dict(part),
            },
        ]
        item["content"].append(part)
        return events

    def _text_forced(self) -> list[dict]:
        text, self.pending = self.pending, ""
        logprobs, self.pending_logprobs = self.pending_logprobs, []
        events = self._open_message()
        item, index = self.open, len(self.items) - 1
        part = item["content"][0]
        part["text"], part["logprobs"] = text, logprobs
        if text:
            events.append(
                {
                    "type": "response.output_text.delta",
                    "item_id": item["id"],
                    "output_index": index,
                    "content_index": 0,
                    "delta": text,
                    "logprobs": logprobs,
                }
            )
        return events

    @property
    def incomplete(self) -> bool:
        return self.finish_reason == "length"

    @property
    def item_status(self) -> str:
        return "incomplete" if self.incomplete else "completed"

    def output(self) -> list[dict]:
        return [_copy(item) for item in self.items]


def _copy(item: dict) -> dict:
    out = {k: v for k, v in item.items() if not k.startswith("_")}
    if "content" in out:
        out["content"] = [dict(p, logprobs=list(p.get("logprobs", []))) for p in out["content"]]
    return out


def usage(input_tokens: int, output_tokens: int) -> dict:
    """OpenAI's ResponseUsage. The engine reports no cache hits or reasoning: those details are 0."""
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def finish(
    response: dict, builder: OutputBuilder, *, input_tokens: int, output_tokens: int, now: int
) -> dict:
    """A Response object (as `response_object` made it) once its generation ended: its output,
    usage, and status (`incomplete` when cut by `max_output_tokens`)."""
    status = "incomplete" if builder.incomplete else "completed"
    return {
        **response,
        "status": status,
        "completed_at": now if status == "completed" else None,
        "incomplete_details": {"reason": "max_output_tokens"} if builder.incomplete else None,
        "output": builder.output(),
        "usage": usage(input_tokens, output_tokens),
    }
