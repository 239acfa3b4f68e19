"""Structured output (response_format) by constrained decoding, on the tiny random model: its free
output is garbage, so anything that parses here was made to parse by the grammar."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from llguidance import LLMatcher

from tunehouse.inference.constrained import InvalidResponseFormat, build_tokenizer, validate_response_format
from tunehouse.inference.engine import Delta, ModelRef, SamplingParams, Usage
from tunehouse.inference.hf import HFEngine

MESSAGES = [{"role": "user", "content": "Answer in JSON."}]
SCHEMA = {
    "type": "object",
    "properties": {
        "category": {"type": "string", "enum": ["bug", "billing", "other"]},
        "count": {"type": "integer"},
    },
    "required": ["category", "count"],
    "additionalProperties": False,
}
JSON_OBJECT = {"type": "json_object"}


def validate(doc, schema: dict) -> None:
    """jsonschema.validate where it is installed, else a check of the subset these tests use."""
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    if jsonschema is not None:
        jsonschema.validate(doc, schema)
        return
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(doc, dict), doc
        props = schema.get("properties", {})
        assert all(k in doc for k in schema.get("required", [])), doc
        if schema.get("additionalProperties") is False:
            assert set(doc) <= set(props), doc
        for k, v in doc.items():
            if k in props:
                validate(v, props[k])
    elif kind == "string":
        assert isinstance(doc, str), doc
    elif kind == "integer":
        assert isinstance(doc, int) and not isinstance(doc, bool), doc
    if "enum" in schema:
        assert doc in schema["enum"], doc


def json_schema(schema: dict = SCHEMA, strict: bool | None = True, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": strict}}


@pytest.fixture(scope="module")
def matcher_for(tiny_model_dir: Path):
    """A fresh grammar matcher, to check that text is a (prefix of a) document the grammar allows."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_model_dir)
    llt = build_tokenizer(hf, {hf.eos_token_id})

    def accepts(response_format: dict, text: str, *, complete: bool = True) -> bool:
        m = LLMatcher(llt, validate_response_format(response_format))
        ids = hf(text, add_special_tokens=False)["input_ids"]
        ok = m.validate_tokens(ids) == len(ids) and m.consume_tokens(ids)
        return ok and (m.is_accepting() or not complete)

    return accepts


# ---- response_format validation and the grammar ------------------------------------------------


def test_validate_response_format():
    assert validate_response_format(None) is None
    assert validate_response_format({"type": "text"}) is None
    assert validate_response_format(JSON_OBJECT)
    assert validate_response_format(json_schema())
    assert validate_response_format(json_schema(strict=None))
    # Non-strict: keywords the compiler does not implement are ignored; strict: refused.
    odd = {"type": "object", "properties": {"a": {"type": "string", "format": "no-such-format"}}}
    assert validate_response_format(json_schema(odd, strict=False))
    bad = [
        {"type": "xml"},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"schema": SCHEMA}},
        json_schema(name="has space"),
        json_schema(name="x" * 65),
        json_schema(schema=[1, 2]),  # type: ignore[arg-type]
        json_schema(strict="yes"),  # type: ignore[arg-type]
        json_schema({"type": "strnig"}),
        json_schema(odd, strict=True),
    ]
    for rf in bad:
        with pytest.raises(InvalidResponseFormat):
            validate_response_format(rf)


def test_grammar_takes_compact_and_pretty_json_only(matcher_for):
    doc = {"a": [1, 2.5e-3, {"b": 'x\u00e9 "q"\n\t\\ 日本'}], "c": {"d": None, "e": True}}
    for text in (
        json.dumps(doc),
        json.dumps(doc, ensure_ascii=False),
        json.dumps(doc, indent=2),
        json.dumps(doc, indent="\t"),
        json.dumps(doc, separators=(",", ":")),
    ):
        assert matcher_for(JSON_OBJECT, text), text
    assert not matcher_for(JSON_OBJECT, "[1]")
    assert not matcher_for(JSON_OBJECT, '{"a": 1')  # incomplete
    assert matcher_for(JSON_OBJECT, '{"a": 1', complete=False)
    assert not matcher_for(JSON_OBJECT, '{"a":' + " " * 40 + "1}")  # whitespace is bounded
    assert matcher_for(json_schema(), '{"category": "bug", "count": -3}')
    assert not matcher_for(json_schema(), '{"category": "feature", "count": 1}')
    assert not matcher_for(json_schema(), '{"category": "bug"}')


# ---- generation --------------------------------------------------------------------------------


def test_json_schema_always_validates(engine, tiny):
    for seed in range(3):
        params = SamplingParams(
            max_tokens=256, temperature=1.0, n=2, seed=seed, response_format=json_schema()
        )
        result = engine.chat(tiny, MESSAGES, params)
        for c in result.choices:
            assert c.finish_reason == "stop", c.text
            validate(json.loads(c.text), SCHEMA)
    # strict=false still constrains
    result = engine.chat(
        tiny, MESSAGES, SamplingParams(max_tokens=256, seed=9, response_format=json_schema(strict=False))
    )
    validate(json.loads(result.choices[0].text), SCHEMA)


def test_json_object_parses_or_is_a_valid_prefix(engine, tiny, matcher_for):
    """The random model writes endless strings, so some answers run out of tokens: those are still
    valid JSON prefixes; every answer that ends on its own is a JSON object."""
    finished = 0
    for seed in range(4):
        params = SamplingParams(max_tokens=48, temperature=1.0, n=4, seed=seed, response_format=JSON_OBJECT)
        for c in engine.chat(tiny, MESSAGES, params).choices:
            if c.finish_reason == "stop":
                finished += 1
                assert isinstance(json.loads(c.text), dict), c.text
            else:
                assert c.finish_reason == "length"
                assert matcher_for(JSON_OBJECT, c.text, complete=False), c.text
    assert finished >= 1
    # Greedy too.
    greedy = engine.chat(
        tiny, MESSAGES, SamplingParams(max_tokens=48, temperature=0, response_format=JSON_OBJECT)
    )
    assert matcher_for(JSON_OBJECT, greedy.choices[0].text, complete=False)


def test_seed_reproduces_and_streaming_matches(engine, tiny):
    params = SamplingParams(max_tokens=256, temperature=1.0, n=2, seed=5, response_format=json_schema())
    first = [c.text for c in engine.chat(tiny, MESSAGES, params).choices]
    assert first == [c.text for c in engine.chat(tiny, MESSAGES, params).choices]
    pieces: dict[int, str] = {0: "", 1: ""}
    finish: dict[int, str] = {}
    usage = None
    for item in engine.chat_stream(tiny, MESSAGES, params):
        if isinstance(item, Delta):
            pieces[item.index] += item.text
            if item.finish_reason:
                finish[item.index] = item.finish_reason
        else:
            assert isinstance(item, Usage)
            usage = item
    assert usage is not None and finish == {0: "stop", 1: "stop"}
    assert [pieces[0], pieces[1]] == first
    for text in first:
        validate(json.loads(text), SCHEMA)


def test_length_stop_strings_and_text_unchanged(engine, tiny):
    cut = engine.chat(
        tiny, MESSAGES, SamplingParams(max_tokens=3, temperature=0, response_format=json_schema())
    )
    assert cut.choices[0].finish_reason == "length"
    assert cut.choices[0].text.startswith("{") and cut.completion_tokens == 3
    # A stop string still ends the answer (and may cut the document, as OpenAI's).
    stopped = engine.chat(
        tiny,
        MESSAGES,
        SamplingParams(max_tokens=64, temperature=0, stop=['"count"'], response_format=json_schema()),
    )
    assert stopped.choices[0].finish_reason == "stop" and '"count"' not in stopped.choices[0].text
    # {"type": "text"} is the unconstrained engine, token for token.
    plain = SamplingParams(max_tokens=12, temperature=1.0, seed=3)
    text = SamplingParams(max_tokens=12, temperature=1.0, seed=3, response_format={"type": "text"})
    assert (
        engine.chat(tiny, MESSAGES, plain).choices[0].text
        == engine.chat(tiny, MESSAGES, text).choices[0].text
    )


def test_invalid_response_format_raises_before_generating(engine, tiny):
    with pytest.raises(InvalidResponseFormat):
        engine.chat(tiny, MESSAGES, SamplingParams(max_tokens=4, response_format={"type": "yaml"}))
    with pytest.raises(InvalidResponseFormat):
        engine.chat_stream(
            tiny, MESSAGES, SamplingParams(max_tokens=4, response_format=json_schema({"type": 1}))
        )


def test_real_default_model_classifies_a_ticket(default_model_dir: Path):
    schema = {
        "type": "object",
        "properties": {
            "category": {"type": "string", "enum": ["bug", "billing", "account", "feature_request"]},
            "priority": {"type": "string", "enum": ["low", "medium", "high", "urgent"]},
        },
        "required": ["category", "priority"],
        "additionalProperties": False,
    }
    messages = [
        {"role": "system", "content": "Classify the support ticket. Reply with JSON only."},
        {"role": "user", "content": "I was charged twice for my subscription this month, please refund!"},
    ]
    eng = HFEngine()
    try:
        ref = ModelRef("smollm2-135m-instruct", default_model_dir)
        rf = json_schema(schema, name="ticket")
        result = eng.chat(ref, messages, SamplingParams(max_tokens=64, temperature=0, response_format=rf))
        assert result.choices[0].finish_reason == "stop"
        validate(json.loads(result.choices[0].text), schema)
    finally:
        eng.close()
