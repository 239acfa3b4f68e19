"""multi: named sub-graders combined by a simpleeval formula."""

from __future__ import annotations

import pytest

from tests.graders.test_model_graders import LABEL, ScriptedSampler
from tunehouse.errors import InvalidRequest
from tunehouse.graders import Sample, parse_grader

EXACT = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.label}}",
    "operation": "eq",
}
FUZZY = {
    "type": "text_similarity",
    "name": "fuzzy",
    "input": "{{sample.output_text}}",
    "reference": "{{item.label}}",
    "evaluation_metric": "fuzzy_match",
}


def multi(formula: str, **graders):
    return parse_grader(
        {
            "type": "multi",
            "name": "combined",
            "graders": graders or {"exact": EXACT, "fuzzy": FUZZY},
            "calculate_output": formula,
        }
    )


def test_formula_combines_sub_rewards():
    grader = multi("0.5 * exact + 0.5 * fuzzy")
    result = grader.grade(Sample.from_text("hello"), {"label": "hellO"})
    assert not result.errored
    assert result.sub_rewards == {"exact": 0.0, "fuzzy": pytest.approx(0.8)}
    assert result.scores == result.sub_rewards
    assert result.reward == pytest.approx(0.4)
    assert grader.references() == {"sample.output_text", "item.label"}


@pytest.mark.parametrize(
    ("formula", "reward"),
    [
        ("max(exact, fuzzy)", 0.8),
        ("min(exact, fuzzy) + abs(-1)", 1.0),
        ("fuzzy ^ 2", 0.64),
        ("fuzzy ** 2", 0.64),
        ("sqrt(fuzzy * fuzzy)", 0.8),
        ("1 if fuzzy > 0.5 else 0", 1.0),
        ("(fuzzy > 0.9) * 1.0", 0.0),
        ("floor(fuzzy * 10) / 10 + ceil(exact)", 0.8),
    ],
)
def test_formula_features(formula, reward):
    result = multi(formula).grade(Sample.from_text("hello"), {"label": "hellO"})
    assert not result.errored, result.error_message
    assert result.reward == pytest.approx(reward)


def test_runtime_formula_failure_is_a_formula_error():
    result = multi("fuzzy / exact").grade(Sample.from_text("hello"), {"label": "hellO"})
    assert result.errors.formula_parse_error and result.reward == 0.0
    assert result.sub_rewards["fuzzy"] == pytest.approx(0.8)


def test_sub_grader_error_is_the_multi_graders_error():
    result = multi("exact + fuzzy").grade(Sample.from_text("hello"), {})
    assert result.errors.invalid_variable_error and result.reward == 0.0
    assert "item.label" in result.error_message


def test_label_model_inside_multi_with_usage():
    grader = multi("label * 2", label=LABEL)
    result = grader.grade(Sample.from_text("yay"), {}, sampler=ScriptedSampler('{"result": "positive"}'))
    assert result.reward == 2.0 and result.sub_rewards == {"label": 1.0}
    assert result.token_usage == 14 and result.sampled_model_name == "judge-model"
    assert result.model_usage["judge-model"]["total_tokens"] == 14
    assert grader.models() == {"judge-model": "grader.graders.label.model"}


@pytest.mark.parametrize(
    ("formula", "why"),
    [
        ("exact +", "does not parse"),
        ("exact + unknown", "'unknown' is not one of the graders"),
        ("exact.real", "may not"),
        ("__import__(exact)", "unknown function"),
        ("exact + 'a'", "may not"),
        ("exact | fuzzy", "may not"),
        ("[exact for exact in (1,)]", "may not"),
        ("exact; fuzzy", "does not parse"),
    ],
)
def test_bad_formulas_are_refused_at_validation(formula, why):
    with pytest.raises(InvalidRequest) as e:
        multi(formula)
    assert e.value.param == "grader.calculate_output"
    assert why in e.value.message
