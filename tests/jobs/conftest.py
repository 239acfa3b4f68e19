"""Helpers for the job-queue tests: a live API server without a worker of its own, so each test
decides which workers run (in this process, or `tunehouse worker` processes)."""

from __future__ import annotations

import json
import time

import pytest

from tests.api.conftest import LiveServer, chat_line, write_jsonl
from tests.conftest import TINY_MODEL

LINES = [chat_line(f"Count to {i}", " ".join(str(k) for k in range(i % 12 + 10))) for i in range(20)]


@pytest.fixture
def api(settings):
    """An API server on `settings` that runs no worker."""
    settings.local_worker = False
    with LiveServer(settings) as live:
        yield live


def create_job(client, tmp_path, *, lines=LINES, model=TINY_MODEL, **hyper):
    f = client.files.create(file=write_jsonl(tmp_path / "t.jsonl", lines).open("rb"), purpose="fine-tune")
    hp = {"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 2, **hyper}
    return client.fine_tuning.jobs.create(model=model, training_file=f.id, seed=3, hyperparameters=hp)


def events(client, job_id) -> list:
    return list(reversed(client.fine_tuning.jobs.list_events(job_id, limit=10000).data))


def metric_steps(client, job_id) -> list[int]:
    return sorted(e.data["step"] for e in events(client, job_id) if e.type == "metrics")


def wait_until(cond, *, timeout: float, what: str, every: float = 0.3):
    deadline = time.time() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def dump(obj) -> str:
    return json.dumps(obj, default=str, indent=1)
