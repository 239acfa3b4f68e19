"""A batch's life as a job: killed with -9 mid-way and resumed (no line lost, written or metered
twice), cancelled mid-way (cancelling, then cancelled with the lines done so far in its files),
expired (the rest are batch_expired errors), the batch.* webhooks, and deletion with its project."""

from __future__ import annotations

import json
import os
import signal

import openai
import pytest
from sqlalchemy import func, select, update

from tests.api.conftest import LiveServer, create_tenant_key, runner_pids
from tests.api.test_batches import CHAT, file_lines, line, upload, wait_batch
from tests.api.test_webhooks import Receiver
from tests.conftest import TINY_MODEL
from tests.jobs.conftest import wait_until
from tunehouse.store.engine import Database
from tunehouse.store.tables import Batch, BatchOutput, UsageRecord


def _lines(db: Database, batch_id: str) -> dict[int, str]:
    """input line -> output row id, as stored."""
    with db.session() as s:
        return dict(
            s.execute(select(BatchOutput.line, BatchOutput.id).where(BatchOutput.batch_id == batch_id)).all()
        )


def _long_batch(client, n: int, max_tokens: int = 64):
    # Greedy: the tiny random model never ends early, so lines finish in waves of the engine's
    # batch (64), and a batch of more lines than that is still going after the first wave.
    bodies = [
        {
            "model": TINY_MODEL,
            "messages": [{"role": "user", "content": f"Count from {i} to {i + 50}."}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        for i in range(n)
    ]
    f = upload(client, [line(f"r{i}", b) for i, b in enumerate(bodies)])
    return client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")


def _usage(db: Database, project_id: str) -> tuple[int, int, int]:
    with db.session() as s:
        r = s.execute(
            select(
                func.sum(UsageRecord.input_tokens),
                func.sum(UsageRecord.output_tokens),
                func.sum(UsageRecord.requests),
            ).where(UsageRecord.project_id == project_id, UsageRecord.kind == "batch")
        ).one()
    return tuple(int(x or 0) for x in r)


def test_a_batch_killed_mid_way_resumes_without_losing_or_repeating_lines(settings):
    n = 100
    with LiveServer(settings) as live:
        key, project_id = create_tenant_key(settings, org="acme", project="kill")
        client = live.client(key)
        batch = _long_batch(client, n)
        db = Database(settings.db_url)
        try:
            wait_until(
                lambda: 0 < len(_lines(db, batch.id)) < n, timeout=300, what="the first lines", every=0.05
            )
            pids = runner_pids(batch.id)
            assert pids
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            at_kill = _lines(db, batch.id)
            assert len(at_kill) < n, "the batch finished before it could be killed"
            live_counts = client.batches.retrieve(batch.id).request_counts
            assert live_counts.total == n and 0 < live_counts.completed < n

            done = wait_batch(client, batch.id, timeout=300)
            assert done.status == "completed", done.errors
            after = _lines(db, batch.id)
            assert sorted(after) == list(range(1, n + 1))  # none lost, none twice
            assert all(after[k] == v for k, v in at_kill.items())  # written ones kept as they were
            out = file_lines(client, done.output_file_id)
            assert [o["custom_id"] for o in out] == [f"r{i}" for i in range(n)]
            assert len({o["id"] for o in out}) == n
            assert done.request_counts.completed == n
            # Metered once per line: what the batch reports is what was billed.
            assert _usage(db, project_id) == (done.usage.input_tokens, done.usage.output_tokens, n)
        finally:
            db.dispose()


def test_cancel_mid_way_keeps_the_lines_done_and_each_end_sends_its_webhook(settings):
    settings.webhook_poll_seconds = 0.1
    receiver = Receiver()
    # Five waves of the engine's 64: on a fast machine two waves were done before the cancel,
    # noticed as the next wave's answers arrive, could land.
    n = 320
    with LiveServer(settings) as live:
        admin, _ = create_tenant_key(settings, org="acme")
        endpoint = live.http(admin).post("/v1/organization/webhooks", json={"url": receiver.url}).json()
        assert {"batch.completed", "batch.failed", "batch.cancelled", "batch.expired"} <= set(
            endpoint["events"]
        )
        client = live.client(admin)
        db = Database(settings.db_url)
        try:
            batch = _long_batch(client, n)
            wait_until(
                lambda: 0 < len(_lines(db, batch.id)) < n, timeout=300, what="the first lines", every=0.05
            )
            cancelling = client.batches.cancel(batch.id)
            assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
            done = wait_batch(client, batch.id, timeout=120)
            assert done.status == "cancelled" and done.cancelled_at
            wait_until(lambda: not runner_pids(batch.id), timeout=60, what="the runner to stop")
            written = _lines(db, batch.id)
            assert 0 < len(written) < n
            out = file_lines(client, done.output_file_id)
            assert sorted(o["id"] for o in out) == sorted(written.values())
            assert done.request_counts.completed == len(out) and done.request_counts.total == n
            with pytest.raises(openai.BadRequestError):  # a cancelled batch cannot be cancelled again
                client.batches.cancel(batch.id)

            small = _long_batch(client, 2, max_tokens=4)
            assert wait_batch(client, small.id).status == "completed"
            bad = upload(client, ["{oops"])
            failed = client.batches.create(input_file_id=bad.id, endpoint=CHAT, completion_window="24h")
            assert failed.status == "failed"

            receiver.wait_calls(3)
            got = {}
            for _, body in receiver.calls:
                event = json.loads(body)
                got[event["data"]["id"]] = event["type"]
            assert got == {
                batch.id: "batch.cancelled",
                small.id: "batch.completed",
                failed.id: "batch.failed",
            }
        finally:
            db.dispose()
            receiver.close()


def test_a_batch_past_its_window_expires_with_the_rest_as_errors(settings):
    n = 320  # several waves: the expiry must land while lines are left (see the cancel test)
    with LiveServer(settings) as live:
        client = live.client()
        db = Database(settings.db_url)
        try:
            batch = _long_batch(client, n)
            wait_until(
                lambda: 0 < len(_lines(db, batch.id)) < n, timeout=300, what="the first lines", every=0.05
            )
            with db.transaction() as s:  # its 24 hours are up
                s.execute(update(Batch).where(Batch.id == batch.id).values(expires_at=1))
            done = wait_batch(client, batch.id, timeout=120)
            assert done.status == "expired" and done.expired_at
            out, errors = file_lines(client, done.output_file_id), file_lines(client, done.error_file_id)
            assert len(out) + len(errors) == n and out and errors
            assert all(e["response"] is None and e["error"]["code"] == "batch_expired" for e in errors)
            assert done.request_counts.failed == len(errors)
        finally:
            db.dispose()


def test_deleting_the_project_deletes_its_batches(settings):
    with LiveServer(settings) as live:
        admin, _ = create_tenant_key(settings, org="acme")
        key, project_id = create_tenant_key(settings, org="acme", project="gone")
        client = live.client(key)
        batch = _long_batch(client, 2, max_tokens=4)
        done = wait_batch(client, batch.id)
        assert done.status == "completed"
        plans = list(settings.files_dir.rglob(f"{batch.id}*"))
        assert plans  # the batch's plan, in its organization's files
        output = (
            settings.files_dir
            / "/".join(plans[0].relative_to(settings.files_dir).parts[:-1])
            / done.output_file_id
        )
        assert output.exists()
        r = live.http(admin).delete(f"/v1/organization/projects/{project_id}")
        assert r.status_code == 200, r.text
        with Database(settings.db_url).session() as s:
            assert s.scalar(select(func.count()).select_from(Batch).where(Batch.id == batch.id)) == 0
            assert (
                s.scalar(
                    select(func.count()).select_from(BatchOutput).where(BatchOutput.batch_id == batch.id)
                )
                == 0
            )
        assert not list(settings.files_dir.rglob(f"{batch.id}*")) and not output.exists()
