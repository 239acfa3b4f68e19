"""score_model and label_model against a scripted ModelSampler (the interface model graders are
given; the real engine behind it is tested over HTTP in tests/api/test_graders_api.py)."""

from __future__ import annotations

import json
import threading

import pytest

from tunehouse.errors import ModelNotFound
from tunehouse.graders import Completion, Sample, grade_many, parse_grader


class ScriptedSampler:
    """Answers each call with the next scripted text (or raises it), recording what it was asked."""

    def __init__(self, *answers, refusal: str | None = None):
        self.answers = list(answers)
        self.refusal = refusal
        self.calls: list[dict] = []
        self.lock = threading.Lock()

    def complete(self, model, messages, **kwargs) -> Completion:
        with self.lock:
            self.calls.append({"model": model, "messages": messages, **kwargs})
            answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return Completion(
            text=answer, prompt_tokens=10, completion_tokens=4, model=model, refusal=self.refusal
        )


SCORE = {
    "type": "score_model",
    "name": "judge",
    "model": "judge-model",
    "input": [
        {"role": "system", "content": "Score the answer from 0 to 1."},
        {
            "role": "user",
            "type": "message",
            "content": [
                {"type": "input_text", "text": "Reference: {{item.reference}}\n"},
                {"type": "output_text", "text": "Answer: {{sample.output_text}}"},
            ],
        },
    ],
    "sampling_params": {"temperature": 0, "seed": 7, "max_completions_tokens": 20, "top_p": 1},
}
LABEL = {
    "type": "label_model",
    "name": "sentiment",
    "model": "judge-model",
    "input": [
        {"role": "user", "content": {"type": "input_text", "text": "Statement: {{sample.output_text}}"}}
    ],
    "labels": ["positive", "neutral", "negative"],
    "passing_labels": ["positive"],
}


def test_score_model_renders_messages_and_constrains_the_answer():
    grader = parse_grader(SCORE)
    sampler = ScriptedSampler('{"result": 0.75}')
    result = grader.grade(Sample.from_text("Paris"), {"reference": "Paris, France"}, sampler=sampler)
    assert not result.errored and result.reward == 0.75
    call = sampler.calls[0]
    assert call["model"] == "judge-model"
    assert call["messages"] == [
        {"role": "system", "content": "Score the answer from 0 to 1."},
        {"role": "user", "content": "Reference: Paris, France\nAnswer: Paris"},
    ]
    assert (call["temperature"], call["seed"], call["max_tokens"], call["top_p"]) == (0, 7, 20, 1)
    schema = call["response_format"]["json_schema"]["schema"]
    assert call["response_format"]["type"] == "json_schema"
    assert schema["properties"]["result"] == {"type": "number", "minimum": 0.0, "maximum": 1.0}
    assert result.token_usage == 14 and result.sampled_model_name == "judge-model"
    assert result.model_usage["judge-model"]["invocation_count"] == 1
    meta = result.metadata(grader)
    assert meta["token_usage"] == 14 and meta["sampled_model_name"] == "judge-model"
    # no pass_threshold: the middle of the range
    assert grader.passed(result)
    assert grader.references() == {"item.reference", "sample.output_text"}
    assert grader.models() == {"judge-model": "grader.model"}


def test_score_model_range_and_threshold():
    grader = parse_grader({**SCORE, "range": [1, 10], "pass_threshold": 8})
    sampler = ScriptedSampler('{"result": 7}')
    result = grader.grade(Sample.from_text("x"), {"reference": "y"}, sampler=sampler)
    assert result.reward == 7 and not grader.passed(result)
    assert (
        sampler.calls[0]["response_format"]["json_schema"]["schema"]["properties"]["result"]["maximum"] == 10
    )


@pytest.mark.parametrize(
    "answer",
    ['{"result": 1.5}', '{"result": "high"}', "0.5", '{"result": 0.', "I think it is good", '{"score": 1}'],
)
def test_unparseable_or_out_of_range_answer_is_a_parse_error(answer):
    grader = parse_grader(SCORE)
    result = grader.grade(Sample.from_text("x"), {"reference": "y"}, sampler=ScriptedSampler(answer))
    assert result.errored and result.errors.model_grader_parse_error
    assert result.reward == 0.0 and not grader.passed(result)
    assert result.token_usage == 14  # the model was still called: its tokens count


def test_refusal_and_server_errors():
    grader = parse_grader(SCORE)
    refused = grader.grade(
        Sample.from_text("x"), {"reference": "y"}, sampler=ScriptedSampler('{"result": 1}', refusal="no")
    )
    assert refused.errors.model_grader_refusal_error and refused.reward == 0.0
    broken = grader.grade(
        Sample.from_text("x"), {"reference": "y"}, sampler=ScriptedSampler(RuntimeError("engine down"))
    )
    assert broken.errors.model_grader_server_error
    assert "engine down" in broken.errors.model_grader_server_error_details
    no_sampler = grader.grade(Sample.from_text("x"), {"reference": "y"})
    assert no_sampler.errors.model_grader_server_error


def test_unknown_model_propagates():
    grader = parse_grader(SCORE)
    with pytest.raises(ModelNotFound):
        grader.grade(
            Sample.from_text("x"), {"reference": "y"}, sampler=ScriptedSampler(ModelNotFound("judge-model"))
        )


def test_missing_template_variable_does_not_call_the_model():
    grader = parse_grader(SCORE)
    sampler = ScriptedSampler('{"result": 1}')
    result = grader.grade(Sample.from_text("x"), {}, sampler=sampler)
    assert result.errors.invalid_variable_error and "item.reference" in result.error_message
    assert sampler.calls == []


def test_label_model():
    grader = parse_grader(LABEL)
    sampler = ScriptedSampler('{"result": "positive"}', '{"result": "negative"}', '{"result": "great"}')
    good, bad, off = (grader.grade(Sample.from_text(t), {}, sampler=sampler) for t in ("yay", "boo", "meh"))
    assert good.label == "positive" and good.reward == 1.0 and grader.passed(good)
    assert bad.label == "negative" and bad.reward == 0.0 and not grader.passed(bad)
    assert off.errors.model_grader_parse_error and not grader.passed(off)
    schema = sampler.calls[0]["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["result"] == {"type": "string", "enum": ["positive", "neutral", "negative"]}
    assert sampler.calls[0]["messages"] == [{"role": "user", "content": "Statement: yay"}]


def test_grade_many_sends_requests_together_and_keeps_order():
    """Every item's request is in flight at once (the engine batches them): each call waits at a
    barrier that only opens when all of them have arrived."""
    n = 6
    barrier = threading.Barrier(n, timeout=30)

    class Gathering:
        def complete(self, model, messages, **kwargs):
            barrier.wait()
            score = float(messages[-1]["content"].rsplit(" ", 1)[-1])
            return Completion(
                text=json.dumps({"result": score}), prompt_tokens=1, completion_tokens=1, model=model
            )

    grader = parse_grader({**SCORE, "input": [{"role": "user", "content": "value {{item.v}}"}]})
    pairs = [(Sample.from_text("x"), {"v": i / 10}) for i in range(n)]
    results = grade_many(grader, pairs, sampler=Gathering(), max_workers=n)
    assert [r.reward for r in results] == [i / 10 for i in range(n)]
