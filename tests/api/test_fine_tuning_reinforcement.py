"""Reinforcement fine-tuning (method "reinforcement", GRPO) through the SDK on the tiny model: the
job samples groups of answers, grades them with the job's grader, trains, reports rewards (events,
metrics, result file, checkpoints), and its model is served; bad graders and hyperparameters are
refused at create with the wrong field's `param`, and lines that lack what the grader reads fail
the job with their line numbers. Whether GRPO learns is shown on the real model (bench/, README)."""

import base64
import csv
import io
import json
import os
import signal
import time

import openai
import pytest

from tests.api.conftest import LiveServer, runner_pids, wait_for_job, write_jsonl
from tests.conftest import TINY_MODEL

FUZZY = {
    "type": "text_similarity",
    "name": "close to the answer",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "evaluation_metric": "fuzzy_match",
}


# The tiny random model's answers all miss the reference; a reward that varies with the answer's
# length gives its groups something to compare (python graders run in the sandbox).
BY_LENGTH = {
    "type": "python",
    "name": "length",
    "source": "def grade(sample, item):\n    return (len(sample['output_text']) % 10) / 10 + 0 * len(item['answer'])\n",
}


def prompts(n: int, start: int = 0) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"What is {i} + {i}?"}], "answer": f"{2 * i}"}
        for i in range(start, start + n)
    ]


def lines(objs: list[dict]) -> list[str]:
    return [json.dumps(o) for o in objs]


def rft(grader: dict, **hyper) -> dict:
    return {"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": hyper}}


@pytest.fixture(scope="module")
def client(shared_server):
    return shared_server.client()


@pytest.fixture(scope="module")
def files(client, tmp_path_factory):
    d = tmp_path_factory.mktemp("rft")
    train = client.files.create(
        file=write_jsonl(d / "train.jsonl", lines(prompts(10))).open("rb"), purpose="fine-tune"
    )
    valid = client.files.create(
        file=write_jsonl(d / "valid.jsonl", lines(prompts(3, 20))).open("rb"), purpose="fine-tune"
    )
    lacking = prompts(10)
    for i in (2, 6):
        del lacking[i]["answer"]
    bad = client.files.create(
        file=write_jsonl(d / "lacking.jsonl", lines(lacking)).open("rb"), purpose="fine-tune"
    )
    return train.id, valid.id, bad.id


@pytest.fixture(scope="module")
def trained(client, files):  # the tests using it are one_database: they check training, not rows
    train, valid, _ = files
    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL,
        training_file=train,
        validation_file=valid,
        seed=5,
        method=rft(
            BY_LENGTH,
            n_epochs=1,
            batch_size=2,
            compute_multiplier=0.5,
            reasoning_effort="low",
            eval_interval=2,
            eval_samples=2,
        ),
    )
    job = wait_for_job(client, job.id, timeout=500)
    assert job.status == "succeeded", job.error
    return job


ANSWER_SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "answer",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"answer": {"type": "integer"}},
            "required": ["answer"],
            "additionalProperties": False,
        },
    },
}


@pytest.mark.one_database
def test_a_response_format_shapes_every_sampled_answer(client, files):
    train, _, _ = files
    method = rft(BY_LENGTH, n_epochs=1, batch_size=5, compute_multiplier=0.25, max_completion_tokens=12)
    method["reinforcement"]["response_format"] = ANSWER_SCHEMA
    job = client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=train, seed=3, method=method)
    assert job.method.reinforcement.model_extra["response_format"] == ANSWER_SCHEMA
    job = wait_for_job(client, job.id, timeout=300)
    assert job.status == "succeeded", job.error
    events = client.fine_tuning.jobs.list_events(job.id, limit=200).data
    answers = [
        a
        for e in events
        if e.message.startswith("Step ") and "samples" in e.message
        for sample in e.data["samples"]
        for a in sample["answers"]
    ]
    assert len(answers) >= 4
    # The tiny random model writes no JSON of itself; constrained, every answer is the schema's
    # object or, cut at 12 tokens, its beginning.
    for a in answers:
        compact = "".join(a.split())  # JSON may space its tokens (whitespace is cut here)
        assert compact.startswith('{"answer":') or '{"answer":'.startswith(compact), a
        if a.rstrip().endswith("}"):
            assert set(json.loads(a)) == {"answer"} and isinstance(json.loads(a)["answer"], int)


@pytest.mark.one_database
def test_the_job_reports_rewards_and_its_model_answers(client, trained):
    job = trained
    hp = job.method.reinforcement.hyperparameters
    assert (hp.n_epochs, hp.batch_size, hp.eval_interval, hp.eval_samples) == (1, 2, 2, 2)
    assert hp.reasoning_effort == "low" and hp.compute_multiplier == 0.5
    resolved = job.method.reinforcement.hyperparameters.model_extra
    assert resolved["group_size"] == 4 and resolved["max_completion_tokens"] == 128
    assert job.method.reinforcement.grader.type == "python"

    events = client.fine_tuning.jobs.list_events(job.id, limit=200).data
    metrics = sorted((e.data for e in events if e.type == "metrics"), key=lambda d: d["step"])
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    for m in metrics:
        assert 0.0 <= m["train_reward_mean"] <= 1.0 and m["train_reward_std"] >= 0.0
        assert m["train_grader_error_rate"] == 0.0
        assert 1 <= m["train_answer_tokens_mean"] <= 128 and m["generated_tokens"] >= 4 * 2
        assert m["generation_seconds"] > 0
    # Fuzzy rewards of random answers differ within a group, so those groups train. (The loss's
    # value is ~0: advantages sum to zero in a group; its gradient is what moves the weights.)
    assert any(m["train_flat_groups"] < 2 for m in metrics)
    assert [m["step"] for m in metrics if "valid_reward" in m] == [2, 4, 5]
    assert "full_valid_reward" in metrics[-1]
    samples = [e for e in events if e.message.startswith("Step ") and "samples" in e.message]
    assert samples and len(samples[0].data["samples"][0]["answers"]) == 4
    assert "reward=" in next(e.message for e in events if e.type == "metrics")
    assert all(m["base_valid_reward"] == metrics[0]["base_valid_reward"] for m in metrics)
    # The alpha graders endpoint gives a training answer the reward training gave it.
    sample = samples[0].data["samples"][0]
    for answer, reward in list(zip(sample["answers"], sample["rewards"], strict=True))[:2]:
        run = client.fine_tuning.alpha.graders.run(grader=BY_LENGTH, model_sample=answer, item=sample["item"])
        assert run.reward == pytest.approx(reward)

    checkpoint = client.fine_tuning.jobs.checkpoints.list(job.id).data[0]
    assert 0.0 <= checkpoint.metrics.model_extra["full_valid_reward"] <= 1.0

    raw = client.files.content(job.result_files[0]).read()
    rows = list(csv.DictReader(io.StringIO(base64.b64decode(raw).decode())))
    assert len(rows) == 5 and rows[0]["train_reward_mean"] != ""
    assert float(rows[0]["generation_seconds"]) > 0 and float(rows[0]["generated_tokens"]) >= 8

    reply = client.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=4
    )
    assert reply.choices[0].message.content is not None


def test_lines_lacking_what_the_grader_reads_fail_the_job_with_their_numbers(client, files):
    _, _, lacking = files
    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL, training_file=lacking, method=rft(FUZZY, n_epochs=1)
    )
    job = wait_for_job(client, job.id, timeout=120)
    assert job.status == "failed"
    assert job.error.param == "training_file"
    assert "'answer'" in job.error.message and "line(s) 3, 7" in job.error.message


def test_a_grader_that_fails_on_most_answers_fails_the_job_once(client, files):
    train, _, _ = files
    failing = {
        "type": "python",
        "name": "broken",
        "source": "def grade(sample, item):\n    raise ValueError('no reward for you')\n",
    }
    method = rft(failing, n_epochs=1, batch_size=2, compute_multiplier=0.25, max_completion_tokens=4)
    job = client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=train, method=method)
    job = wait_for_job(client, job.id, timeout=300)
    assert job.status == "failed"
    assert job.error.code == "grader_failed" and job.error.param == "method.reinforcement.grader"
    assert "no reward for you" in job.error.message and "4 of 4 answers" in job.error.message
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert not any(m.startswith("Retrying in ") for m in messages)  # not a passing fault: no retry


@pytest.mark.parametrize(
    "method, param",
    [
        (rft({**FUZZY, "type": "regex_check"}), "method.reinforcement.grader.type"),
        (
            rft({"type": "python", "name": "p", "source": "def score(sample, item):\n    return 1.0\n"}),
            "method.reinforcement.grader.source",
        ),
        (
            rft(
                {
                    "type": "label_model",
                    "name": "l",
                    "model": TINY_MODEL,
                    "input": [],
                    "labels": ["a"],
                    "passing_labels": ["a"],
                }
            ),
            "method.reinforcement.grader.type",
        ),
        (rft({**FUZZY, "pass_threshold": 0.5}), "method.reinforcement.grader.pass_threshold"),
        (
            rft({"type": "python", "name": "p", "source": "def grade(sample, item:\n"}),
            "method.reinforcement.grader.source",
        ),
        (rft(FUZZY, reasoning_effort="extreme"), "method.reinforcement.hyperparameters.reasoning_effort"),
        (rft(FUZZY, compute_multiplier=0), "method.reinforcement.hyperparameters.compute_multiplier"),
        (rft(FUZZY, kl_beta=0.1, fine_tuning_type="full"), "method.reinforcement.hyperparameters.kl_beta"),
        (rft(FUZZY, group_size=4), "method.reinforcement.hyperparameters.group_size"),
        (
            {
                "type": "reinforcement",
                "reinforcement": {
                    "grader": FUZZY,
                    "response_format": {"type": "json_schema", "json_schema": {"name": "no spaces here"}},
                },
            },
            "method.reinforcement.response_format",
        ),
        (
            {
                "type": "reinforcement",
                "reinforcement": {
                    "grader": FUZZY,
                    "response_format": {
                        "type": "json_schema",
                        "json_schema": {"name": "s", "schema": {"type": "object", "minProperties": "x"}},
                    },
                },
            },
            "method.reinforcement.response_format",
        ),
        ({"type": "reinforcement"}, "method.reinforcement"),
        (
            rft(
                {
                    "name": "s",
                    "type": "score_model",
                    "model": "no-such-model",
                    "input": [{"role": "user", "content": "x"}],
                }
            ),
            None,
        ),
    ],
)
def test_bad_reinforcement_requests_are_refused_at_create(client, files, method, param):
    train, _, _ = files
    before = len(client.fine_tuning.jobs.list(limit=100).data)
    with pytest.raises((openai.BadRequestError, openai.NotFoundError)) as e:
        client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=train, method=method)
    if param is not None:
        assert e.value.body["param"] == param, e.value.body
    else:
        assert "no-such-model" in e.value.body["message"]
    assert len(client.fine_tuning.jobs.list(limit=100).data) == before


def _rewards(client, job_id) -> list[tuple[int, float]]:
    events = client.fine_tuning.jobs.list_events(job_id, limit=10000).data
    return sorted((e.data["step"], e.data["train_reward_mean"]) for e in events if e.type == "metrics")


@pytest.mark.one_database  # what it checks is training's determinism, the same on either database
def test_a_killed_rft_process_resumes_step_for_step(settings, tmp_path):
    """Each step's answers are drawn from a seed the saved state restores: a run killed with -9
    and resumed samples, grades and trains exactly as one never interrupted."""
    settings.state_save_seconds = 0  # save after every step, so the kill loses nothing
    with LiveServer(settings) as live:
        client = live.client()
        train = client.files.create(
            file=write_jsonl(tmp_path / "t.jsonl", lines(prompts(10))).open("rb"), purpose="fine-tune"
        )
        # 40 steps: long enough that the kill lands mid-run on a fast machine too.
        method = rft(BY_LENGTH, n_epochs=4, batch_size=1, compute_multiplier=0.5, max_completion_tokens=16)

        def create():
            return client.fine_tuning.jobs.create(
                model=TINY_MODEL, training_file=train.id, seed=9, method=method
            )

        reference = wait_for_job(client, create().id, timeout=300)
        assert reference.status == "succeeded", reference.error
        job = create()
        deadline = time.time() + 120
        while len(_rewards(client, job.id)) < 4:
            assert time.time() < deadline, "training made no progress"
            time.sleep(0.2)
        pids = runner_pids(job.id)
        assert pids
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        done = wait_for_job(client, job.id, timeout=300)
        assert done.status == "succeeded", done.error
        got = _rewards(client, job.id)
        assert [s for s, _ in got] == list(range(1, 41)), "every step exactly once"
        assert got == _rewards(client, reference.id)
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)]
        assert any(m.startswith("Fine-tuning job resumed from step ") for m in messages)
