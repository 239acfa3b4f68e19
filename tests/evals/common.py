"""What the evals tests share: an eval of arithmetic questions, its items and given answers, and
waiting for a run to end."""

from __future__ import annotations

import time

import openai

SYSTEM = "You grade arithmetic for the evals test."  # unique: no other test's prompt shares its start
ITEM_SCHEMA = {
    "type": "object",
    "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
    "required": ["question", "answer"],
}
EXACT = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "eq",
}
FUZZY = {
    "type": "text_similarity",
    "name": "close",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "evaluation_metric": "fuzzy_match",
    "pass_threshold": 0.8,
}
# Item i's answer is "<2i>0000"; its given sample is right for i % 3 == 0, nearly right (one extra
# character: the fuzzy criterion passes, the exact one fails) for i % 3 == 1, wrong for i % 3 == 2.
N_ROWS = 9


def answer(i: int) -> str:
    return [f"{2 * i}0000", f"{2 * i}0000.", "nope"][i % 3]


def rows(n: int = N_ROWS) -> list[dict]:
    return [
        {
            "item": {"question": f"What is {i} + {i}?", "answer": f"{2 * i}0000"},
            "sample": {"output_text": answer(i)},
        }
        for i in range(n)
    ]


def wait_run(
    client: openai.OpenAI,
    eval_id: str,
    run_id: str,
    *,
    until=("completed", "failed", "canceled"),
    timeout=240,
):
    deadline = time.time() + timeout
    while True:
        run = client.evals.runs.retrieve(run_id, eval_id=eval_id)
        if run.status in until:
            return run
        assert time.time() < deadline, f"run {run_id} still {run.status} after {timeout}s"
        time.sleep(0.2)


def make_eval(client: openai.OpenAI, criteria=(EXACT, FUZZY), **kw):
    return client.evals.create(
        name=kw.pop("name", "arithmetic"),
        data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA, "include_sample_schema": True},
        testing_criteria=list(criteria),
        **kw,
    )
