"""An eval run's life as a job: killed with -9 mid-way and resumed (no item lost, written or
metered twice), cancelled (the process stops, written items stay), deleted, failed; and the
eval.run.* webhooks each end sends."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from openai import OpenAI
from sqlalchemy import func, select

from tests.api.conftest import LiveServer, create_org_key, create_tenant_key, runner_pids
from tests.api.test_webhooks import Receiver
from tests.conftest import TINY_MODEL
from tests.evals.common import ITEM_SCHEMA, SYSTEM, make_eval, rows, wait_run
from tests.jobs.conftest import wait_until
from tunehouse.jobs import queue
from tunehouse.jobs.worker import child_env
from tunehouse.store.engine import Database
from tunehouse.store.tables import EvalOutputItem, UsageRecord


def _items(db: Database, run_id: str) -> dict[int, str]:
    """datasource_item_id -> output item id, as stored."""
    with db.session() as s:
        return dict(
            s.execute(
                select(EvalOutputItem.datasource_item_id, EvalOutputItem.id).where(
                    EvalOutputItem.run_id == run_id
                )
            ).all()
        )


def _generation_run(client: OpenAI, eval_id: str, n: int, max_tokens: int):
    content = [{"item": {"question": f"Count from {i} to {i + 50}.", "answer": "-"}} for i in range(n)]
    return client.evals.runs.create(
        eval_id,
        data_source={
            "type": "completions",
            "model": TINY_MODEL,
            "input_messages": {
                "type": "template",
                "template": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": "{{item.question}}"},
                ],
            },
            # Greedy: the tiny random model never ends early, so items finish in waves of the
            # engine's batch (64), and a run of more items than that is still going after the first.
            "sampling_params": {"temperature": 0, "max_completion_tokens": max_tokens},
            "source": {"type": "file_content", "content": content},
        },
    )


def _usage_rows(db: Database, project_id: str) -> tuple[int, int, int]:
    with db.session() as s:
        r = s.execute(
            select(
                func.sum(UsageRecord.input_tokens),
                func.sum(UsageRecord.output_tokens),
                func.sum(UsageRecord.requests),
            ).where(UsageRecord.project_id == project_id, UsageRecord.model == TINY_MODEL)
        ).one()
    return tuple(int(x or 0) for x in r)


def test_a_run_killed_mid_way_resumes_without_losing_or_duplicating_items(settings):
    n = 100
    with LiveServer(settings) as live:
        key, project_id = create_tenant_key(settings, org="acme", project="kill")
        client = live.client(key)
        ev = make_eval(
            client,
            criteria=[
                {
                    "type": "string_check",
                    "name": "asked",
                    "input": "{{item.question}}",
                    "reference": "Count",
                    "operation": "like",
                }
            ],
        )
        run = _generation_run(client, ev.id, n, max_tokens=64)
        db = Database(settings.db_url)
        try:
            # Some items written, not all: the process is killed as a machine's OOM killer would.
            before = wait_until(
                lambda: (lambda got: got if 0 < len(got) < n else None)(_items(db, run.id)),
                timeout=300,
                what="the first output items",
                every=0.05,
            )
            pids = runner_pids(run.id)
            assert pids
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            at_kill = _items(db, run.id)
            assert len(at_kill) < n, "the run finished before it could be killed"

            done = wait_run(client, ev.id, run.id, timeout=300)
            assert done.status == "completed", done.error
            after = _items(db, run.id)
            assert sorted(after) == list(range(n))  # none lost, none twice (unique per run and item)
            assert all(
                after[i] == item_id for i, item_id in at_kill.items()
            )  # written ones kept as they were
            assert len(before) <= len(at_kill)
            assert done.result_counts.total == n and done.result_counts.passed == n
            (usage,) = done.per_model_usage
            assert usage.invocation_count == n
            # Metered once per item: what the run reports is what was billed.
            assert _usage_rows(db, project_id) == (usage.prompt_tokens, usage.completion_tokens, n)
            listed = client.evals.runs.output_items.list(run.id, eval_id=ev.id, limit=100)
            assert sorted(it.datasource_item_id for it in listed) == list(range(n))
        finally:
            db.dispose()


def test_cancel_stops_the_run_and_keeps_its_items(settings):
    with LiveServer(settings) as live:
        key = create_org_key(settings, "acme")
        client = live.client(key)
        ev = make_eval(client)
        run = _generation_run(client, ev.id, 200, max_tokens=32)
        db = Database(settings.db_url)
        try:
            wait_until(lambda: _items(db, run.id), timeout=300, what="the first output items", every=0.05)
            canceled = client.evals.runs.cancel(run.id, eval_id=ev.id)
            assert canceled.status == "canceled"
            wait_until(lambda: not runner_pids(run.id), timeout=60, what="the run's process to stop")
            kept = _items(db, run.id)
            assert 0 < len(kept) < 200
            got = client.evals.runs.retrieve(run.id, eval_id=ev.id)
            assert got.status == "canceled" and got.result_counts.total == len(kept)
            listed = client.evals.runs.output_items.list(run.id, eval_id=ev.id, limit=100)
            assert sorted(it.datasource_item_id for it in listed) == sorted(kept)  # every page
            time.sleep(1.5)  # a worker poll and more: nothing is written after the stop
            assert _items(db, run.id) == kept
            # Cancelling again, or a finished run, is a 400 (never a 409: the SDK retries those).
            r = live.http(key).post(f"/v1/evals/{ev.id}/runs/{run.id}")
            assert r.status_code == 400 and r.json()["error"]["param"] == "run_id"

            # Deleting the run removes it and its items; deleting the eval removes its runs.
            second = client.evals.runs.create(
                ev.id, data_source={"type": "jsonl", "source": {"type": "file_content", "content": rows(3)}}
            )
            deleted = live.http(key).delete(f"/v1/evals/{ev.id}/runs/{run.id}").json()
            assert deleted == {"object": "eval.run.deleted", "deleted": True, "run_id": run.id}
            assert _items(db, run.id) == {}
            assert live.http(key).get(f"/v1/evals/{ev.id}/runs/{run.id}").status_code == 404
            client.evals.delete(ev.id)
            assert live.http(key).get(f"/v1/evals/{ev.id}/runs/{second.id}").status_code == 404
            assert not (settings.jobs_dir / run.id).exists()
        finally:
            db.dispose()


def _run_phase(settings, run_id: str, worker_id: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tunehouse.jobs.runner", "train", run_id, worker_id],
        env=child_env(settings),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _unwrap(headers: dict, body: bytes, secret: str):
    return OpenAI(api_key="unused").webhooks.unwrap(body, headers, secret=secret)


def test_each_end_of_a_run_sends_its_webhook(settings):
    settings.local_worker = False  # each run is executed here, by hand, in the order the test needs
    settings.webhook_poll_seconds = 0.1
    receiver = Receiver()
    with LiveServer(settings) as live:
        admin = create_org_key(settings, "acme")
        # No events named: every event, eval runs' included.
        endpoint = live.http(admin).post("/v1/organization/webhooks", json={"url": receiver.url}).json()
        assert {"eval.run.succeeded", "eval.run.failed", "eval.run.canceled"} <= set(endpoint["events"])
        client = live.client(admin)
        ev = make_eval(client)
        db = Database(settings.db_url)
        try:
            ok = client.evals.runs.create(
                ev.id, data_source={"type": "jsonl", "source": {"type": "file_content", "content": rows(3)}}
            )
            f = client.files.create(
                file=("items.jsonl", io.BytesIO("\n".join(json.dumps(r) for r in rows(3)).encode())),
                purpose="evals",
            )
            doomed = client.evals.runs.create(
                ev.id, data_source={"type": "jsonl", "source": {"type": "file_id", "id": f.id}}
            )
            client.files.delete(f.id)  # after the run was accepted, before it reads the file
            canceled = client.evals.runs.create(
                ev.id, data_source={"type": "jsonl", "source": {"type": "file_content", "content": rows(2)}}
            )
            client.evals.runs.cancel(canceled.id, eval_id=ev.id)
            for run in (ok, doomed):
                assert queue.claim(db, worker_id="w", phase="train", lease_seconds=300) == run.id
                out = _run_phase(settings, run.id, "w")
                assert out.returncode == 0, out.stderr[-3000:]
            assert (
                queue.claim(db, worker_id="w", phase="train", lease_seconds=300) is None
            )  # the cancelled one

            assert client.evals.runs.retrieve(ok.id, eval_id=ev.id).status == "completed"
            failed = client.evals.runs.retrieve(doomed.id, eval_id=ev.id)
            assert failed.status == "failed" and failed.error.code == "invalid_file"
            assert f.id in failed.error.message and "deleted" in failed.error.message

            receiver.wait_calls(3)
            events = {}
            for headers, body in receiver.calls:
                event = _unwrap(headers, body, endpoint["secret"])  # signed as every webhook
                events[event.data.id] = event.type
            assert events == {
                ok.id: "eval.run.succeeded",
                doomed.id: "eval.run.failed",
                canceled.id: "eval.run.canceled",
            }
        finally:
            db.dispose()
    receiver.close()


@pytest.mark.one_database
def test_reader_keys_read_but_cannot_create(settings):
    settings.local_worker = False
    with LiveServer(settings) as live:
        owner, _ = create_tenant_key(settings, org="acme", project="p")
        reader, _ = create_tenant_key(settings, org="acme", project="p", role="reader")
        ev = make_eval(live.client(owner))
        run = live.client(owner).evals.runs.create(
            ev.id, data_source={"type": "jsonl", "source": {"type": "file_content", "content": rows(2)}}
        )
        h = live.http(reader)
        assert h.get(f"/v1/evals/{ev.id}").status_code == 200
        assert h.get(f"/v1/evals/{ev.id}/runs/{run.id}").status_code == 200
        body = {
            "data_source_config": {"type": "custom", "item_schema": ITEM_SCHEMA},
            "testing_criteria": [],
        }
        for method, path, payload in [
            ("POST", "/v1/evals", body),
            ("POST", f"/v1/evals/{ev.id}", {"name": "x"}),
            ("DELETE", f"/v1/evals/{ev.id}", None),
            ("POST", f"/v1/evals/{ev.id}/runs", {"data_source": {}}),
            ("POST", f"/v1/evals/{ev.id}/runs/{run.id}", None),
            ("DELETE", f"/v1/evals/{ev.id}/runs/{run.id}", None),
        ]:
            r = h.request(method, path, json=payload)
            assert r.status_code == 403, (method, path, r.text)
