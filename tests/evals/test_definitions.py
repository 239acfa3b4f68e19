"""The checks an eval and a run's data source go through before anything runs (no server)."""

from __future__ import annotations

import pytest

from tunehouse.errors import InvalidRequest
from tunehouse.evals.definitions import (
    DataSourceConfig,
    parse_data_source_config,
    parse_testing_criteria,
    reference_problem,
    schema_problem,
)
from tunehouse.evals.sources import (
    check_lines,
    lines_from_content,
    lines_from_jsonl,
    parse_run_data_source,
    prompt_messages,
    sampling_params,
)
from tunehouse.graders import parse_grader

SCHEMA = {
    "type": "object",
    "properties": {
        "q": {"type": "string"},
        "meta": {"type": "object"},  # open: anything below it
        "tags": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
        "either": {"anyOf": [{"type": "object", "properties": {"a": {}}}, {"type": "string"}]},
        "closed": {"type": "object", "properties": {"x": {}}, "additionalProperties": False},
    },
    "required": ["q"],
}


@pytest.mark.parametrize(
    "path",
    ["item.q", "item.meta.anything.deeper", "item.tags.0.name", "item.either.a", "item.closed.x"],
)
def test_references_the_schema_allows(path):
    assert schema_problem(SCHEMA, path) is None


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("item.question", "'item' has the properties"),
        ("item.q.length", "makes 'item.q' string"),
        ("item.tags.0.label", "'item.tags.0' has the properties name"),
        ("item.closed.y", "'item.closed' has the properties x"),
        ("item.either.b", "has the properties a"),
    ],
)
def test_references_the_schema_does_not_allow(path, says):
    problem = schema_problem(SCHEMA, path)
    assert problem is not None and says in problem, problem


def test_sample_references_need_the_sample_schema_or_a_generating_run():
    closed = DataSourceConfig(SCHEMA, include_sample_schema=False)
    assert "include_sample_schema is false" in reference_problem(closed, "sample.output_text")
    assert reference_problem(closed, "sample.output_text", generates=True) is None
    opened = DataSourceConfig(SCHEMA, include_sample_schema=True)
    assert reference_problem(opened, "sample.output_json.answer") is None
    assert reference_problem(opened, "sample.choices.0.message.content") is None


def test_data_source_config_echo_and_errors():
    config = parse_data_source_config(
        {"type": "custom", "item_schema": SCHEMA, "include_sample_schema": True}
    )
    wire = config.wire()
    assert wire["type"] == "custom" and wire["schema"]["properties"]["item"] == SCHEMA
    assert wire["schema"]["required"] == ["item", "sample"]
    assert DataSourceConfig.from_stored(config.stored()) == config
    with pytest.raises(InvalidRequest) as e:
        parse_data_source_config({"type": "custom", "item_schema": {"properties": {"q": {"type": 3}}}})
    assert e.value.param == "data_source_config.item_schema" and "properties.q.type" in e.value.message
    with pytest.raises(InvalidRequest) as e:
        parse_data_source_config({"type": "custom", "item_schema": SCHEMA, "include_sample_schema": "yes"})
    assert e.value.param == "data_source_config.include_sample_schema"


def test_every_reference_problem_of_every_criterion_at_once():
    config = DataSourceConfig(SCHEMA, include_sample_schema=False)
    criteria = [
        {
            "type": "string_check",
            "name": "a",
            "input": "{{item.q}}",
            "reference": "{{item.nope}}",
            "operation": "eq",
        },
        {
            "type": "string_check",
            "name": "b",
            "input": "{{sample.output_text}}",
            "reference": "x",
            "operation": "eq",
        },
    ]
    with pytest.raises(InvalidRequest) as e:
        parse_testing_criteria(criteria, config)
    assert e.value.param == "testing_criteria[0].reference"
    assert "testing_criteria[1].input" in e.value.message and "item.nope" in e.value.message
    ok = parse_testing_criteria([{**criteria[0], "reference": "{{item.meta.k}}"}], config)
    assert ok[0]["id"].startswith("a-") and ok[0]["reference"] == "{{item.meta.k}}"


def test_jsonl_lines_are_checked_with_their_line_numbers():
    text = '{"item": {"q": "a"}}\n\nnot json\n{"item": 3}\n{"item": {"q": "b"}, "extra": 1}\n{"item": {"q": "c"}}\n'
    lines, problems = lines_from_jsonl(text)
    assert [line.item["q"] for line in lines] == ["a", "c"]
    assert [line.index for line in lines] == [0, 1] and lines[1].where == "line 6"
    assert [p.split(":")[0] for p in problems] == ["line 3", "line 4", "line 5"]
    assert lines_from_jsonl("\n\n") == ([], ["the file has no items"])


def test_completions_source_is_normalized_and_rendered():
    source = parse_run_data_source(
        {
            "type": "completions",
            "model": "m",
            "input_messages": {
                "type": "template",
                "template": [
                    {"role": "developer", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "input_text", "text": "Q: "}, "{{item.q}}"]},
                    {
                        "type": "message",
                        "role": "assistant",
                        "content": {"type": "output_text", "text": "ok"},
                    },
                ],
            },
            "sampling_params": {"temperature": 0, "max_completions_tokens": 5},
            "source": {"type": "file_content", "content": [{"item": {"q": "2+2?"}}]},
        }
    )
    assert source.wire()["input_messages"]["template"] == [
        {"type": "message", "role": "developer", "content": {"type": "input_text", "text": "Be brief."}},
        {"type": "message", "role": "user", "content": {"type": "input_text", "text": "Q: {{item.q}}"}},
        {"type": "message", "role": "assistant", "content": {"type": "output_text", "text": "ok"}},
    ]
    (line,) = lines_from_content(source.source)
    assert prompt_messages(source, line) == [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Q: 2+2?"},
        {"role": "assistant", "content": "ok"},
    ]
    params = sampling_params(source)
    assert (params.temperature, params.max_tokens, params.seed, params.top_p) == (0.0, 5, 42, 1.0)
    # The stored (normalized) form parses to the same run.
    again = parse_run_data_source(source.wire())
    assert prompt_messages(again, line) == prompt_messages(source, line)


def test_item_problems_are_all_found():
    config = DataSourceConfig(SCHEMA, include_sample_schema=True)
    grader = parse_grader(
        {
            "type": "string_check",
            "name": "a",
            "input": "{{sample.output_json.n}}",
            "reference": "{{item.q}}",
            "operation": "eq",
        }
    )
    source = parse_run_data_source(
        {
            "type": "jsonl",
            "source": {
                "type": "file_content",
                "content": [
                    {"item": {"q": "a"}, "sample": {"output_text": '{"n": 1}'}},
                    {"item": {"q": 1}, "sample": {"output_text": "not json"}},
                    {"item": {"q": "c"}},
                ],
            },
        }
    )
    problems = check_lines(lines_from_content(source.source), source, config, [grader])
    where = [(line.where, text) for line, text in problems]
    assert [w for w, _ in where] == ["content[1]", "content[1]", "content[2]"]
    assert "item.q does not match" in where[0][1]
    assert "not valid JSON" in where[1][1]
    assert "no 'sample'" in where[2][1]
