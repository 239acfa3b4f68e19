"""POST /v1/fine_tuning/alpha/graders/run and /validate through the official SDK over real HTTP:
every grader type, model graders on the tiny model (their answers constrained by a json_schema, so
even a random model's answer parses), OpenAI's RunGraderResponse shape, and 400s naming the field."""

from __future__ import annotations

import time

import jsonschema
import openai
import pytest

from tests.api.conftest import create_org_key
from tests.conftest import TINY_MODEL

# Grading reads no row but the caller's key and model names: the database makes no difference.
pytestmark = pytest.mark.one_database

# OpenAI's RunGraderResponse (fragments/fine_tuning.yaml), with additionalProperties false added on
# the objects whose fields the spec lists: we send exactly those fields, no more.
_NULLABLE_STRING = {"anyOf": [{"type": "string"}, {"type": "null"}]}
_FLAGS = [
    "formula_parse_error",
    "sample_parse_error",
    "truncated_observation_error",
    "unresponsive_reward_error",
    "invalid_variable_error",
    "other_error",
    "python_grader_server_error",
    "python_grader_runtime_error",
    "model_grader_server_error",
    "model_grader_refusal_error",
    "model_grader_parse_error",
]
_DETAILS = [
    "python_grader_server_error_type",
    "python_grader_runtime_error_details",
    "model_grader_server_error_details",
]
RUN_GRADER_RESPONSE = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "reward": {"type": "number"},
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string"},
                "type": {"type": "string"},
                "errors": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {f: {"type": "boolean"} for f in _FLAGS}
                    | {d: _NULLABLE_STRING for d in _DETAILS},
                    "required": _FLAGS + _DETAILS,
                },
                "execution_time": {"type": "number"},
                "scores": {"type": "object", "additionalProperties": {}},
                "token_usage": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                "sampled_model_name": _NULLABLE_STRING,
            },
            "required": [
                "name",
                "type",
                "errors",
                "execution_time",
                "scores",
                "token_usage",
                "sampled_model_name",
            ],
        },
        "sub_rewards": {"type": "object", "additionalProperties": {}},
        "model_grader_token_usage_per_model": {"type": "object", "additionalProperties": {}},
    },
    "required": ["reward", "metadata", "sub_rewards", "model_grader_token_usage_per_model"],
}

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
    "input": "{{ sample.output_text }}",
    "reference": "{{item.label}}",
    "evaluation_metric": "fuzzy_match",
}
PYTHON = {
    "type": "python",
    "name": "py",
    "image_tag": "2025-05-08",
    "source": "def grade(sample, item):\n    return 1.0 if sample['output_text'] == item['label'] else 0.25\n",
}
SCORE = {
    "type": "score_model",
    "name": "judge",
    "model": TINY_MODEL,
    "input": [
        {
            "role": "user",
            "content": [
                {
                    "type": "input_text",
                    "text": "Score from 0 to 1.\nReference: {{item.label}}\nAnswer: {{sample.output_text}}",
                }
            ],
        }
    ],
    "sampling_params": {"temperature": 1, "top_p": 1, "seed": 42},
}
LABEL = {
    "type": "label_model",
    "name": "sentiment",
    "model": TINY_MODEL,
    "input": [
        {"role": "system", "content": "Classify the statement as positive, neutral or negative."},
        {"role": "user", "content": {"type": "input_text", "text": "Statement: {{sample.output_text}}"}},
    ],
    "labels": ["positive", "neutral", "negative"],
    "passing_labels": ["positive"],
}


@pytest.fixture(scope="module")
def sdk(shared_server) -> openai.OpenAI:
    return shared_server.client()


def run(sdk: openai.OpenAI, grader: dict, sample: str, item: dict | None = None) -> dict:
    """The raw JSON answer (checked against OpenAI's schema), after the SDK parsed it."""
    kwargs = {"item": item} if item is not None else {}
    raw = sdk.fine_tuning.alpha.graders.with_raw_response.run(grader=grader, model_sample=sample, **kwargs)
    body = raw.http_response.json()
    jsonschema.validate(body, RUN_GRADER_RESPONSE)
    parsed = raw.parse()
    assert parsed.reward == body["reward"] and parsed.metadata.name == grader["name"]
    return body


def no_errors(body: dict) -> bool:
    errors = body["metadata"]["errors"]
    return not any(errors[f] for f in _FLAGS) and all(errors[d] is None for d in _DETAILS)


def test_string_check_and_similarity(sdk):
    body = run(sdk, EXACT, "Paris", {"label": "Paris"})
    assert body["reward"] == 1.0 and no_errors(body)
    assert body["metadata"]["type"] == "string_check"
    assert body["metadata"]["token_usage"] is None and body["metadata"]["sampled_model_name"] is None
    assert body["sub_rewards"] == {} and body["model_grader_token_usage_per_model"] == {}
    assert run(sdk, EXACT, "Lyon", {"label": "Paris"})["reward"] == 0.0
    # the SDK's typed answer
    result = sdk.fine_tuning.alpha.graders.run(grader=FUZZY, model_sample="hello", item={"label": "hellO"})
    assert result.reward == pytest.approx(0.8)
    assert result.metadata.errors.invalid_variable_error is False


def test_missing_item_field_is_reported_in_the_result(sdk):
    body = run(sdk, EXACT, "Paris")  # no item at all
    errors = body["metadata"]["errors"]
    assert body["reward"] == 0.0 and errors["invalid_variable_error"] is True
    body = run(sdk, {**EXACT, "input": "{{sample.output_json.city}}"}, "not json", {"label": "x"})
    assert body["metadata"]["errors"]["sample_parse_error"] is True
    body = run(
        sdk, {**EXACT, "input": "{{sample.output_json.city}}"}, '{"city": "Paris"}', {"label": "Paris"}
    )
    assert body["reward"] == 1.0


def test_python_grader(sdk):
    assert run(sdk, PYTHON, "a", {"label": "a"})["reward"] == 1.0
    body = run(sdk, PYTHON, "b", {"label": "a"})
    assert body["reward"] == 0.25 and no_errors(body) and body["metadata"]["type"] == "python"
    failing = {**PYTHON, "source": "def grade(sample, item):\n    return item['missing']\n"}
    body = run(sdk, failing, "b", {"label": "a"})
    assert body["metadata"]["errors"]["python_grader_runtime_error"] is True
    assert "missing" in body["metadata"]["errors"]["python_grader_runtime_error_details"]


def test_score_model_on_the_tiny_model(sdk):
    body = run(sdk, SCORE, "fuzzy wuzzy was a bear", {"label": "fuzzy wuzzy was a bear"})
    meta = body["metadata"]
    assert no_errors(body), meta["errors"]
    assert 0.0 <= body["reward"] <= 1.0
    assert meta["type"] == "score_model" and meta["sampled_model_name"] == TINY_MODEL
    usage = body["model_grader_token_usage_per_model"][TINY_MODEL]
    assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens"}
    assert usage["prompt_tokens"] > 10 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] == meta["token_usage"]
    # a wider range is honoured by the constraint
    body = run(sdk, {**SCORE, "range": [0, 10]}, "x", {"label": "y"})
    assert no_errors(body) and 0.0 <= body["reward"] <= 10.0


def test_several_seeds_all_parse(sdk):
    for seed in range(4):
        grader = {**SCORE, "sampling_params": {"temperature": 1, "seed": seed}}
        body = run(sdk, grader, "x", {"label": "y"})
        assert no_errors(body), body["metadata"]["errors"]


def test_multi_with_label_model_on_the_tiny_model(sdk):
    grader = {
        "type": "multi",
        "name": "combined",
        "graders": {"exact": EXACT, "fuzzy": FUZZY, "sentiment": LABEL},
        "calculate_output": "0.5 * exact + 0.25 * fuzzy + 0.25 * sentiment",
    }
    body = run(sdk, grader, "hello", {"label": "hellO"})
    assert no_errors(body), body["metadata"]["errors"]
    subs = body["sub_rewards"]
    assert set(subs) == {"exact", "fuzzy", "sentiment"}
    assert subs["exact"] == 0.0 and subs["fuzzy"] == pytest.approx(0.8) and subs["sentiment"] in (0.0, 1.0)
    assert body["reward"] == pytest.approx(0.25 * 0.8 + 0.25 * subs["sentiment"])
    assert body["metadata"]["scores"] == subs
    assert body["metadata"]["sampled_model_name"] == TINY_MODEL
    assert TINY_MODEL in body["model_grader_token_usage_per_model"]
    # a formula that fails on these values is the result's formula error, not a 500
    body = run(sdk, {**grader, "calculate_output": "fuzzy / exact"}, "hello", {"label": "hellO"})
    assert body["metadata"]["errors"]["formula_parse_error"] is True and body["reward"] == 0.0


def test_validate_echoes_each_grader(sdk):
    multi = {"type": "multi", "name": "m", "graders": {"a": EXACT, "b": LABEL}, "calculate_output": "a * b"}
    for grader in (EXACT, FUZZY, PYTHON, SCORE, multi):
        raw = sdk.fine_tuning.alpha.graders.with_raw_response.validate(grader=grader)
        assert raw.http_response.json() == {"grader": grader}
        assert raw.parse().grader is not None


@pytest.mark.parametrize(
    ("grader", "param"),
    [
        ({"type": "regex", "name": "x"}, "grader.type"),
        (LABEL, "grader.type"),  # label_model only inside a multi grader, as OpenAI's
        ({**EXACT, "operation": "equals"}, "grader.operation"),
        ({**FUZZY, "pass_threshold": 0.5}, "grader.pass_threshold"),
        (
            {**SCORE, "sampling_params": {"reasoning_effort": "high"}},
            "grader.sampling_params.reasoning_effort",
        ),
        ({**PYTHON, "source": "def grade(:"}, "grader.source"),
        (
            {
                "type": "multi",
                "name": "m",
                "graders": {"a": {**FUZZY, "reference": 3}},
                "calculate_output": "a",
            },
            "grader.graders.a.reference",
        ),
        (
            {"type": "multi", "name": "m", "graders": {"a": EXACT}, "calculate_output": "a +"},
            "grader.calculate_output",
        ),
    ],
)
def test_bad_graders_are_400s_naming_the_field(sdk, grader, param):
    for call in (
        lambda: sdk.fine_tuning.alpha.graders.run(grader=grader, model_sample="x", item={}),
        lambda: sdk.fine_tuning.alpha.graders.validate(grader=grader),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert e.value.status_code == 400
        assert e.value.body["param"] == param, e.value.body
        assert e.value.body["type"] == "invalid_request_error"


def test_unknown_model_is_a_404_naming_the_field(sdk):
    with pytest.raises(openai.NotFoundError) as e:
        sdk.fine_tuning.alpha.graders.run(grader={**SCORE, "model": "no-such-model"}, model_sample="x")
    assert e.value.body["param"] == "grader.model" and e.value.body["code"] == "model_not_found"
    multi = {
        "type": "multi",
        "name": "m",
        "graders": {"s": {**LABEL, "model": "nope"}},
        "calculate_output": "s",
    }
    with pytest.raises(openai.NotFoundError) as e:
        sdk.fine_tuning.alpha.graders.validate(grader=multi)
    assert e.value.body["param"] == "grader.graders.s.model"


def test_request_fields(sdk):
    http = sdk._client  # the SDK's own HTTP client, for bodies the SDK would not send
    base = str(sdk.base_url).rstrip("/")
    headers = {"Authorization": f"Bearer {sdk.api_key}"}
    r = http.post(f"{base}/fine_tuning/alpha/graders/run", json={"grader": EXACT}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model_sample"
    r = http.post(
        f"{base}/fine_tuning/alpha/graders/run",
        json={"grader": EXACT, "model_sample": "x", "reference_answer": "y"},
        headers=headers,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "reference_answer"


def test_model_grader_tokens_are_metered(shared_server):
    """Each grader model call is recorded as a chat request is, for the caller's organization."""
    key = create_org_key(shared_server.settings, "graders-meter")
    client = shared_server.client(key)
    body = client.fine_tuning.alpha.graders.with_raw_response.run(
        grader=SCORE, model_sample="x", item={"label": "y"}
    ).http_response.json()
    usage = body["model_grader_token_usage_per_model"][TINY_MODEL]
    start = int(time.time()) // 86400 * 86400
    # Recorded before the answer was sent (the grader's thread meters each call as it returns).
    data = (
        shared_server.http(key).get("/v1/organization/usage/completions", params={"start_time": start}).json()
    )
    results = [r for bucket in data["data"] for r in bucket["results"]]
    (r,) = results
    assert (r["input_tokens"], r["output_tokens"], r["num_model_requests"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
        1,
    )
