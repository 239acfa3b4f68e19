"""A fine-tuning job that judges its checkpoints (jobs/evaluation.py): a grader scores the starting
model and every checkpoint on the validation file, the best one becomes the job's model, and the
forgetting and safety checks compare the fine-tune with its base. On the tiny model, through the
SDK; the scores themselves are whatever the tiny model earns: the test checks that they are
measured, stored where the wire shows them, and that the choice follows them."""

import openai
import pytest

from tests.api.conftest import arithmetic_lines, create_org_key, wait_for_job, write_jsonl
from tests.conftest import TINY_MODEL

FUZZY = {
    "type": "text_similarity",
    "name": "close to the reference",
    "input": "{{sample.output_text}}",
    "reference": "{{item.reference}}",
    "evaluation_metric": "fuzzy_match",
}


@pytest.fixture(scope="module")
def judged(shared_server, tmp_path_factory):
    client = shared_server.client()
    d = tmp_path_factory.mktemp("data")
    train = client.files.create(
        file=write_jsonl(d / "train.jsonl", arithmetic_lines(12)).open("rb"), purpose="fine-tune"
    )
    valid = client.files.create(
        file=write_jsonl(d / "valid.jsonl", arithmetic_lines(18)[12:]).open("rb"), purpose="fine-tune"
    )
    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL,
        training_file=train.id,
        validation_file=valid.id,
        seed=3,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 4}}},
        extra_body={"evaluation": {"grader": FUZZY, "select_checkpoint": "best", "general_checks": True}},
    )
    job = wait_for_job(client, job.id, timeout=400)
    assert job.status == "succeeded", job.error
    return client, job


@pytest.mark.one_database  # checks the scores, the same on either database
def test_checkpoints_carry_validation_scores_beside_the_base(judged):
    client, job = judged
    evaluation = job.model_extra["evaluation"]
    assert evaluation["graders"] == ["close to the reference"]
    assert evaluation["n_items"] == 6
    assert 0.0 <= evaluation["base_score"] <= 1.0
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert len(checkpoints) >= 3
    for c in checkpoints:
        assert 0.0 <= c.metrics.model_extra["valid_score"] <= 1.0
        assert c.metrics.model_extra["base_valid_score"] == evaluation["base_score"]
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert any(m.startswith(f"Validation score of {TINY_MODEL} (before fine-tuning)") for m in messages)
    assert sum(m.startswith("Checkpoint at step") and "validation score" in m for m in messages) >= 3


def test_the_best_checkpoint_becomes_the_model(judged):
    client, job = judged
    chosen = job.model_extra["evaluation"]["chosen"]
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    # Every step's score (a promoted step appears twice: as itself and as the model).
    scores = {c.step_number: c.metrics.model_extra["valid_score"] for c in checkpoints}
    best_step = max(scores, key=lambda step: (scores[step], step))  # ties go to the later step
    assert chosen["step"] == best_step
    assert chosen["valid_score"] == pytest.approx(scores[best_step])
    model_row = next(c for c in checkpoints if c.fine_tuned_model_checkpoint == job.fine_tuned_model)
    assert model_row.step_number == best_step
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert any(
        m.startswith(("Promoted the checkpoint of step", "Kept the final checkpoint")) for m in messages
    )
    # The model answers (whichever weights it got).
    reply = client.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=4
    )
    assert reply.choices[0].message.content is not None


def test_forgetting_and_safety_checks_compare_with_the_base(judged):
    client, job = judged
    evaluation = job.model_extra["evaluation"]
    for name, size in (("forgetting", 38), ("safety", 30)):
        check = evaluation[name]
        assert check["n"] == size
        assert 0 <= check["base"] <= size and 0 <= check["fine_tuned"] <= size
        assert check["lost"] - check["gained"] == check["base"] - check["fine_tuned"]
        assert 0.0 <= check["p_value"] <= 1.0
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert any(m.startswith("Forgetting check: the fine-tuned model answers") for m in messages)
    assert any(m.startswith("Safety check: the fine-tuned model refuses") for m in messages)


@pytest.mark.one_database
@pytest.mark.parametrize(
    ("evaluation", "param"),
    [
        (
            {
                "grader": {
                    "type": "string_check",
                    "name": "x",
                    "input": "a",
                    "reference": "b",
                    "operation": "nope",
                }
            },
            "evaluation.grader.operation",
        ),
        ({"grader": FUZZY, "eval_id": "eval_x"}, "evaluation"),
        ({"select_checkpoint": "best"}, "evaluation.select_checkpoint"),
        ({"eval_id": "eval_missing"}, "evaluation.eval_id"),
        ({"grader": {**FUZZY, "type": "score_model", "model": "no-such-model", "input": []}}, None),
        ({"surprise": 1}, None),
    ],
)
def test_bad_evaluation_is_refused_at_create(shared_server, tmp_path, evaluation, param):
    client = shared_server.client()
    train = client.files.create(
        file=write_jsonl(tmp_path / "t.jsonl", arithmetic_lines(12)).open("rb"), purpose="fine-tune"
    )
    with pytest.raises((openai.BadRequestError, openai.NotFoundError)) as e:
        client.fine_tuning.jobs.create(
            model=TINY_MODEL,
            training_file=train.id,
            validation_file=train.id,
            extra_body={"evaluation": evaluation},
        )
    if param is not None:
        assert e.value.body["param"] == param
    assert not [j for j in client.fine_tuning.jobs.list().data if j.training_file == train.id]


@pytest.mark.one_database
def test_a_grader_needs_a_validation_file(shared_server, tmp_path):
    client = shared_server.client()
    train = client.files.create(
        file=write_jsonl(tmp_path / "t.jsonl", arithmetic_lines(12)).open("rb"), purpose="fine-tune"
    )
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(
            model=TINY_MODEL, training_file=train.id, extra_body={"evaluation": {"grader": FUZZY}}
        )
    assert e.value.body["param"] == "validation_file"


@pytest.mark.one_database
def test_an_evals_criteria_score_the_checkpoints(shared_server, tmp_path):
    client = shared_server.client()
    ev = client.evals.create(
        name="answers",
        data_source_config={
            "type": "custom",
            "item_schema": {"type": "object"},
            "include_sample_schema": True,
        },
        testing_criteria=[{**FUZZY, "pass_threshold": 0.5}],
    )
    train = client.files.create(
        file=write_jsonl(tmp_path / "t.jsonl", arithmetic_lines(12)).open("rb"), purpose="fine-tune"
    )
    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL,
        training_file=train.id,
        validation_file=train.id,
        extra_body={"evaluation": {"eval_id": ev.id, "select_checkpoint": "best"}},
    )
    client.fine_tuning.jobs.cancel(job.id)
    # Another organization cannot use this eval.
    other = shared_server.client(create_org_key(shared_server.settings, "evaluation-other-org"))
    own = other.files.create(
        file=write_jsonl(tmp_path / "o.jsonl", arithmetic_lines(12)).open("rb"), purpose="fine-tune"
    )
    with pytest.raises(openai.NotFoundError) as e:
        other.fine_tuning.jobs.create(
            model=TINY_MODEL,
            training_file=own.id,
            validation_file=own.id,
            extra_body={"evaluation": {"eval_id": ev.id}},
        )
    assert e.value.body["param"] == "evaluation.eval_id"
