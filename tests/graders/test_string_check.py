"""string_check: eq, ne, like (contains), ilike (contains, any case); pass = reward 1."""

from __future__ import annotations

import pytest

from tunehouse.graders import Sample, parse_grader


def check(operation: str, reference: str = "{{item.label}}"):
    return parse_grader(
        {
            "type": "string_check",
            "name": "check",
            "input": "{{sample.output_text}}",
            "reference": reference,
            "operation": operation,
        }
    )


@pytest.mark.parametrize(
    ("operation", "output", "label", "reward"),
    [
        ("eq", "Paris", "Paris", 1.0),
        ("eq", "paris", "Paris", 0.0),
        ("ne", "Lyon", "Paris", 1.0),
        ("ne", "Paris", "Paris", 0.0),
        ("like", "The capital is Paris.", "Paris", 1.0),
        ("like", "The capital is paris.", "Paris", 0.0),
        ("ilike", "THE CAPITAL IS PARIS.", "Paris", 1.0),
        ("ilike", "Lyon", "Paris", 0.0),
    ],
)
def test_operations(operation, output, label, reward):
    grader = check(operation)
    result = grader.grade(Sample.from_text(output), {"label": label})
    assert result.reward == reward
    assert not result.errored
    assert grader.passed(result) is (reward == 1.0)


def test_missing_item_field_is_an_item_error_not_an_exception():
    grader = check("eq", reference="{{item.answer.text}}")
    result = grader.grade(Sample.from_text("x"), {"answer": {}})
    assert result.errored and result.errors.invalid_variable_error
    assert result.reward == 0.0
    assert "item.answer.text" in result.error_message
    assert not grader.passed(result)
    meta = result.metadata(grader)
    assert meta["errors"]["invalid_variable_error"] is True
    assert meta["name"] == "check" and meta["type"] == "string_check"


def test_references_and_spec_echo():
    spec = {
        "type": "string_check",
        "name": "c",
        "input": "{{ sample.output_json.a }}",
        "reference": "{{item.b.c}}",
        "operation": "eq",
    }
    grader = parse_grader(spec)
    assert grader.references() == {"sample.output_json.a", "item.b.c"}
    assert grader.spec == spec and grader.name == "c" and grader.type == "string_check"
    assert grader.models() == {}
