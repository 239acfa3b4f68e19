"""Hostile input: missing, wrong, revoked and read-only keys; a path-traversal filename; oversized
uploads and JSON bodies; injection attempts; and neither keys nor training data in any log."""

from __future__ import annotations

import io
import json
import logging
import uuid

import openai
import pytest

from tests.api.conftest import LiveServer, chat_line, create_tenant_key, wait_for_job, write_jsonl
from tests.conftest import TINY_MODEL


def _err(r) -> dict:
    return r.json()["error"]


def _jsonl(n: int = 10, marker: str = "") -> bytes:
    return (
        "\n".join(chat_line(f"What is {i} + {i}? {marker}", str(2 * i)) for i in range(n)) + "\n"
    ).encode()


def test_authentication_and_roles(server):
    import httpx2 as httpx

    with httpx.Client(base_url=server.url, timeout=60) as anonymous:
        r = anonymous.get("/v1/files")
        assert r.status_code == 401 and _err(r)["type"] == "invalid_request_error"
        assert "didn't provide an API key" in _err(r)["message"]
        r = anonymous.get("/v1/files", headers={"Authorization": "Basic abc"})
        assert r.status_code == 401
    wrong = "sk-th-" + uuid.uuid4().hex
    r = server.http(wrong).get("/v1/files")
    assert r.status_code == 401 and _err(r)["code"] == "invalid_api_key"
    assert wrong not in r.text and wrong[-4:] in _err(r)["message"]  # masked, as OpenAI does

    key, project = create_tenant_key(server.settings, org="default", project="sec", role="member")
    admin = server.http()
    keys = admin.get(f"/v1/organization/projects/{project}/api_keys").json()["data"]
    assert server.http(key).get("/v1/files").status_code == 200
    admin.delete(f"/v1/organization/projects/{project}/api_keys/{keys[0]['id']}")
    r = server.http(key).get("/v1/files")
    assert r.status_code == 401 and _err(r)["code"] == "invalid_api_key"

    reader, _ = create_tenant_key(server.settings, org="default", project="sec", role="reader")
    with pytest.raises(openai.PermissionDeniedError) as e:
        server.client(reader).files.create(file=("a.jsonl", io.BytesIO(_jsonl())), purpose="fine-tune")
    assert e.value.body["message"].startswith("You have insufficient permissions for this operation.")
    assert server.client(reader).files.list().data == []  # and nothing was stored

    # Another organization's key with this organization's id in OpenAI-Organization: refused.
    other, _ = create_tenant_key(server.settings, org="other")
    r = server.http(other).get("/v1/files", headers={"OpenAI-Organization": "org-somebody-else"})
    assert r.status_code == 401 and _err(r)["code"] == "mismatched_organization"


def test_path_traversal_filename_is_stored_safely(server, tmp_path):
    client = server.client()
    outside = tmp_path / f"escaped-{uuid.uuid4().hex}.jsonl"
    for name in (f"../../../../../../{outside}", "..\\..\\evil.jsonl", "/etc/passwd.jsonl"):
        f = client.files.create(file=(name, io.BytesIO(_jsonl())), purpose="fine-tune")
        assert "/" not in f.filename and "\\" not in f.filename and ".." not in f.filename
        assert client.files.content(f.id).content == _jsonl()
        # The bytes are under the files folder, named by id.
        stored = [p for p in (server.settings.home / "files").rglob(f.id)]
        assert len(stored) == 1 and stored[0].read_bytes() == _jsonl()
    assert not outside.exists()
    assert not (server.settings.home.parent / "evil.jsonl").exists()
    # The download's name is the harmless base name.
    r = server.http().get(f"/v1/files/{f.id}/content")
    assert (
        "passwd.jsonl" in r.headers["content-disposition"] and "/etc" not in r.headers["content-disposition"]
    )


@pytest.fixture
def small_upload_server(settings):
    with LiveServer(settings.model_copy(update={"max_upload_bytes": 2048})) as live:
        yield live


def test_oversized_upload_is_413(small_upload_server):
    client = small_upload_server.client()
    with pytest.raises(openai.APIStatusError) as e:
        client.files.create(file=("big.jsonl", io.BytesIO(_jsonl(200))), purpose="fine-tune")
    assert e.value.status_code == 413 and e.value.body["param"] == "file"
    assert client.files.list().data == []
    assert not [p for p in (small_upload_server.settings.home / "files").rglob("*") if p.is_file()]
    client.files.create(file=("small.jsonl", io.BytesIO(_jsonl(2))), purpose="fine-tune")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/fine_tuning/jobs",
        "/v1/chat/completions",
        "/v1/organization/projects",
        "/v1/fine_tuning/data_checks",
    ],
)
def test_extreme_json_bodies_are_refused(server, path):
    h = server.http()
    deep = "[" * 100_000 + "]" * 100_000
    for body in (deep, '{"model": ' + deep + "}", "[" * 100_000, '{"a": "' + '\\"[' * 1000 + '"}'):
        r = h.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, (path, r.status_code, r.text[:300])
        assert _err(r)["type"] == "invalid_request_error"
    big = json.dumps(
        {"model": TINY_MODEL, "messages": [{"role": "user", "content": "x" * (17 * 1024 * 1024)}]}
    )
    r = h.post(path, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and _err(r)["code"] == "request_too_large"
    assert h.get("/health").status_code == 200


INJECTIONS = [
    "' OR '1'='1",
    "1; DROP TABLE files; --",
    '"); DELETE FROM api_keys; --',
    "%' UNION SELECT key_hash FROM api_keys --",
]


def test_injection_attempts_are_plain_data(server):
    client, h = server.client(), server.http()
    f = client.files.create(file=("a.jsonl", io.BytesIO(_jsonl())), purpose="fine-tune")
    for evil in INJECTIONS:
        for path, params in (
            ("/v1/files", {"after": evil}),
            ("/v1/files", {"limit": evil}),
            ("/v1/files", {"purpose": evil}),
            ("/v1/files", {"order": evil}),
            ("/v1/fine_tuning/jobs", {"after": evil}),
            ("/v1/fine_tuning/jobs", {f"metadata[{evil}]": evil}),
            ("/v1/organization/audit_logs", {"event_types[]": evil, "after": evil}),
            (f"/v1/files/{evil}", {}),
            (f"/v1/models/{evil}", {}),
            (f"/v1/fine_tuning/jobs/{evil}/events", {}),
        ):
            r = h.get(path, params=params)
            assert r.status_code in (200, 400, 404), (path, params, r.status_code, r.text)
            assert "key_hash" not in r.text.replace(evil, "") and "sqlalchemy" not in r.text.lower()
            if r.status_code == 200:
                assert f.id not in r.text or path == "/v1/files" and params.get("after") is None
        # Stored and echoed as the string it is.
        job = client.fine_tuning.jobs.create(
            model=TINY_MODEL, training_file=f.id, metadata={"k": evil, evil[:60]: "v"}, suffix=None
        )
        assert job.metadata == {"k": evil, evil[:60]: "v"}
        client.fine_tuning.jobs.cancel(job.id)
    # Everything is still there.
    assert [x.id for x in client.files.list()] == [f.id]
    assert len(client.fine_tuning.jobs.list(limit=100).data) == len(INJECTIONS)
    assert h.get("/v1/organization/admin_api_keys").status_code == 200


def test_keys_and_training_data_never_logged(server, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    marker = f"CONFIDENTIAL-{uuid.uuid4().hex}"
    key, _ = create_tenant_key(server.settings, org="default", project="logs", role="member")
    client = server.client(key)
    train = client.files.create(
        file=write_jsonl(
            tmp_path / "t.jsonl", [line for line in _jsonl(10, marker).decode().splitlines()]
        ).open("rb"),
        purpose="fine-tune",
    )
    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL,
        training_file=train.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}},
    )
    job = wait_for_job(client, job.id)
    assert job.status == "succeeded", job.error
    client.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": marker}], max_tokens=2
    )
    # Errors too: a bad line quoted back to its owner must not be logged either.
    bad = client.files.create(
        file=("bad.jsonl", io.BytesIO(f'{{"oops": "{marker}"}}\n'.encode())), purpose="fine-tune"
    )
    client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=bad.id)
    server.http("sk-th-" + marker).get("/v1/files")  # a wrong key, logged nowhere either

    logs = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    for path in server.settings.jobs_dir.rglob("*.log"):
        logs += path.read_text(errors="replace")
    assert logs.strip(), "nothing was captured: the check would be empty"
    assert key not in logs and server.settings.admin_key not in logs
    assert marker not in logs
    assert "What is 3 + 3?" not in logs
