"""Metering and cost: training tokens (billable = tokens × epochs, once per job, less the free daily
allowance) and inference tokens per organization, project, key, model and day; OpenAI's usage and
costs API shape, the fine-tuning extension, and `tunehouse usage`."""

import json
import threading
import time

import pytest
from typer.testing import CliRunner

from tests.api.conftest import LiveServer, arithmetic_lines, create_org_key, wait_for_job, write_jsonl
from tests.api.test_webhooks import Receiver
from tests.conftest import TINY_MODEL
from tunehouse.cli.main import app as cli_app


def cli(settings, *args):
    from tunehouse.cli import usage

    env = {"TUNEHOUSE_HOME": str(settings.home), "TUNEHOUSE_DATABASE_URL": settings.db_url}
    # Rich reads COLUMNS once, when the module's console is made: in this process that may have
    # been by an earlier test, in a narrower terminal (a real CLI call is a process of its own).
    usage.console.width = 200
    result = CliRunner().invoke(cli_app, list(args), env=env)
    assert result.exit_code == 0, result.output
    return result.stdout


def _today_start():
    return int(time.time()) // 86400 * 86400


def _principal(live, key):
    from tunehouse.tenancy.auth import authenticate

    with live.app.state.tunehouse.db.transaction() as s:
        return authenticate(s, f"Bearer {key}", admin_key=None)


def test_training_is_metered_once_priced_after_the_allowance_and_announced(settings, tmp_path):
    settings.webhook_poll_seconds = 0.1
    receiver = Receiver()
    with LiveServer(settings) as live:
        key, other_key = create_org_key(settings, "acme"), create_org_key(settings, "other")
        http = live.http(key)
        secret = http.post("/v1/organization/webhooks", json={"url": receiver.url}).json()["secret"]
        client = live.client(key)
        f = client.files.create(
            file=write_jsonl(tmp_path / "t.jsonl", arithmetic_lines()).open("rb"), purpose="fine-tune"
        )
        check = http.post(
            "/v1/fine_tuning/data_checks", json={"training_file": f.id, "model": TINY_MODEL, "n_epochs": 2}
        ).json()
        tokens = check["estimate"]["billable_tokens"]
        free = tokens // 3
        cli(settings, "quotas", "set", "--org", "acme", "--free-training-tokens-per-day", str(free))

        job = client.fine_tuning.jobs.create(
            model=TINY_MODEL, training_file=f.id, hyperparameters={"n_epochs": 2}
        )
        assert job.cost is None
        job = wait_for_job(client, job.id)
        assert job.status == "succeeded", job.error
        # The estimate shown before training is what training then billed: tokens × epochs.
        assert job.trained_tokens == job.estimated_tokens == tokens
        assert job.estimated_cost == pytest.approx(tokens * 25 / 1e6)
        assert job.cost == pytest.approx((tokens - free) * 25 / 1e6)

        start = _today_start()
        ft = http.get("/v1/organization/usage/fine_tuning", params={"start_time": start}).json()
        assert ft["object"] == "page" and not ft["has_more"] and ft["next_page"] is None
        (bucket,) = ft["data"]
        assert (bucket["object"], bucket["start_time"], bucket["end_time"]) == (
            "bucket",
            start,
            start + 86400,
        )
        (result,) = bucket["results"]
        assert result["object"] == "organization.usage.fine_tuning.result"
        assert (result["trained_tokens"], result["num_jobs"]) == (tokens, 1)
        assert result["amount"] == {"value": pytest.approx(job.cost), "currency": "usd"}

        costs = http.get(
            "/v1/organization/costs", params={"start_time": start, "group_by": ["line_item"]}
        ).json()
        (line,) = costs["data"][0]["results"]
        assert line["object"] == "organization.costs.result"
        assert line["line_item"] == f"{TINY_MODEL}, training" and line["quantity"] == tokens
        assert line["amount"]["value"] == pytest.approx(job.cost)
        # Another organization sees none of it.
        assert (
            live.http(other_key)
            .get("/v1/organization/costs", params={"start_time": start})
            .json()["data"][0]["results"]
            == []
        )

        receiver.wait_calls(1)
    receiver.close()

    from openai import OpenAI

    ((headers, body),) = receiver.calls
    event = OpenAI(api_key="unused").webhooks.unwrap(body, headers, secret=secret)
    assert event.type == "fine_tuning.job.succeeded" and event.data.id == job.id

    out = json.loads(cli(settings, "usage", "--org", "acme", "--json"))["data"]
    assert [(r["kind"], r["model"], r["training_tokens"], r["requests"]) for r in out] == [
        ("training", TINY_MODEL, tokens, 1)
    ]
    assert out[0]["cost"] == pytest.approx(job.cost)
    table = cli(settings, "usage", "--days", "2")
    assert "acme" in table and TINY_MODEL in table and f"{tokens:,}" in table


def test_inference_metering_per_model_and_key_in_the_completions_usage_shape(settings):
    from tunehouse.usage.metering import record_inference

    settings.local_worker = False
    settings.prices = {"ft:*": {"input": 1.0, "output": 2.0}}
    with LiveServer(settings) as live:
        key_a, key_b = create_org_key(settings, "acme"), create_org_key(settings, "acme")
        other = create_org_key(settings, "other")
        state = live.app.state.tunehouse
        a, b = _principal(live, key_a), _principal(live, key_b)
        record_inference(state, a, model=TINY_MODEL, prompt_tokens=100, completion_tokens=20)
        record_inference(state, a, model=TINY_MODEL, prompt_tokens=50, completion_tokens=5)
        record_inference(state, b, model="ft:x:acme::abc", prompt_tokens=1000, completion_tokens=500)

        start = _today_start()
        http = live.http(key_a)
        total = http.get("/v1/organization/usage/completions", params={"start_time": start}).json()
        (r,) = total["data"][0]["results"]
        assert r["object"] == "organization.usage.completions.result"
        assert (r["input_tokens"], r["output_tokens"], r["num_model_requests"]) == (1150, 525, 3)
        assert r["model"] is None and r["api_key_id"] is None  # not grouped

        by_model = http.get(
            "/v1/organization/usage/completions",
            params={"start_time": start, "group_by": ["model", "api_key_id"]},
        ).json()["data"][0]["results"]
        rows = {(x["model"], x["api_key_id"]): (x["input_tokens"], x["output_tokens"]) for x in by_model}
        assert rows == {(TINY_MODEL, a.key_id): (150, 25), ("ft:x:acme::abc", b.key_id): (1000, 500)}
        only = http.get(
            "/v1/organization/usage/completions", params={"start_time": start, "models": TINY_MODEL}
        ).json()["data"][0]["results"]
        assert only[0]["input_tokens"] == 150

        # Default prices for the base model, the configured pattern for ft: models.
        cost = http.get("/v1/organization/costs", params={"start_time": start}).json()["data"][0]["results"]
        expected = (150 * 3.75 + 25 * 15) / 1e6 + (1000 * 1.0 + 500 * 2.0) / 1e6
        assert cost[0]["amount"]["value"] == pytest.approx(expected)
        assert (
            live.http(other)
            .get("/v1/organization/usage/completions", params={"start_time": start})
            .json()["data"][0]["results"]
            == []
        )


def test_usage_buckets_pages_and_errors(settings):
    settings.local_worker = False
    with LiveServer(settings) as live:
        http = live.http(create_org_key(settings, "acme"))
        start = _today_start() - 9 * 86400
        page = http.get("/v1/organization/usage/completions", params={"start_time": start, "limit": 4}).json()
        assert [b["start_time"] for b in page["data"]] == [start + i * 86400 for i in range(4)]
        assert page["has_more"] and page["next_page"]
        rest = http.get(
            "/v1/organization/usage/completions",
            params={"start_time": start, "limit": 31, "page": page["next_page"]},
        ).json()
        assert rest["data"][0]["start_time"] == start + 4 * 86400 and not rest["has_more"]
        assert len(page["data"]) + len(rest["data"]) == 10

        for params, param in [
            ({"start_time": start, "bucket_width": "1h"}, "bucket_width"),
            ({"start_time": start, "group_by": "user_id"}, "group_by"),
            ({"start_time": start, "limit": 32}, "limit"),
            ({"start_time": start, "end_time": start}, "end_time"),
            ({"start_time": start, "page": "x"}, "page"),
            ({}, "start_time"),
        ]:
            r = http.get("/v1/organization/usage/completions", params=params)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (params, r.text)


def test_concurrent_increments_are_never_lost(settings):
    from tunehouse.store.engine import Database, migrate
    from tunehouse.usage.records import INFERENCE, add_usage, aggregate, utc_day

    settings.ensure_dirs()
    migrate(settings.db_url)
    create_org_key(settings, "acme")
    db = Database(settings.db_url)
    with db.session() as s:
        from sqlalchemy import select

        from tunehouse.store.tables import Organization

        org = s.scalar(select(Organization.id))

    def bump():
        for _ in range(25):
            with db.transaction() as s:
                add_usage(
                    s, organization_id=org, project_id=None, key_id=None, model="m", kind=INFERENCE,
                    input_tokens=3, output_tokens=1, requests=1, cost=0.5,
                )  # fmt: skip

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with db.session() as s:
        (row,) = aggregate(
            s, organization_id=org, start=utc_day(), end=utc_day(time.time() + 86400), kinds=(INFERENCE,)
        )
    db.dispose()
    assert row.sums["requests"] == 100 and row.sums["input_tokens"] == 300 and row.sums["cost"] == 50


def test_chat_and_completions_requests_are_metered_as_the_responses_report(settings):
    """Through the real endpoints: the usage API adds up exactly what each response's `usage` said,
    streamed or not."""
    settings.local_worker = False
    with LiveServer(settings) as live:
        key = create_org_key(settings, "acme")
        client = live.client(key)
        messages = [{"role": "user", "content": "Say something."}]
        answer = client.chat.completions.create(model=TINY_MODEL, messages=messages, max_tokens=5, seed=1)
        stream = client.chat.completions.create(
            model=TINY_MODEL,
            messages=messages,
            max_tokens=7,
            seed=2,
            stream=True,
            stream_options={"include_usage": True},
        )
        streamed = [c.usage for c in stream if c.usage is not None][-1]
        legacy = client.completions.create(model=TINY_MODEL, prompt="Once upon a time", max_tokens=4, seed=3)
        reported = [answer.usage, streamed, legacy.usage]

        expected = (
            sum(u.prompt_tokens for u in reported),
            sum(u.completion_tokens for u in reported),
            len(reported),
        )
        deadline = time.time() + 30  # a stream is metered from a worker thread just after it ends
        while True:
            page = live.http(key).get(
                "/v1/organization/usage/completions", params={"start_time": _today_start()}
            )
            results = page.json()["data"][0]["results"]
            got = (
                (results[0]["input_tokens"], results[0]["output_tokens"], results[0]["num_model_requests"])
                if results
                else None
            )
            if got == expected or time.time() > deadline:
                break
            time.sleep(0.2)
        assert got == expected
