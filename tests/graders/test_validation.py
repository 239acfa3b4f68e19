"""parse_grader: every problem at once, the first one's dotted param path, OpenAI's codes."""

from __future__ import annotations

import copy

import pytest

from tests.graders.test_model_graders import LABEL, SCORE
from tests.graders.test_multi import EXACT, FUZZY
from tunehouse.errors import InvalidRequest
from tunehouse.graders import parse_grader


def error(spec, **kwargs) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as e:
        parse_grader(spec, **kwargs)
    return e.value


def with_(base: dict, **changes) -> dict:
    spec = copy.deepcopy(base)
    for key, value in changes.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    return spec


def test_unknown_and_missing_type():
    e = error({"type": "regex", "name": "x"})
    assert e.param == "grader.type" and "'regex'" in e.message and "'string_check'" in e.message
    assert error({"name": "x"}).param == "grader.type"
    assert error({"type": "string_check"}, param="testing_criteria[2]").param == "testing_criteria[2].name"
    e = error(["not", "a", "grader"])
    assert e.param == "grader" and e.code == "invalid_type"


def test_every_problem_is_listed_and_the_first_named():
    spec = with_(EXACT, operation="equals", input=3, reference=None, extra=True)
    e = error(spec, param="testing_criteria[0]")
    assert e.param == "testing_criteria[0].reference"
    assert e.code == "missing_required_parameter"
    for text in (
        "testing_criteria[0].reference",
        "testing_criteria[0].extra",
        "testing_criteria[0].input",
        "'equals'",
    ):
        assert text in e.message
    assert e.message.startswith("The grader has 4 problems")


@pytest.mark.parametrize(
    ("spec", "param", "code"),
    [
        (with_(EXACT, operation="equals"), "grader.operation", "invalid_value"),
        (with_(EXACT, name=5), "grader.name", "invalid_type"),
        (with_(EXACT, input="{{sample.text}}"), "grader.input", "invalid_value"),
        (with_(EXACT, pass_threshold=0.5), "grader.pass_threshold", "unknown_parameter"),
        (with_(FUZZY, evaluation_metric="rouge_9"), "grader.evaluation_metric", "invalid_value"),
        (with_(FUZZY, pass_threshold="high"), "grader.pass_threshold", "invalid_type"),
        (with_(SCORE, range=[1, 0]), "grader.range", "invalid_value"),
        (with_(SCORE, model=None), "grader.model", "missing_required_parameter"),
        (
            with_(SCORE, sampling_params={"temperature": 3}),
            "grader.sampling_params.temperature",
            "invalid_value",
        ),
        (
            with_(SCORE, sampling_params={"logprobs": True}),
            "grader.sampling_params.logprobs",
            "unknown_parameter",
        ),
        (
            with_(SCORE, sampling_params={"reasoning_effort": "high"}),
            "grader.sampling_params.reasoning_effort",
            "unsupported_value",
        ),
        (with_(SCORE, input=[{"role": "robot", "content": "x"}]), "grader.input[0].role", "invalid_value"),
        (with_(SCORE, input=[{"role": "user"}]), "grader.input[0].content", "missing_required_parameter"),
        (
            with_(
                SCORE,
                input=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_text", "text": "x"},
                            {"type": "input_image", "image_url": "https://example.com/a.png"},
                        ],
                    }
                ],
            ),
            "grader.input[0].content[1].type",
            "invalid_value",
        ),
        (
            with_(SCORE, input=[{"role": "user", "content": {"type": "input_text", "text": "{{item.}}"}}]),
            "grader.input[0].content.text",
            "invalid_value",
        ),
        (with_(LABEL, passing_labels=["great"]), "grader.passing_labels", "invalid_value"),
        (with_(LABEL, labels=[]), "grader.labels", "invalid_value"),
        (with_(LABEL, sampling_params={}), "grader.sampling_params", "unknown_parameter"),
        ({"type": "python", "name": "p", "source": "def grade(:"}, "grader.source", "invalid_value"),
        ({"type": "python", "name": "p", "source": "x = 1"}, "grader.source", "invalid_value"),
    ],
)
def test_param_paths(spec, param, code):
    e = error(spec, allow_pass_threshold=param.endswith("pass_threshold") and code != "unknown_parameter")
    assert (e.param, e.code) == (param, code), e.message


def test_label_model_only_where_allowed():
    assert parse_grader(LABEL).type == "label_model"
    e = error(LABEL, allow_label_model=False)
    assert e.param == "grader.type" and "'label_model'" in e.message
    # inside a multi grader it is always allowed
    spec = {"type": "multi", "name": "m", "graders": {"label": LABEL}, "calculate_output": "label"}
    assert parse_grader(spec, allow_label_model=False).type == "multi"


def test_pass_threshold_only_on_eval_graders():
    assert parse_grader(with_(FUZZY, pass_threshold=0.5)).pass_threshold == 0.5
    e = error(with_(FUZZY, pass_threshold=0.5), allow_pass_threshold=False)
    assert e.param == "grader.pass_threshold" and e.code == "unknown_parameter"


def test_multi_paths():
    bad_sub = with_(FUZZY, reference=None)
    e = error(
        {"type": "multi", "name": "m", "graders": {"a": EXACT, "b": bad_sub}, "calculate_output": "a + b"}
    )
    assert e.param == "grader.graders.b.reference"
    e = error(
        {
            "type": "multi",
            "name": "m",
            "graders": {"a": with_(FUZZY, pass_threshold=1)},
            "calculate_output": "a",
        }
    )
    assert e.param == "grader.graders.a.pass_threshold"
    nested = {"type": "multi", "name": "n", "graders": {"x": EXACT}, "calculate_output": "x"}
    e = error({"type": "multi", "name": "m", "graders": {"a": nested}, "calculate_output": "a"})
    assert e.param == "grader.graders.a.type" and "inside a multi grader" in e.message
    e = error({"type": "multi", "name": "m", "graders": EXACT, "calculate_output": "x"})
    assert e.param == "grader.graders" and "named graders" in e.message
    e = error({"type": "multi", "name": "m", "graders": [EXACT], "calculate_output": "x"})
    assert e.param == "grader.graders" and e.code == "invalid_type"
    e = error({"type": "multi", "name": "m", "graders": {"not valid": EXACT}, "calculate_output": "x"})
    assert e.param == "grader.graders.not valid"
    e = error({"type": "multi", "name": "m", "graders": {"a": EXACT}, "calculate_output": "a + b"})
    assert e.param == "grader.calculate_output" and "'b' is not one of the graders" in e.message


def test_a_valid_grader_is_echoed_as_given():
    for spec in (EXACT, FUZZY, SCORE, LABEL, with_(SCORE, range=[0, 10], pass_threshold=5)):
        assert parse_grader(spec).spec == spec
