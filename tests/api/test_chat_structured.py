"""response_format (json_object, json_schema) through the official SDK, on the tiny random model:
constrained decoding makes its garbage parse and validate, streamed or not."""

import json

import openai
import pytest

from tests.conftest import TINY_MODEL
from tests.inference.test_constrained import SCHEMA, validate

# Constrained decoding and tool calls: the same on either database (PostgreSQL pass skips them).
pytestmark = pytest.mark.one_database

MESSAGES = [{"role": "user", "content": "Classify this in JSON."}]
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def client(shared_server):
    return shared_server.client()


def test_json_schema_completion(client):
    out = client.chat.completions.create(
        model=TINY_MODEL, messages=MESSAGES, response_format=RESPONSE_FORMAT, n=2, seed=1, max_tokens=256
    )
    assert len(out.choices) == 2
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        validate(json.loads(choice.message.content), SCHEMA)


def test_json_object_and_schema_streamed(client, default_model_dir):
    from transformers import AutoTokenizer

    # The random model rarely closes a free-form string by chance: a bias towards the token "{}"
    # makes it answer the empty object (logit_bias is applied before the grammar's mask, so the
    # answer is valid JSON whatever the bias).
    empty = AutoTokenizer.from_pretrained(default_model_dir).convert_tokens_to_ids("{}")
    for rf, bias in (({"type": "json_object"}, {str(empty): 100}), (RESPONSE_FORMAT, None)):
        stream = client.chat.completions.create(
            model=TINY_MODEL,
            messages=MESSAGES,
            response_format=rf,
            seed=2,
            max_tokens=256,
            stream=True,
            logit_bias=bias,
        )
        text, finish = "", None
        for chunk in stream:
            for c in chunk.choices:
                text += c.delta.content or ""
                finish = c.finish_reason or finish
        assert finish == "stop", text
        doc = json.loads(text)
        assert isinstance(doc, dict)
        if rf is RESPONSE_FORMAT:
            validate(doc, SCHEMA)


def test_max_tokens_cuts_with_length(client):
    out = client.chat.completions.create(
        model=TINY_MODEL, messages=MESSAGES, response_format=RESPONSE_FORMAT, max_tokens=2, temperature=0
    )
    assert out.choices[0].finish_reason == "length" and out.choices[0].message.content.startswith("{")


def test_invalid_response_format_is_400(client):
    bad = [
        {"type": "xml"},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"name": "no spaces allowed", "schema": SCHEMA}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": "not an object"}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
    ]
    for rf in bad:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(
                    model=TINY_MODEL, messages=MESSAGES, response_format=rf, stream=stream
                )
            assert e.value.body["param"] == "response_format", e.value.body


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
            "strict": True,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _check_call(name: str, arguments: str) -> None:
    tool = next(t for t in TOOLS if t["function"]["name"] == name)
    validate(json.loads(arguments), tool["function"]["parameters"])


def test_required_and_named_tool_choice_always_call(client):
    # The tiny random model never calls a tool on its own: the grammar makes it.
    for choice in ("required", {"type": "function", "function": {"name": "add"}}):
        out = client.chat.completions.create(
            model=TINY_MODEL,
            messages=ASK,
            tools=TOOLS,
            tool_choice=choice,
            n=3,
            seed=3,
            max_tokens=200,
            parallel_tool_calls=False,
        )
        for c in out.choices:
            assert c.finish_reason == "tool_calls", c
            assert c.message.content is None and len(c.message.tool_calls) == 1
            call = c.message.tool_calls[0]
            assert call.type == "function" and call.id.startswith("call_")
            _check_call(call.function.name, call.function.arguments)
            if isinstance(choice, dict):
                assert call.function.name == "add"


def test_tool_calls_round_trip_streamed(client):
    kwargs = dict(model=TINY_MODEL, messages=ASK, tools=TOOLS, tool_choice="required", seed=5, max_tokens=200)
    full = client.chat.completions.create(**kwargs, parallel_tool_calls=False)
    chunks = list(client.chat.completions.create(**kwargs, parallel_tool_calls=False, stream=True))
    calls: dict[int, dict] = {}
    finish = None
    for chunk in chunks:
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                if d.id:
                    calls[d.index] = {
                        "id": d.id,
                        "name": d.function.name,
                        "arguments": d.function.arguments or "",
                    }
                else:
                    calls[d.index]["arguments"] += d.function.arguments
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == full.choices[0].message.tool_calls[0].function.name
    assert calls[0]["arguments"] == full.choices[0].message.tool_calls[0].function.arguments
    _check_call(calls[0]["name"], calls[0]["arguments"])

    # The call goes back in as the assistant's message, its result as a tool message.
    call = full.choices[0].message.tool_calls[0]
    follow = client.chat.completions.create(
        model=TINY_MODEL,
        messages=[
            *ASK,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
        ],
        tools=TOOLS,
        max_tokens=5,
        temperature=0,
    )
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tool_call_parser_pieces_add_up():
    from tunehouse.inference.tools import ToolCallParser, parse

    text = 'Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 22}}\n</tool_call>'
    content, calls = parse(text, ["add"])
    assert (
        content == "Sure."
        and calls[0]["name"] == "add"
        and json.loads(calls[0]["arguments"]) == {"a": 1, "b": 22}
    )
    parser, streamed, args = ToolCallParser(["add"]), "", ""
    for ch in text:
        piece, deltas = parser.feed(ch)
        streamed += piece
        args += "".join(d.arguments for d in deltas)
    piece, deltas = parser.feed("", final=True)
    args += "".join(d.arguments for d in deltas)
    assert streamed.strip() == "Sure." and args == calls[0]["arguments"]
    assert parse("no <tool_call> here", ["add"]) == ("no <tool_call> here", [])


def test_invalid_tools_are_400(client):
    bad = [
        dict(tools=[{"type": "function", "function": {"name": "has space"}}]),
        dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "missing"}}),
        dict(tools=TOOLS, tool_choice="sometimes"),
    ]
    for kwargs in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=TINY_MODEL, messages=ASK, **kwargs)
        assert e.value.body["code"] == "invalid_value", e.value.body
