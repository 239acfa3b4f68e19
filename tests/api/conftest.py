"""A live server per test (random port, temporary home) driven by the official openai SDK."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx2 as httpx
import pytest
import uvicorn
from openai import DefaultHttpxClient, OpenAI

from tests.api.openapi_wire import check, schema_for
from tunehouse.api.app import create_app
from tunehouse.config import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.port = free_port()
        self.app = create_app(settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

    def client(self, api_key: str | None = None) -> OpenAI:
        return OpenAI(
            base_url=f"{self.url}/v1",
            api_key=api_key or self.settings.admin_key,
            max_retries=0,
            http_client=DefaultHttpxClient(event_hooks={"response": [check_against_spec]}),
        )

    def http(self, api_key: str | None = None) -> httpx.Client:
        key = api_key or self.settings.admin_key
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
            event_hooks={"response": [check_against_spec]},
        )


def check_against_spec(response: httpx.Response) -> None:
    """Every successful JSON answer the API tests receive must be what OpenAI's spec says its route
    answers (tests/api/openapi_wire.py): no null where the spec's field is optional but never null.
    Streams are left alone here (reading them would end their streaming); their chunks are checked
    in tests/api/test_wire_fields.py."""
    if response.status_code != 200 or not response.headers.get("content-type", "").startswith(
        "application/json"
    ):
        return
    schema = schema_for(response.request.method, response.request.url.path)
    if schema is not None:
        response.read()
        check(response.json(), schema)


@pytest.fixture
def server(settings: Settings):
    with LiveServer(settings) as live:
        yield live


@pytest.fixture(scope="module")
def shared_server(tiny_model_dir, tmp_path_factory):
    """One server for a whole test module, for tests that only read what a trained job left."""
    from tests.conftest import fresh_database, make_settings

    home = tmp_path_factory.mktemp("home")
    with fresh_database(home) as url, LiveServer(make_settings(home, tiny_model_dir, url)) as live:
        yield live


def create_org_key(settings: Settings, org: str) -> str:
    from tunehouse.store.engine import Database
    from tunehouse.tenancy.auth import create_key

    db = Database(settings.db_url)
    with db.transaction() as s:
        _, key = create_key(s, org_name=org)
    db.dispose()
    return key


def create_tenant_key(
    settings: Settings, *, org: str, project: str | None = None, role: str = "owner"
) -> tuple[str, str | None]:
    """A key of `org` (created if needed): an admin key, or a `role` key of `project` (created if
    needed). Returns the plain key and the project id (None for an admin key)."""
    from sqlalchemy import select

    from tunehouse.store.engine import Database
    from tunehouse.store.tables import Project
    from tunehouse.tenancy.auth import create_key
    from tunehouse.tenancy.projects import create_project, get_or_create_org

    db = Database(settings.db_url)
    with db.transaction() as s:
        o = get_or_create_org(s, org)
        project_id = None
        if project is not None:
            project_id = s.scalar(
                select(Project.id).where(Project.organization_id == o.id, Project.name == project)
            )
            project_id = project_id or create_project(s, organization_id=o.id, name=project, actor=None).id
        _, key = create_key(s, organization_id=o.id, project_id=project_id, role=role)
    db.dispose()
    return key, project_id


def arithmetic_lines(n: int = 12) -> list[str]:
    return [chat_line(f"What is {i} + {i}?", f"{2 * i}") for i in range(n)]


@pytest.fixture
def client(server: LiveServer) -> OpenAI:
    return server.client()


def chat_line(user: str, answer: str, system: str = "Answer briefly.") -> str:
    return json.dumps(
        {
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": user},
                {"role": "assistant", "content": answer},
            ]
        }
    )


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_for_job(
    client: OpenAI, job_id: str, *, timeout: float = 240, until=("succeeded", "failed", "cancelled")
):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in until:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout}s")


def runner_pids(job_id: str) -> list[int]:
    """The pids of the runner process(es) of a job (any kind: fine-tuning, eval run, batch)."""
    out = subprocess.run(
        ["pgrep", "-f", f"tunehouse.jobs.runner train {job_id}"], capture_output=True, text=True
    )
    return [int(p) for p in out.stdout.split()]


def _converter_installed() -> bool:
    from tunehouse.export import gguf_converter

    try:
        gguf_converter()
    except Exception:
        return False
    return True


# Skipped only outside CI where setup has not fetched the converter; under CI (setup.sh ran) a
# missing converter fails the tests instead of hiding them.
NEEDS_CONVERTER = pytest.mark.skipif(
    os.environ.get("CI") != "true" and not _converter_installed(),
    reason="llama.cpp's converter is not installed (scripts/setup.sh)",
)
