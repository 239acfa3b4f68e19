"""Webhooks for fine_tuning.job.{succeeded,failed,cancelled}: OpenAI's payload, signed the Standard
Webhooks way (verified here by the official SDK's `webhooks.unwrap`), sent from a durable outbox
with retries and exponential backoff, to a real HTTP receiver."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from openai import OpenAI
from typer.testing import CliRunner

from tests.api.conftest import LiveServer, arithmetic_lines, create_org_key, wait_for_job, write_jsonl
from tests.conftest import TINY_MODEL
from tunehouse.cli.main import app as cli_app


class Receiver:
    """A local HTTP endpoint that answers `statuses` in turn (then 200) and records every call."""

    def __init__(self, statuses=()):
        self.statuses = list(statuses)
        self.calls: list[tuple[dict, bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hooks"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def wait_calls(self, n: int, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while len(self.calls) < n:
            assert time.time() < deadline, f"{len(self.calls)} of {n} webhook calls arrived"
            time.sleep(0.05)

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def fast_retries(settings):
    settings.webhook_retry_base_seconds = 0.2
    settings.webhook_poll_seconds = 0.1
    settings.webhook_max_attempts = 3
    return settings


def _unwrap(headers: dict, body: bytes, secret: str):
    return OpenAI(api_key="unused").webhooks.unwrap(body, headers, secret=secret)


def _deliveries(live, key):
    return live.http(key).get("/v1/organization/webhook_deliveries").json()["data"]


def _wait_delivery(live, key, status, timeout=60):
    deadline = time.time() + timeout
    while True:
        data = _deliveries(live, key)
        if data and data[0]["status"] == status:
            return data[0]
        assert time.time() < deadline, f"delivery still {data[0]['status'] if data else 'absent'}"
        time.sleep(0.1)


def test_cancelled_job_webhook_is_signed_and_retried_until_delivered(fast_retries, tmp_path):
    fast_retries.local_worker = False  # the job stays put until cancelled
    receiver = Receiver(statuses=[500, 503])
    with LiveServer(fast_retries) as live:
        key, other_key = create_org_key(fast_retries, "acme"), create_org_key(fast_retries, "other")
        r = live.http(key).post(
            "/v1/organization/webhooks", json={"url": receiver.url, "events": ["fine_tuning.job.cancelled"]}
        )
        assert r.status_code == 200, r.text
        endpoint = r.json()
        assert endpoint["secret"].startswith("whsec_")
        # Another organization neither sees the endpoint nor gets the event.
        assert live.http(other_key).get("/v1/organization/webhooks").json()["data"] == []
        assert live.http(key).get("/v1/organization/webhooks").json()["data"][0]["secret"] is None

        client = live.client(key)
        f = client.files.create(
            file=write_jsonl(tmp_path / "t.jsonl", arithmetic_lines()).open("rb"), purpose="fine-tune"
        )
        job = client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=f.id)
        client.fine_tuning.jobs.cancel(job.id)

        receiver.wait_calls(3)
        delivered = _wait_delivery(live, key, "delivered")
        assert (delivered["attempts"], delivered["last_status_code"]) == (3, 200)
        assert _deliveries(live, other_key) == []
    receiver.close()

    ids = {h["webhook-id"] for h, _ in receiver.calls}
    assert len(ids) == 1, "every retry carries the same webhook-id, so receivers can drop duplicates"
    headers, body = receiver.calls[-1]
    event = _unwrap(headers, body, endpoint["secret"])  # raises unless the signature is right
    assert event.type == "fine_tuning.job.cancelled" and event.data.id == job.id
    payload = json.loads(body)
    assert set(payload) == {"id", "object", "created_at", "type", "data"}
    assert payload["object"] == "event" and payload["id"].startswith("evt_") == headers[
        "webhook-id"
    ].startswith("evt_")
    with pytest.raises(Exception, match="signature"):
        _unwrap(headers, body.replace(job.id.encode(), b"ftjob-someoneelse"), endpoint["secret"])


def test_endpoint_that_keeps_failing_is_marked_failed_after_the_last_attempt(fast_retries, tmp_path):
    fast_retries.local_worker = False
    receiver = Receiver(statuses=[500] * 10)
    with LiveServer(fast_retries) as live:
        key = create_org_key(fast_retries, "acme")
        env = {"TUNEHOUSE_HOME": str(fast_retries.home), "TUNEHOUSE_DATABASE_URL": fast_retries.db_url}
        r = CliRunner().invoke(cli_app, ["webhooks", "add", "--org", "acme", "--url", receiver.url], env=env)
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["events"] == [
            "fine_tuning.job.succeeded",
            "fine_tuning.job.failed",
            "fine_tuning.job.cancelled",
            "eval.run.succeeded",
            "eval.run.failed",
            "eval.run.canceled",
            "batch.completed",
            "batch.failed",
            "batch.cancelled",
            "batch.expired",
        ]
        client = live.client(key)
        f = client.files.create(
            file=write_jsonl(tmp_path / "t.jsonl", arithmetic_lines()).open("rb"), purpose="fine-tune"
        )
        client.fine_tuning.jobs.cancel(
            client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=f.id).id
        )
        failed = _wait_delivery(live, key, "failed")
        assert (failed["attempts"], failed["last_error"]) == (3, "HTTP 500")
        time.sleep(1)  # and nothing more is sent
        assert len(receiver.calls) == 3

        listed = json.loads(
            CliRunner().invoke(cli_app, ["webhooks", "list", "--org", "acme"], env=env).stdout
        )
        assert [e["url"] for e in listed] == [receiver.url]
        r = CliRunner().invoke(cli_app, ["webhooks", "remove", listed[0]["id"], "--org", "acme"], env=env)
        assert r.exit_code == 0, r.output
        assert live.http(key).get("/v1/organization/webhooks").json()["data"] == []
    receiver.close()


def test_webhook_api_needs_an_owner_admin_key_and_a_valid_url(settings):
    from sqlalchemy import select

    from tunehouse.store.tables import Organization
    from tunehouse.tenancy.auth import create_key
    from tunehouse.tenancy.projects import create_project

    settings.local_worker = False
    with LiveServer(settings) as live:
        key = create_org_key(settings, "acme")
        with live.app.state.tunehouse.db.transaction() as s:
            org_id = s.scalar(select(Organization.id).where(Organization.name == "acme"))
            project = create_project(s, organization_id=org_id, name="web", actor=None)
            _, member = create_key(s, organization_id=org_id, project_id=project.id, role="owner")
        # Even a project's owner key manages only its project; endpoints are the organization's.
        r = live.http(member).get("/v1/organization/webhooks")
        assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_permissions"
        r = live.http(key).post("/v1/organization/webhooks", json={"url": "file:///etc/passwd"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "url"
        r = live.http(key).post("/v1/organization/webhooks", json={"url": "http://x", "events": ["job.done"]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "events"
        r = live.http(key).delete("/v1/organization/webhooks/whep_nope")
        assert r.status_code == 404


def test_failed_job_webhook(fast_retries, tmp_path):
    receiver = Receiver()
    with LiveServer(fast_retries) as live:
        key = create_org_key(fast_retries, "acme")
        endpoint = live.http(key).post("/v1/organization/webhooks", json={"url": receiver.url}).json()
        client = live.client(key)
        # Three examples: fewer than the minimum of 10, so validation fails the job.
        f = client.files.create(
            file=write_jsonl(tmp_path / "t.jsonl", arithmetic_lines(3)).open("rb"), purpose="fine-tune"
        )
        job = wait_for_job(client, client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=f.id).id)
        assert job.status == "failed"
        receiver.wait_calls(1)
    receiver.close()
    ((headers, body),) = receiver.calls
    event = _unwrap(headers, body, endpoint["secret"])
    assert event.type == "fine_tuning.job.failed" and event.data.id == job.id
