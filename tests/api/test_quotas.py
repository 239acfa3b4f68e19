"""Quotas per organization: concurrent jobs, training tokens per day, storage. A job or an upload
that would exceed one is refused with a 429 `quota_exceeded` naming it, and nothing is left."""

import json

import openai
import pytest
from typer.testing import CliRunner

from tests.api.conftest import LiveServer, arithmetic_lines, create_org_key, write_jsonl
from tests.conftest import TINY_MODEL
from tunehouse.cli.main import app as cli_app


def cli(settings, *args):
    env = {"TUNEHOUSE_HOME": str(settings.home), "TUNEHOUSE_DATABASE_URL": settings.db_url}
    result = CliRunner().invoke(cli_app, list(args), env=env)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture
def idle_server(settings):
    settings.local_worker = False  # jobs stay in validating_files: these tests are about admission
    with LiveServer(settings) as live:
        yield live


def _jobs_and_events(server, key):
    """Every job of the organization and the number of their events, read from the database."""
    from sqlalchemy import func, select

    from tunehouse.store.tables import Job, JobEvent

    db = server.app.state.tunehouse.db
    with db.session() as s:
        jobs = list(s.scalars(select(Job.id)))
        events = s.scalar(select(func.count()).select_from(JobEvent))
    return jobs, events


def _one_job_slot(server, tmp_path):
    """Organization acme with `max_concurrent_jobs` 1: its key, a client, an uploaded training file."""
    key = create_org_key(server.settings, "acme")
    client = server.client(key)
    cli(server.settings, "quotas", "set", "--org", "acme", "--max-concurrent-jobs", "1")
    f = client.files.create(
        file=write_jsonl(tmp_path / "t.jsonl", arithmetic_lines()).open("rb"), purpose="fine-tune"
    )
    return key, client, f


def test_concurrent_jobs_quota_refuses_the_next_job_and_creates_nothing(idle_server, tmp_path):
    key, client, f = _one_job_slot(idle_server, tmp_path)
    first = client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=f.id)
    jobs_before, events_before = _jobs_and_events(idle_server, key)

    with pytest.raises(openai.RateLimitError) as e:
        client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=f.id)
    err = e.value.body
    assert (err["type"], err["code"]) == ("insufficient_quota", "quota_exceeded")
    assert (
        "max_concurrent_jobs" in err["message"] and "1 job(s)" in err["message"] and "1 are" in err["message"]
    )
    assert e.value.response.headers["x-should-retry"] == "false", "a quota does not free itself in seconds"
    assert _jobs_and_events(idle_server, key) == (jobs_before, events_before), "nothing half-created"
    assert [j.id for j in client.fine_tuning.jobs.list()] == [first.id]

    # Another organization has its own count; a cancelled job frees the slot.
    other = idle_server.client(create_org_key(idle_server.settings, "other"))
    g = other.files.create(
        file=write_jsonl(tmp_path / "t.jsonl", arithmetic_lines()).open("rb"), purpose="fine-tune"
    )
    other.fine_tuning.jobs.create(model=TINY_MODEL, training_file=g.id)
    client.fine_tuning.jobs.cancel(first.id)
    assert client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=f.id).status == "validating_files"


def test_requests_racing_for_the_last_job_slot_admit_exactly_one(idle_server, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    _, client, f = _one_job_slot(idle_server, tmp_path)

    def create(_):
        try:
            return client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=f.id).id
        except openai.RateLimitError as e:
            return e.body["code"]

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(create, range(8)))
    created = [o for o in outcomes if o.startswith("ftjob-")]
    assert len(created) == 1 and outcomes.count("quota_exceeded") == 7, outcomes
    assert [j.id for j in client.fine_tuning.jobs.list()] == created


def test_training_tokens_per_day_are_estimated_at_creation_and_reserved(idle_server, tmp_path):
    key = create_org_key(idle_server.settings, "acme")
    client = idle_server.client(key)
    f = client.files.create(
        file=write_jsonl(tmp_path / "t.jsonl", arithmetic_lines()).open("rb"), purpose="fine-tune"
    )
    hyper = {"n_epochs": 2}
    # The data check's count is the reference the quota must agree with.
    check = idle_server.http(key).post(
        "/v1/fine_tuning/data_checks", json={"training_file": f.id, "model": TINY_MODEL, "n_epochs": 2}
    )
    tokens = check.json()["estimate"]["billable_tokens"]
    assert tokens > 0

    cli(
        idle_server.settings,
        "quotas",
        "set",
        "--org",
        "acme",
        "--max-training-tokens-per-day",
        str(tokens - 1),
    )
    with pytest.raises(openai.RateLimitError) as e:
        client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=f.id, hyperparameters=hyper)
    msg = e.value.body["message"]
    assert e.value.body["code"] == "quota_exceeded" and "max_training_tokens_per_day" in msg
    assert f"{tokens:,} billable" in msg and f"limit is {tokens - 1:,}" in msg and "0 are used" in msg
    assert _jobs_and_events(idle_server, key) == ([], 0)

    cli(
        idle_server.settings,
        "quotas",
        "set",
        "--org",
        "acme",
        "--max-training-tokens-per-day",
        str(tokens * 2 - 1),
    )
    job = client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=f.id, hyperparameters=hyper)
    assert job.estimated_tokens == tokens
    assert job.estimated_cost == pytest.approx(tokens * 25 / 1e6)
    # The first job's estimate is reserved until it finishes: a second one no longer fits today.
    with pytest.raises(openai.RateLimitError) as e:
        client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=f.id, hyperparameters=hyper)
    assert f"{tokens:,} by jobs not finished yet" in e.value.body["message"]

    shown = json.loads(cli(idle_server.settings, "quotas", "show", "--org", "acme", "--json"))[0]
    assert shown["quotas"]["max_training_tokens_per_day"] == tokens * 2 - 1
    assert shown["usage"]["training_tokens_reserved"] == tokens
    api = idle_server.http(key).get("/v1/organization/quotas").json()
    assert api["quotas"] == shown["quotas"] and api["usage"]["concurrent_jobs"] == 1

    # Back to the server default (unlimited): admitted.
    cli(idle_server.settings, "quotas", "set", "--org", "acme", "--max-training-tokens-per-day", "default")
    assert client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=f.id).status == "validating_files"


def test_storage_quota_refuses_an_upload_and_keeps_no_bytes(idle_server):
    key = create_org_key(idle_server.settings, "acme")
    client = idle_server.client(key)
    cli(idle_server.settings, "quotas", "set", "--org", "acme", "--max-storage-bytes", "1000")
    first = client.files.create(file=("a.jsonl", b"x" * 600), purpose="fine-tune")

    def stored():
        return sorted(p.name for p in idle_server.settings.files_dir.rglob("*") if p.is_file())

    before = stored()
    assert first.id in before
    with pytest.raises(openai.RateLimitError) as e:
        client.files.create(file=("b.jsonl", b"y" * 600), purpose="fine-tune")
    err = e.value.body
    assert err["code"] == "quota_exceeded" and "max_storage_bytes" in err["message"]
    assert "1,000 bytes" in err["message"] and "600 are stored" in err["message"]
    assert stored() == before, "nothing of the refused upload is left on disk"
    assert [f.id for f in client.files.list()] == [first.id]

    # What fits still goes in; another organization is not affected.
    client.files.create(file=("c.jsonl", b"z" * 400), purpose="fine-tune")
    other = idle_server.client(create_org_key(idle_server.settings, "other"))
    other.files.create(file=("d.jsonl", b"w" * 5000), purpose="fine-tune")
    # Deleting frees room.
    client.files.delete(first.id)
    client.files.create(file=("e.jsonl", b"v" * 500), purpose="fine-tune")


def test_quota_cli_rejects_bad_values(settings):
    from tunehouse.store.engine import migrate

    settings.ensure_dirs()
    migrate(settings.db_url)
    create_org_key(settings, "acme")
    env = {"TUNEHOUSE_HOME": str(settings.home), "TUNEHOUSE_DATABASE_URL": settings.db_url}
    r = CliRunner().invoke(
        cli_app, ["quotas", "set", "--org", "acme", "--max-concurrent-jobs", "lots"], env=env
    )
    assert r.exit_code != 0 and "unlimited" in r.output
    r = CliRunner().invoke(
        cli_app, ["quotas", "set", "--org", "nobody", "--max-concurrent-jobs", "2"], env=env
    )
    assert r.exit_code != 0 and "no organization" in r.output
    out = json.loads(cli(settings, "quotas", "set", "--org", "acme", "--max-storage-bytes", "unlimited"))
    assert out["max_storage_bytes"] == -1
