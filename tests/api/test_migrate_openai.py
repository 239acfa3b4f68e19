"""Model aliases (admin API, /v1/models, chat, new jobs, organizations) and `tunehouse migrate
openai` on a synthetic export folder built here, against one live server (the CLI works on its
home database; the server's worker trains what it queues)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from openai import NotFoundError
from typer.testing import CliRunner

from tests.api.conftest import LiveServer, chat_line, create_tenant_key, wait_for_job
from tests.conftest import TINY_MODEL
from tunehouse.cli.main import app

OLD_NAME = "ft:gpt-4o-mini-2024-07-18:acme:support:AbC123"


def cli(live: LiveServer, *args: str):
    """The CLI on the live server's home, with its settings (base models, database) in the environment."""
    s = live.settings
    env = {
        "TUNEHOUSE_BASE_MODELS": json.dumps({k: str(v) for k, v in s.base_models.items()}),
        "TUNEHOUSE_MODELS_DIR": str(s.models_dir) if s.models_dir else None,
        "TUNEHOUSE_DATABASE_URL": s.database_url,
        "TUNEHOUSE_ADMIN_KEY": None,
    }
    return CliRunner().invoke(app, [*args, "--home", str(s.home)], env=env, catch_exceptions=False)


def build_export(folder: Path) -> Path:
    """What scripts/export_from_openai.py writes: two files, a succeeded and a failed job, an eval."""
    (folder / "files").mkdir(parents=True)
    train = "\n".join(chat_line(f"What is {i} + {i}?", f"{2 * i}") for i in range(12)) + "\n"
    valid = "\n".join(chat_line(f"What is {i} + 1?", f"{i + 1}") for i in range(3)) + "\n"
    files = []
    for fid, name, text in (("file-train1", "train.jsonl", train), ("file-valid1", "valid.jsonl", valid)):
        (folder / "files" / f"{fid}.jsonl").write_text(text)
        files.append({"id": fid, "filename": name, "purpose": "fine-tune", "bytes": len(text.encode())})
    manifest = {
        "format": "openai-fine-tuning-export",
        "version": 1,
        "exported_at": 1765000000,
        "files": files,
    }
    hyper = {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 2.0}
    jobs = [
        {
            "id": "ftjob-openai1",
            "model": "gpt-4o-mini-2024-07-18",
            "fine_tuned_model": OLD_NAME,
            "status": "succeeded",
            "training_file": "file-train1",
            "validation_file": "file-valid1",
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
            "suffix": "support",
            "seed": 42,
            "metadata": {"team": "support"},
            "created_at": 1730000000,
        },
        {
            "id": "ftjob-openai2",
            "model": "gpt-4o-mini-2024-07-18",
            "fine_tuned_model": None,
            "status": "failed",
            "training_file": "file-train1",
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
        },
    ]
    jobs.append(  # continued the first job's model: waits for that model's replacement
        {
            "id": "ftjob-openai3",
            "model": OLD_NAME,
            "fine_tuned_model": OLD_NAME.replace("support:AbC123", "support-v2:DeF456"),
            "status": "succeeded",
            "training_file": "file-train1",
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
            "suffix": "support-v2",
        }
    )
    evals = [
        {
            "id": "eval_openai1",
            "name": "sums",
            "data_source_config": {
                "type": "custom",
                "schema": {
                    "type": "object",
                    "properties": {
                        "item": {
                            "type": "object",
                            "properties": {"q": {"type": "string"}, "a": {"type": "string"}},
                        },
                        "sample": {"type": "object"},
                    },
                    "required": ["item", "sample"],
                },
            },
            "testing_criteria": [
                {
                    "id": "exact-1234",
                    "type": "string_check",
                    "name": "exact",
                    "input": "{{sample.output_text}}",
                    "reference": "{{item.a}}",
                    "operation": "eq",
                }
            ],
            "metadata": {"suite": "math"},
        }
    ]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "jobs.json").write_text(json.dumps(jobs))
    (folder / "evals.json").write_text(json.dumps(evals))
    return folder


def run_export_script(live: LiveServer, folder: Path, *args: str):
    """scripts/export_from_openai.py with the official SDK pointed at this server; its folder as
    `tunehouse migrate openai` reads it."""
    import importlib.util
    import os
    from unittest import mock

    from tunehouse.cli.openai_import import read_export

    path = Path(__file__).parents[2] / "scripts" / "export_from_openai.py"
    spec = importlib.util.spec_from_file_location("export_from_openai", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    env = {"OPENAI_BASE_URL": f"{live.url}/v1", "OPENAI_API_KEY": live.settings.admin_key}
    with mock.patch.dict(os.environ, env):
        assert module.main([str(folder), *args]) == 0
    return read_export(folder)


def counts(client) -> tuple[int, int, int]:
    return (
        len(client.files.list().data),
        len(client.fine_tuning.jobs.list().data),
        len(client.evals.list().data),
    )


@pytest.fixture(scope="module")
def live(shared_server: LiveServer) -> LiveServer:
    shared_server.client().models.list()  # the admin key's organization ("default") exists from here
    return shared_server


# --- aliases ---------------------------------------------------------------------------------------


def test_alias_admin_api_models_chat_and_jobs(live: LiveServer):
    client, http = live.client(), live.http()
    made = http.post("/v1/organization/model_aliases", json={"name": "house-model", "target": TINY_MODEL})
    assert made.status_code == 200, made.text
    assert made.json() | {"created_at": 0} == {
        "object": "model_alias",
        "name": "house-model",
        "target": TINY_MODEL,
        "resolved_model": TINY_MODEL,
        "status": "ready",
        "created_at": 0,
    }
    listed = {m.id: m for m in client.models.list().data}
    assert "house-model" in listed and listed["house-model"].owned_by.startswith("org")
    assert client.models.retrieve("house-model").id == "house-model"

    # Chat and completions through the alias answer with the model itself (as OpenAI names the snapshot).
    answer = client.chat.completions.create(
        model="house-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert answer.model == TINY_MODEL
    assert client.completions.create(model="house-model", prompt="1 +", max_tokens=2).model == TINY_MODEL

    # A new job may start from an alias; it records the model it means.
    train = client.files.create(
        file=("t.jsonl", "\n".join(chat_line(f"q{i}", f"a{i}") for i in range(10)).encode()),
        purpose="fine-tune",
    )
    job = client.fine_tuning.jobs.create(model="house-model", training_file=train.id)
    assert job.model == TINY_MODEL
    client.fine_tuning.jobs.cancel(job.id)

    # Evals: a model grader's alias is stored as its model; a run's data_source.model too.
    ev = client.evals.create(
        name="alias-eval",
        data_source_config={
            "type": "custom",
            "item_schema": {"type": "object", "properties": {"q": {"type": "string"}}},
            "include_sample_schema": True,
        },
        testing_criteria=[
            {
                "type": "score_model",
                "name": "judge",
                "model": "house-model",
                "input": [{"role": "user", "content": "{{item.q}} {{sample.output_text}}"}],
                "range": [0, 1],
            }
        ],
    )
    assert ev.testing_criteria[0].model == TINY_MODEL
    run = client.evals.runs.create(
        ev.id,
        data_source={
            "type": "completions",
            "model": "house-model",
            "input_messages": {"type": "template", "template": [{"role": "user", "content": "{{item.q}}"}]},
            "sampling_params": {"max_completion_tokens": 2},
            "source": {"type": "file_content", "content": [{"item": {"q": "hi"}}]},
        },
    )
    assert run.data_source.model == TINY_MODEL and run.model == TINY_MODEL
    client.evals.runs.cancel(run.id, eval_id=ev.id)

    # Refusals: shadowing a real model, an unknown target, a duplicate, a chain; DELETE /v1/models.
    def refused(body, status, code):
        r = http.post("/v1/organization/model_aliases", json=body)
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == code, r.text

    refused({"name": TINY_MODEL, "target": TINY_MODEL}, 400, "alias_shadows_model")
    refused({"name": "x", "target": "no-such-model"}, 404, "model_not_found")
    refused({"name": "house-model", "target": TINY_MODEL}, 400, "alias_exists")
    refused({"name": "chain", "target": "house-model"}, 400, "alias_chain")
    assert (
        http.post("/v1/organization/model_aliases", json={"name": "a b", "target": TINY_MODEL}).status_code
        == 400
    )
    assert http.delete("/v1/models/house-model").json()["error"]["code"] == "model_not_deletable"

    # Another organization sees nothing of it; a project key may not manage aliases.
    other_key, _ = create_tenant_key(live.settings, org="other-org")
    other = live.client(other_key)
    assert "house-model" not in {m.id for m in other.models.list().data}
    with pytest.raises(NotFoundError):
        other.chat.completions.create(model="house-model", messages=[{"role": "user", "content": "hi"}])
    project_key, _ = create_tenant_key(live.settings, org="default", project="p1")
    assert live.http(project_key).get("/v1/organization/model_aliases").status_code == 403

    # The CLI sees and removes the same alias.
    out = cli(live, "aliases", "list", "--org", "default")
    assert out.exit_code == 0 and "house-model" in out.output
    assert cli(live, "aliases", "add", "house-model", TINY_MODEL, "--org", "default").exit_code == 1
    assert cli(live, "aliases", "remove", "house-model", "--org", "default").exit_code == 0
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="house-model", messages=[{"role": "user", "content": "hi"}])


# --- migrate openai -------------------------------------------------------------------------------


def test_migrate_dry_run_run_and_run_again(live: LiveServer, tmp_path: Path):
    client = live.client()
    export = build_export(tmp_path / "export")
    before = counts(client)
    args = ("migrate", "openai", str(export), "--base", TINY_MODEL, "--org", "default")

    dry = cli(live, *args, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "Dry run: nothing was changed." in dry.output and "billable training tokens" in dry.output
    assert "ftjob-openai3" in dry.output and "later" in dry.output  # waits for its parent's replacement
    assert "To create: 2 file(s), 1 eval(s), 1 job(s), 1 alias(es)." in dry.output
    assert counts(client) == before
    assert OLD_NAME not in {m.id for m in client.models.list().data}

    run = cli(live, *args)
    assert run.exit_code == 0, run.output
    assert counts(client) == (before[0] + 2, before[1] + 1, before[2] + 1)
    (job,) = client.fine_tuning.jobs.list(metadata={"team": "support"}).data
    assert (job.model, job.seed, job.metadata, job.user_provided_suffix) == (
        TINY_MODEL,
        42,
        {"team": "support"},
        "support",
    )
    hp = job.method.supervised.hyperparameters
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (1, 4, 2.0)
    names = {f.id: f.filename for f in client.files.list().data}
    assert names[job.training_file] == "train.jsonl" and names[job.validation_file] == "valid.jsonl"
    (ev,) = [e for e in client.evals.list().data if e.name == "sums"]
    assert (ev.name, ev.metadata, ev.testing_criteria[0].name) == ("sums", {"suite": "math"}, "exact")
    # The old name is listed (its job has not finished: it answers 404 until then, saying why).
    assert OLD_NAME in {m.id for m in client.models.list().data}
    try:
        client.chat.completions.create(
            model=OLD_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    except NotFoundError as e:
        assert "answers once the job has succeeded" in str(e) and job.id in str(e)

    again = cli(live, *args)
    assert again.exit_code == 0, again.output
    assert "Nothing to do" in again.output
    assert counts(client) == (before[0] + 2, before[1] + 1, before[2] + 1)

    done = wait_for_job(client, job.id, timeout=120)
    assert done.status == "succeeded", done.error
    answer = client.chat.completions.create(
        model=OLD_NAME, messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=3
    )
    assert answer.model == done.fine_tuned_model
    # The job that continued the first one's model can go now: it starts from the replacement.
    later = cli(live, *args, "--dry-run")
    assert later.exit_code == 0, later.output
    assert "To create: 0 file(s), 0 eval(s), 1 job(s), 1 alias(es)." in later.output
    assert f"on {OLD_NAME}" in later.output
    listed = cli(live, "aliases", "list", "--org", "default", "--json")
    alias = next(a for a in json.loads(listed.output) if a["name"] == OLD_NAME)
    assert (alias["target"], alias["status"], alias["resolved_model"]) == (
        job.id,
        "ready",
        done.fine_tuned_model,
    )

    # The export script against this server (it speaks OpenAI's API): what it writes, migrate reads.
    exported = run_export_script(live, tmp_path / "re-export", "--job", job.id)
    assert [j["id"] for j in exported.jobs] == [job.id]
    assert exported.jobs[0]["suffix"] == "support" and exported.jobs[0]["seed"] == 42
    assert exported.jobs[0]["method"]["supervised"]["hyperparameters"]["n_epochs"] == 1
    assert {f["filename"] for f in exported.files} == {"train.jsonl", "valid.jsonl"}
    assert "sums" in {e["name"] for e in exported.evals}

    # Its model deleted, the old name answers 404 model_not_found naming what is gone.
    client.models.delete(done.fine_tuned_model)
    with pytest.raises(NotFoundError) as e:
        client.chat.completions.create(model=OLD_NAME, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found" and "no longer exists" in e.value.body["message"]
    assert OLD_NAME not in {m.id for m in client.models.list().data}


def _broken(tmp_path: Path, name: str, change) -> Path:
    folder = build_export(tmp_path / name)
    change(folder)
    return folder


def _edit(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


BAD_EXPORTS = {
    "no jobs.json": (lambda f: (f / "jobs.json").unlink(), "jobs.json: missing"),
    "malformed manifest": (lambda f: (f / "manifest.json").write_text("{"), "manifest.json: malformed JSON"),
    "unknown job field": (
        lambda f: _edit(f / "jobs.json", lambda d: d[0].update(color="red")),
        "jobs.json[0]: unknown field 'color'",
    ),
    "wrong types": (
        lambda f: _edit(f / "manifest.json", lambda d: d["files"][0].update(bytes="many")),
        "manifest.json files[0]: 'bytes' must be int, got str",
    ),
    "truncated file": (
        lambda f: (f / "files" / "file-train1.jsonl").write_text("{}\n"),
        "files/file-train1.jsonl has 3 bytes",
    ),
    "unknown method": (
        lambda f: _edit(f / "jobs.json", lambda d: d[0].update(method={"type": "ppo", "ppo": {}})),
        "method 'ppo' is not available here",
    ),
    "unknown hyperparameter": (
        lambda f: _edit(
            f / "jobs.json", lambda d: d[0]["method"]["supervised"]["hyperparameters"].update(warmup=3)
        ),
        "method.supervised.hyperparameters.warmup: unknown field",
    ),
    "file not exported": (
        lambda f: _edit(f / "jobs.json", lambda d: d[0].update(validation_file="file-nope")),
        "validation_file file-nope is not in manifest.json files",
    ),
    "logs eval": (
        lambda f: _edit(f / "evals.json", lambda d: d[0].update(data_source_config={"type": "logs"})),
        "evals.json[0] (eval_openai1)",
    ),
}


def test_migrate_bad_folders_import_nothing(live: LiveServer, tmp_path: Path):
    # A fresh organization: the same export went into "default" already (imports are per organization).
    key, _ = create_tenant_key(live.settings, org="bad-exports")
    client = live.client(key)
    before = counts(client)
    for name, (change, expected) in BAD_EXPORTS.items():
        folder = _broken(tmp_path, name.replace(" ", "_"), change)
        out = cli(live, "migrate", "openai", str(folder), "--base", TINY_MODEL, "--org", "bad-exports")
        assert out.exit_code == 1, (name, out.output)
        assert expected in out.output and "Nothing was imported." in out.output, (name, out.output)
        shutil.rmtree(folder)
    assert counts(client) == before
    out = cli(live, "migrate", "openai", str(tmp_path / "none"), "--org", "default")
    assert out.exit_code == 1 and "not a folder" in out.output
    unknown_base = cli(
        live, "migrate", "openai", str(build_export(tmp_path / "b")), "--base", "nope", "--dry-run"
    )
    assert unknown_base.exit_code == 1 and "--base nope: no such base model" in unknown_base.output
