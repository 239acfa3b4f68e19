"""/v1/fine_tuning through the official SDK, on the tiny model: one real job is trained for the
module and inspected from every side; other tests cover errors, cancel, restart and listing."""

import base64
import csv
import io
import json
import re
import time

import openai
import pytest

from tests.api.conftest import (
    LiveServer,
    arithmetic_lines,
    chat_line,
    create_org_key,
    wait_for_job,
    write_jsonl,
)
from tests.conftest import TINY_MODEL


@pytest.fixture(scope="module")
def trained(shared_server, tmp_path_factory):
    client = shared_server.client()
    d = tmp_path_factory.mktemp("data")
    train = client.files.create(
        file=write_jsonl(d / "train.jsonl", arithmetic_lines(12)).open("rb"), purpose="fine-tune"
    )
    valid = client.files.create(
        file=write_jsonl(d / "valid.jsonl", arithmetic_lines(16)[12:]).open("rb"), purpose="fine-tune"
    )
    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL,
        training_file=train.id,
        validation_file=valid.id,
        suffix="arith",
        seed=7,
        metadata={"team": "research"},
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 4, "batch_size": 4, "lora_rank": 8}},
        },
    )
    assert job.status == "validating_files"
    return client, wait_for_job(client, job.id)


def test_job_object_after_success(trained):
    client, job = trained
    assert job.status == "succeeded", job.error
    assert re.fullmatch(r"ft:tiny-smollm2:default:arith:[A-Za-z0-9]{8}", job.fine_tuned_model)
    assert job.error is None and job.finished_at >= job.created_at and job.seed == 7
    assert job.metadata == {"team": "research"} and job.user_provided_suffix == "arith"
    hp = job.hyperparameters
    assert (hp.n_epochs, hp.batch_size) == (4, 4) and isinstance(hp.learning_rate_multiplier, float)
    assert job.method.type == "supervised"
    assert job.method.supervised.hyperparameters.n_epochs == 4
    # The LoRA shape (a tunehouse extension) is echoed and is what was trained.
    assert {
        "lora_rank": 8,
        "lora_alpha": 32,
    }.items() <= job.method.supervised.hyperparameters.model_dump().items()
    # trained_tokens is what the estimate said would be billed: tokens in the file x epochs.
    estimate = next(
        e for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if "billable" in e.message
    )
    assert job.trained_tokens == estimate.data["billable_tokens"] > 0
    assert job.trained_tokens == 4 * estimate.data["tokens_per_epoch"]


def test_result_file_is_openai_csv(trained):
    client, job = trained
    assert len(job.result_files) == 1
    f = client.files.retrieve(job.result_files[0])
    assert f.purpose == "fine-tune-results"
    rows = list(csv.DictReader(io.StringIO(base64.b64decode(client.files.content(f.id).read()).decode())))
    assert list(rows[0]) == [
        "step",
        "train_loss",
        "train_accuracy",
        "valid_loss",
        "valid_mean_token_accuracy",
    ]
    assert [int(r["step"]) for r in rows] == list(range(1, 13))  # 3 steps per epoch x 4 epochs
    assert all(float(r["train_loss"]) > 0 for r in rows)


def test_events_follow_openai_templates_newest_first(trained):
    client, job = trained
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    messages = [e.message for e in reversed(events)]
    assert messages[0] == f"Created fine-tuning job: {job.id}"
    assert (
        messages[1]
        == f"Validating training file: {job.training_file} and validation file: {job.validation_file}"
    )
    assert "Files validated, moving job to queued state" in messages
    assert "Fine-tuning job started" in messages
    assert messages[-2] == f"New fine-tuned model created: {job.fine_tuned_model}"
    assert messages[-1] == "The job has successfully completed"
    metrics = [e for e in reversed(events) if e.type == "metrics"]
    assert [m.data["step"] for m in metrics] == list(range(1, 13))
    assert metrics[0].message.startswith("Step 1/12: training loss=")
    assert {
        "train_loss",
        "train_mean_token_accuracy",
        "valid_loss",
        "valid_mean_token_accuracy",
        "total_steps",
    } <= set(metrics[0].data)
    assert "full_valid_loss" in metrics[2].data  # end of the first epoch
    # Pagination: pages of 5 with `after`, newest first, covering everything once.
    page = client.fine_tuning.jobs.list_events(job.id, limit=5)
    assert [e.id for e in page.data] == [e.id for e in events[:5]] and page.has_more
    nxt = client.fine_tuning.jobs.list_events(job.id, limit=5, after=page.data[-1].id)
    assert [e.id for e in nxt.data] == [e.id for e in events[5:10]]


def test_checkpoints_and_models(trained, shared_server):
    client, job = trained
    configs = list(shared_server.settings.weights_dir.rglob("adapter_config.json"))
    assert configs and all(json.loads(p.read_text())["r"] == 8 for p in configs)
    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    # One per epoch, the last 3 kept, newest first; the final one *is* the fine-tuned model.
    assert [c.step_number for c in ckpts] == [12, 9, 6]
    assert ckpts[0].fine_tuned_model_checkpoint == job.fine_tuned_model
    assert ckpts[1].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-9"
    assert all(c.id.startswith("ftckpt_") and c.fine_tuning_job_id == job.id for c in ckpts)
    assert {"train_loss", "full_valid_loss"} <= set(ckpts[1].metrics.model_dump(exclude_none=True))
    assert not any(m.id.endswith("ckpt-step-3") for m in client.models.list())

    models = {m.id: m for m in client.models.list()}
    assert {
        "smollm2-135m-instruct",
        TINY_MODEL,
        job.fine_tuned_model,
        f"{job.fine_tuned_model}:ckpt-step-6",
    } <= set(models)
    assert client.models.retrieve(job.fine_tuned_model).owned_by == job.organization_id
    for name in (job.fine_tuned_model, f"{job.fine_tuned_model}:ckpt-step-6"):
        out = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "What is 3 + 3?"}], max_tokens=4, temperature=0
        )
        assert out.model == name and out.usage.completion_tokens <= 4

    other = shared_server.client(create_org_key(shared_server.settings, "acme"))
    assert job.fine_tuned_model not in {m.id for m in other.models.list()}
    for call in (
        lambda: other.fine_tuning.jobs.retrieve(job.id),
        lambda: other.fine_tuning.jobs.cancel(job.id),
        lambda: other.fine_tuning.jobs.list_events(job.id),
        lambda: other.fine_tuning.jobs.checkpoints.list(job.id),
        lambda: other.models.retrieve(job.fine_tuned_model),
        lambda: other.models.delete(job.fine_tuned_model),
        lambda: other.files.content(job.result_files[0]),
        lambda: other.chat.completions.create(
            model=job.fine_tuned_model, messages=[{"role": "user", "content": "x"}]
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert other.fine_tuning.jobs.list().data == []


def test_delete_fine_tuned_model_removes_weights(trained, shared_server):
    client, job = trained
    name = f"{job.fine_tuned_model}:ckpt-step-6"
    weights = shared_server.settings.weights_dir
    before = {p.name for p in weights.rglob("step-*")}
    assert "step-6" in before
    assert client.models.delete(name).deleted is True
    assert "step-6" not in {p.name for p in weights.rglob("step-*")}
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.PermissionDeniedError):
        client.models.delete(TINY_MODEL)


def test_create_errors(server, client, tmp_path):
    good = client.files.create(
        file=write_jsonl(tmp_path / "t.jsonl", arithmetic_lines()).open("rb"), purpose="fine-tune"
    )
    notes = client.files.create(file=("n.txt", b"x"), purpose="user_data")
    foreign = server.client(create_org_key(server.settings, "acme")).files.create(
        file=write_jsonl(tmp_path / "f.jsonl", arithmetic_lines()).open("rb"), purpose="fine-tune"
    )
    cases = [
        (
            dict(model="no-such-model", training_file=good.id),
            openai.NotFoundError,
            "model",
            "model_not_found",
        ),
        (dict(model=TINY_MODEL, training_file="file-nope"), openai.NotFoundError, "training_file", None),
        (dict(model=TINY_MODEL, training_file=foreign.id), openai.NotFoundError, "training_file", None),
        (
            dict(model=TINY_MODEL, training_file=good.id, validation_file="file-nope"),
            openai.NotFoundError,
            "validation_file",
            None,
        ),
        (
            dict(model=TINY_MODEL, training_file=notes.id),
            openai.BadRequestError,
            "training_file",
            "invalid_file_purpose",
        ),
        (
            dict(model=TINY_MODEL, training_file=good.id, suffix="x" * 65),
            openai.BadRequestError,
            "suffix",
            None,
        ),
        (
            dict(model=TINY_MODEL, training_file=good.id, hyperparameters={"n_epochs": 0}),
            openai.BadRequestError,
            "hyperparameters.n_epochs",
            None,
        ),
        (
            # A reinforcement job needs its grader.
            dict(model=TINY_MODEL, training_file=good.id, method={"type": "reinforcement"}),
            openai.BadRequestError,
            "method.reinforcement",
            None,
        ),
        (
            dict(model="ft:tiny-smollm2:acme:x:12345678", training_file=good.id),
            openai.NotFoundError,
            "model",
            "model_not_found",
        ),
        (
            dict(
                model=TINY_MODEL,
                training_file=good.id,
                method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 3}}},
            ),
            openai.BadRequestError,
            "method.dpo.hyperparameters.beta",
            None,
        ),
        (
            dict(model=TINY_MODEL, training_file=good.id, metadata={f"k{i}": "v" for i in range(17)}),
            openai.BadRequestError,
            "metadata",
            None,
        ),
    ]
    for kwargs, exc, param, code in cases:
        with pytest.raises(exc) as e:
            client.fine_tuning.jobs.create(**kwargs)
        assert e.value.body["param"] == param, (kwargs, e.value.body)
        if code:
            assert e.value.body["code"] == code
    assert client.fine_tuning.jobs.list().data == [], "a refused create leaves no job behind"


def test_bad_training_file_fails_during_validation_with_line_numbers(client, tmp_path):
    lines = arithmetic_lines(12)
    lines[1] = "{not json"
    lines[4] = json.dumps(
        {"messages": [{"role": "usr", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    )
    lines[7] = json.dumps({"messages": [{"role": "user", "content": "no answer"}]})
    f = client.files.create(file=write_jsonl(tmp_path / "bad.jsonl", lines).open("rb"), purpose="fine-tune")
    job = wait_for_job(client, client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=f.id).id)
    assert job.status == "failed" and job.fine_tuned_model is None
    assert job.error.code == "invalid_training_file" and job.error.param == "training_file"
    assert all(f"line {n}" in job.error.message for n in (2, 5, 8)), job.error.message
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id)]
    assert "Fine-tuning job started" not in messages
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data == []

    few = client.files.create(
        file=write_jsonl(tmp_path / "few.jsonl", arithmetic_lines(4)).open("rb"), purpose="fine-tune"
    )
    job = wait_for_job(client, client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=few.id).id)
    assert job.error.code == "invalid_n_examples"
    assert "has 4 example(s), but must have at least 10 examples" in job.error.message


def test_cancel_stops_training(client, tmp_path):
    lines = [chat_line(f"Count to {i}", " ".join(str(k) for k in range(i + 20))) for i in range(40)]
    f = client.files.create(file=write_jsonl(tmp_path / "long.jsonl", lines).open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL, training_file=f.id, hyperparameters={"n_epochs": 50, "batch_size": 1}
    )
    wait_for_job(client, job.id, until=("running",))
    deadline = time.time() + 120
    while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id, limit=5)):
        assert time.time() < deadline
        time.sleep(0.3)
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    time.sleep(4)  # the worker stops the process within a poll or two
    n_steps = len(
        [e for e in client.fine_tuning.jobs.list_events(job.id, limit=10000) if e.type == "metrics"]
    )
    time.sleep(3)
    assert (
        len([e for e in client.fine_tuning.jobs.list_events(job.id, limit=10000) if e.type == "metrics"])
        == n_steps
    )
    job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "cancelled" and job.fine_tuned_model is None
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)


def test_list_jobs_pagination_and_metadata_filter(settings, tmp_path):
    settings.local_worker = False  # jobs stay in validating_files: this test is about listing
    with LiveServer(settings) as live:
        client = live.client()
        f = client.files.create(
            file=write_jsonl(tmp_path / "t.jsonl", arithmetic_lines()).open("rb"), purpose="fine-tune"
        )
        ids = [
            client.fine_tuning.jobs.create(
                model=TINY_MODEL, training_file=f.id, metadata={"team": "a" if i % 2 else "b"}
            ).id
            for i in range(5)
        ]
        page = client.fine_tuning.jobs.list(limit=2)
        assert [j.id for j in page.data] == ids[::-1][:2] and page.has_more
        assert [j.id for j in client.fine_tuning.jobs.list(limit=2)] == ids[::-1]
        assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "a"})] == [ids[3], ids[1]]
        assert client.fine_tuning.jobs.retrieve(ids[0]).status == "validating_files"
        with pytest.raises(openai.NotFoundError):
            client.fine_tuning.jobs.retrieve("ftjob-nope")


def test_job_of_a_stopped_server_runs_again_after_restart(settings, tmp_path):
    lines = [chat_line(f"Count to {i}", " ".join(str(k) for k in range(i + 20))) for i in range(12)]
    with LiveServer(settings) as live:
        client = live.client()
        f = client.files.create(file=write_jsonl(tmp_path / "t.jsonl", lines).open("rb"), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model=TINY_MODEL, training_file=f.id, hyperparameters={"n_epochs": 3, "batch_size": 2}
        )
        wait_for_job(client, job.id, until=("running",))
    # The server stopped mid-job: the job went back to the queue, not left `running`.
    with LiveServer(settings) as live:
        client = live.client()
        assert client.fine_tuning.jobs.retrieve(job.id).status in ("queued", "running", "succeeded")
        done = wait_for_job(client, job.id)
        assert done.status == "succeeded", done.error
        assert any(
            "put back in the queue" in e.message
            for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)
        )


def test_data_check_extension_reports_everything_before_a_job(client, server, tmp_path):
    lines = arithmetic_lines(12)
    lines[2] = "{broken"
    lines[6] = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}
    )
    bad = client.files.create(file=write_jsonl(tmp_path / "bad.jsonl", lines).open("rb"), purpose="fine-tune")
    good = client.files.create(
        file=write_jsonl(tmp_path / "good.jsonl", arithmetic_lines(12)).open("rb"), purpose="fine-tune"
    )
    with server.http() as http:
        r = http.post("/v1/fine_tuning/data_checks", json={"training_file": bad.id, "model": TINY_MODEL})
        assert r.status_code == 200
        report = r.json()
        assert report["ok"] is False and report["error"]["param"] == "training_file"
        assert {(p["line"], p["code"]) for p in report["errors"]} >= {
            (3, "invalid_json"),
            (7, "unrecognized_role"),
        }

        r = http.post(
            "/v1/fine_tuning/data_checks",
            json={"training_file": good.id, "validation_file": good.id, "model": TINY_MODEL, "n_epochs": 2},
        )
        report = r.json()
        assert report["ok"] is True and report["error"] is None
        assert report["estimate"]["billable_tokens"] == 2 * report["estimate"]["tokens_per_epoch"] > 0
        assert report["validation"]["warning_counts"].get("train_validation_overlap") == 12
        r = http.post(
            "/v1/fine_tuning/data_checks",
            json={
                "training_file": good.id,
                "validation_file": good.id,
                "model": TINY_MODEL,
                "overlap_is_error": True,
            },
        )
        assert r.json()["ok"] is False and r.json()["error"]["param"] == "validation_file"

        assert (
            http.post("/v1/fine_tuning/data_checks", json={"training_file": "file-nope"}).status_code == 404
        )
    assert client.fine_tuning.jobs.list().data == [], "a data check creates no job"
    # The same option on a job (an extension field) fails it during validation, training nothing.
    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL,
        training_file=good.id,
        validation_file=good.id,
        extra_body={"overlap_is_error": True},
    )
    job = wait_for_job(client, job.id)
    assert job.status == "failed" and job.error.param == "validation_file"
    assert "line 1: validation example is identical to train" in job.error.message
    assert "Fine-tuning job started" not in [e.message for e in client.fine_tuning.jobs.list_events(job.id)]


def test_every_problem_kind_in_one_file_fails_the_job_before_training(server, client, tmp_path):
    """The validator's whole corpus of bad lines in one upload: the job fails during validation
    naming the count, the full report locates every line with its code, and nothing is trained."""
    from tests.data.helpers import good
    from tests.data.test_validation import BAD_CHAT

    lines, expected = [json.dumps(good(i)) for i in range(12)], set()
    for _name, bad, code, _field in BAD_CHAT:
        lines.append(bad if isinstance(bad, str) else json.dumps(bad))
        expected.add((len(lines), code))
    f = client.files.create(
        file=write_jsonl(tmp_path / "corpus.jsonl", lines).open("rb"), purpose="fine-tune"
    )
    job = wait_for_job(client, client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=f.id).id)
    assert job.status == "failed" and job.error.param == "training_file"
    count = re.search(r"(\d+) problems found: line 13:", job.error.message)
    assert count and int(count.group(1)) >= len(BAD_CHAT), job.error.message
    with server.http() as http:
        report = http.post(
            "/v1/fine_tuning/data_checks", json={"training_file": f.id, "model": TINY_MODEL}
        ).json()
    assert expected <= {(p["line"], p["code"]) for p in report["errors"]}
    assert "Fine-tuning job started" not in [
        e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)
    ]
    assert not (server.settings.jobs_dir / job.id / "train.log").exists()
    assert not any(server.settings.weights_dir.rglob("*"))


def test_job_of_a_dead_worker_is_taken_over_when_its_lease_expires(settings, tmp_path):
    from sqlalchemy import update

    from tunehouse.store.engine import Database
    from tunehouse.store.tables import Job

    settings.local_worker = False
    with LiveServer(settings) as live:
        client = live.client()
        f = client.files.create(
            file=write_jsonl(tmp_path / "t.jsonl", arithmetic_lines()).open("rb"), purpose="fine-tune"
        )
        job = client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=f.id)
    # As a worker killed with -9 mid-training leaves it: running, leased to a worker that is gone.
    db = Database(settings.db_url)
    with db.transaction() as s:
        hp = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1.0}
        s.execute(
            update(Job)
            .where(Job.id == job.id)
            .values(
                status="running",
                worker_id="dead-host:1:x",
                lease_expires_at=time.time() - 1,
                method={"type": "supervised", "supervised": {"hyperparameters": hp}},
            )
        )
    db.dispose()
    settings.local_worker = True
    with LiveServer(settings) as live:
        client = live.client()
        done = wait_for_job(client, job.id)
        assert done.status == "succeeded", done.error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)]
        assert any("starting again on another worker" in m for m in messages)


def test_training_file_deleted_before_the_job_runs_fails_it_clearly(settings, tmp_path):
    settings.local_worker = False
    with LiveServer(settings) as live:
        client = live.client()
        f = client.files.create(
            file=write_jsonl(tmp_path / "t.jsonl", arithmetic_lines()).open("rb"), purpose="fine-tune"
        )
        job = client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=f.id)
        client.files.delete(f.id)
    settings.local_worker = True
    with LiveServer(settings) as live:
        done = wait_for_job(live.client(), job.id)
    assert done.status == "failed"
    assert (done.error.code, done.error.param) == ("invalid_file", "training_file")
    assert f.id in done.error.message and "deleted" in done.error.message


def test_fine_tuning_type_and_lora_extensions_are_validated_and_echoed(settings, tmp_path):
    settings.local_worker = False  # only creation and its checks; nothing trains
    with LiveServer(settings) as live:
        client = live.client()
        f = client.files.create(
            file=write_jsonl(tmp_path / "t.jsonl", arithmetic_lines()).open("rb"), purpose="fine-tune"
        )
        where = "method.supervised.hyperparameters"

        def create(**hyper):
            return client.fine_tuning.jobs.create(
                model=TINY_MODEL,
                training_file=f.id,
                method={"type": "supervised", "supervised": {"hyperparameters": hyper}},
            )

        for hyper, param in [
            ({"fine_tuning_type": "qlora"}, f"{where}.fine_tuning_type"),
            ({"lora_target_modules": []}, f"{where}.lora_target_modules"),
            ({"lora_target_modules": "q_proj"}, f"{where}.lora_target_modules"),
            ({"lora_target_modules": ["q_proj", "bad name!"]}, f"{where}.lora_target_modules[1]"),
            ({"fine_tuning_type": "full", "lora_rank": 8}, f"{where}.lora_rank"),
            ({"fine_tuning_type": "full", "lora_target_modules": ["q_proj"]}, f"{where}.lora_target_modules"),
        ]:
            with pytest.raises(openai.BadRequestError) as e:
                create(**hyper)
            assert e.value.body["param"] == param, (hyper, e.value.body)
        with pytest.raises(openai.BadRequestError) as e:
            client.fine_tuning.jobs.create(
                model=TINY_MODEL, training_file=f.id, hyperparameters={"fine_tuning_type": "half"}
            )
        assert e.value.body["param"] == "hyperparameters.fine_tuning_type"
        assert client.fine_tuning.jobs.list().data == []

        # Echoed, resolved: auto is LoRA with every projection wrapped; full carries no LoRA fields.
        lora = create().to_dict()["method"]["supervised"]["hyperparameters"]
        assert lora["fine_tuning_type"] == "lora" and (lora["lora_rank"], lora["lora_alpha"]) == (16, 32)
        assert lora["lora_target_modules"] == [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        full = create(fine_tuning_type="full").to_dict()["method"]["supervised"]["hyperparameters"]
        assert full["fine_tuning_type"] == "full" and not any(k.startswith("lora_") for k in full)
        dpo = client.fine_tuning.jobs.create(
            model=TINY_MODEL,
            training_file=f.id,
            method={"type": "dpo", "dpo": {"hyperparameters": {"lora_target_modules": ["q_proj", "v_proj"]}}},
        ).to_dict()["method"]["dpo"]["hyperparameters"]
        assert (dpo["fine_tuning_type"], dpo["lora_target_modules"]) == ("lora", ["q_proj", "v_proj"])
        unknown = create(lora_target_modules=["q_proj", "query_key_value"])
    # A module name the model does not have fails the job while validating, naming the parameter.
    settings.local_worker = True
    with LiveServer(settings) as live:
        client = live.client()
        for job in client.fine_tuning.jobs.list().data:
            if job.id != unknown.id:
                client.fine_tuning.jobs.cancel(job.id)
        done = wait_for_job(client, unknown.id)
    assert done.status == "failed" and done.error.code == "invalid_hyperparameters"
    assert done.error.param == f"{where}.lora_target_modules"
    assert "query_key_value" in done.error.message
