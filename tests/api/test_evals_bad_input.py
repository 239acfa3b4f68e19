"""Malformed bodies on every new endpoint (evals, runs, output items, graders run/validate): each is
answered with OpenAI's error shape and a 4xx, never a 500, and leaves nothing half-written."""

from __future__ import annotations

import itertools

import pytest

from tests.conftest import TINY_MODEL

STRING_CHECK = {
    "type": "string_check",
    "name": "s",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "eq",
}
# Values of every JSON type, and a few of the right type but wrong content.
ODD = [None, True, 0, -1, 1.5, "", "x", [], [1], {}, {"type": None}, {"type": 7}, "a" * 5000, [{}], [None]]

GRADERS = [
    *ODD,
    {**STRING_CHECK, "operation": None},
    {**STRING_CHECK, "input": 3},
    {**STRING_CHECK, "reference": {"x": 1}},
    {"type": "text_similarity", "name": "t", "input": "a", "reference": "b", "evaluation_metric": []},
    {"type": "python", "name": "p", "source": None},
    {"type": "python", "name": "p", "source": "def grade(:"},
    {"type": "score_model", "name": "m", "model": TINY_MODEL, "input": "not a list"},
    {"type": "score_model", "name": "m", "model": TINY_MODEL, "input": [{"role": 1}], "range": [1, 0]},
    {
        "type": "label_model",
        "name": "l",
        "model": TINY_MODEL,
        "input": [],
        "labels": "a",
        "passing_labels": [],
    },
    {"type": "multi", "name": "m", "graders": [], "calculate_output": 5},
    {"type": "multi", "name": "m", "graders": {"a": STRING_CHECK}, "calculate_output": "a +"},
    {"type": "multi", "name": "m", "graders": {"a": STRING_CHECK}, "calculate_output": "__import__('os')"},
    {"type": "multi", "name": "m", "graders": {"a": {"type": "multi"}}, "calculate_output": "a"},
]


def _assert_4xx(r, what) -> None:
    assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:300])
    err = r.json()["error"]
    assert {"message", "type", "param", "code"} <= set(err), err


@pytest.mark.one_database
def test_graders_endpoints_never_500(shared_server):
    http = shared_server.http()
    for grader in GRADERS:
        _assert_4xx(http.post("/v1/fine_tuning/alpha/graders/validate", json={"grader": grader}), grader)
        for sample, item in itertools.product([None, 3, "ok"], [None, [], {"answer": "ok"}, "x"]):
            r = http.post(
                "/v1/fine_tuning/alpha/graders/run",
                json={"grader": grader, "model_sample": sample, "item": item},
            )
            _assert_4xx(r, (grader, sample, item))
    for body in ODD:
        _assert_4xx(http.post("/v1/fine_tuning/alpha/graders/run", json=body), body)


@pytest.mark.one_database
def test_evals_endpoints_never_500(shared_server):
    http = shared_server.http()
    before = http.get("/v1/evals", params={"limit": 100}).json()["data"]
    config = {"type": "custom", "item_schema": {"type": "object"}, "include_sample_schema": True}
    bodies = [
        *ODD,
        {"data_source_config": None, "testing_criteria": [STRING_CHECK]},
        {"data_source_config": config, "testing_criteria": None},
        {"data_source_config": config, "testing_criteria": GRADERS[:3]},
        {"data_source_config": {**config, "item_schema": {"type": 12}}, "testing_criteria": [STRING_CHECK]},
        {"data_source_config": {"type": "custom", "item_schema": "x"}, "testing_criteria": [STRING_CHECK]},
        {"data_source_config": config, "testing_criteria": [STRING_CHECK], "metadata": {"k": ["list"]}},
        {"data_source_config": config, "testing_criteria": [STRING_CHECK], "name": 5},
        *({"data_source_config": config, "testing_criteria": [g]} for g in GRADERS),
    ]
    for body in bodies:
        _assert_4xx(http.post("/v1/evals", json=body), body)
    assert http.get("/v1/evals", params={"limit": 100}).json()["data"] == before  # nothing written

    ev = http.post(
        "/v1/evals", json={"name": "ok", "data_source_config": config, "testing_criteria": [STRING_CHECK]}
    )
    assert ev.status_code in (200, 201), ev.text
    eval_id = ev.json()["id"]
    updates = [
        [],
        "x",
        3,
        {"name": 5},
        {"name": []},
        {"metadata": "x"},
        {"metadata": {"k": 1}},
        {"surprise": 1},
    ]
    for body in updates:
        _assert_4xx(http.post(f"/v1/evals/{eval_id}", json=body), body)
    assert http.get(f"/v1/evals/{eval_id}").json()["name"] == "ok"
    content = {"type": "file_content", "content": [{"item": {"answer": "a"}, "sample": {"output_text": "a"}}]}
    runs = [
        *ODD,
        {"data_source": None},
        {"data_source": {"type": "jsonl", "source": None}},
        {"data_source": {"type": "jsonl", "source": {"type": "file_content", "content": "x"}}},
        {"data_source": {"type": "jsonl", "source": {"type": "file_content", "content": [{"item": 3}]}}},
        {"data_source": {"type": "jsonl", "source": {"type": "file_id", "id": None}}},
        {"data_source": {"type": "jsonl", "source": {"type": "file_id", "id": "file-nope"}}},
        {"data_source": {"type": "completions", "model": None, "source": content}},
        {
            "data_source": {
                "type": "completions",
                "model": "no-such-model",
                "source": content,
                "input_messages": {"type": "template", "template": [{"role": "user", "content": "x"}]},
            }
        },
        {
            "data_source": {
                "type": "completions",
                "model": TINY_MODEL,
                "source": content,
                "input_messages": {"type": "template", "template": "x"},
            }
        },
        {
            "data_source": {
                "type": "completions",
                "model": TINY_MODEL,
                "source": content,
                "input_messages": {"type": "template", "template": [{"role": "user", "content": "x"}]},
                "sampling_params": {"temperature": "hot"},
            }
        },
        {"data_source": {"type": "responses", "source": content}},
        {"data_source": {"type": "jsonl", "source": content}, "metadata": "x"},
    ]
    for body in runs:
        _assert_4xx(http.post(f"/v1/evals/{eval_id}/runs", json=body), body)
    assert http.get(f"/v1/evals/{eval_id}/runs").json()["data"] == []
    for path in (
        f"/v1/evals/{eval_id}/runs/evalrun_nope",
        f"/v1/evals/{eval_id}/runs/evalrun_nope/output_items",
        f"/v1/evals/{eval_id}/runs/evalrun_nope/output_items/outputitem_nope",
        "/v1/evals/eval_nope",
    ):
        _assert_4xx(http.get(path), path)
    for params in (
        {"limit": 0},
        {"limit": "x"},
        {"order": "sideways"},
        {"limit": 10**9},
        {"after": "x" * 3000},
    ):
        _assert_4xx(http.get("/v1/evals", params=params), params)
