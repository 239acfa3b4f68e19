"""/v1/files through the official SDK: upload, list and pagination, retrieve, content, delete, errors."""

import openai
import pytest

from tests.api.conftest import arithmetic_lines, create_org_key, write_jsonl


@pytest.fixture
def train_path(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", arithmetic_lines())


def test_upload_retrieve_content_delete(server, client, train_path):
    f = client.files.create(file=train_path.open("rb"), purpose="fine-tune")
    assert f.id.startswith("file-") and f.object == "file"
    assert (f.bytes, f.filename, f.purpose, f.status) == (
        train_path.stat().st_size,
        "train.jsonl",
        "fine-tune",
        "processed",
    )
    assert client.files.retrieve(f.id) == f
    assert client.files.content(f.id).read() == train_path.read_bytes()
    stored = list((server.settings.files_dir).rglob(f.id))
    assert len(stored) == 1 and stored[0].read_bytes() == train_path.read_bytes()

    deleted = client.files.delete(f.id)
    assert (deleted.id, deleted.deleted) == (f.id, True)
    assert not stored[0].exists(), "deleting a file removes its bytes"
    with pytest.raises(openai.NotFoundError) as e:
        client.files.retrieve(f.id)
    assert e.value.body["message"] == f"No such File object: {f.id}" and e.value.body["param"] == "id"


def test_list_pagination_order_and_purpose(client, train_path):
    ids = [client.files.create(file=train_path.open("rb"), purpose="fine-tune").id for _ in range(5)]
    other = client.files.create(file=("notes.txt", b"hello"), purpose="user_data")

    page = client.files.list(limit=2, purpose="fine-tune")
    assert [f.id for f in page.data] == ids[::-1][:2] and page.has_more
    # The SDK's auto-pagination follows `after` cursors through every page.
    assert [f.id for f in client.files.list(limit=2, purpose="fine-tune")] == ids[::-1]
    assert [f.id for f in client.files.list(order="asc", purpose="fine-tune")] == ids
    assert [f.id for f in client.files.list(purpose="user_data")] == [other.id]
    after = client.files.list(after=ids[2], limit=10, order="asc", purpose="fine-tune")
    assert [f.id for f in after.data] == ids[3:] and not after.has_more


def test_upload_errors(server, client, tmp_path):
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("train.jsonl", b"{}\n"), purpose="nonsense")
    assert e.value.body["param"] == "purpose"
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("train.csv", b"a,b\n"), purpose="fine-tune")
    assert e.value.body["param"] == "file" and ".jsonl" in e.value.body["message"]
    # A path in the file name is metadata only: it never becomes a path on the server's disk.
    f = client.files.create(file=("../../etc/evil.jsonl", b"{}\n"), purpose="fine-tune")
    assert f.filename == "evil.jsonl"
    assert not (server.settings.home.parent / "etc").exists()
    with server.http() as http:
        r = http.post("/v1/files", data={"purpose": "fine-tune"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_upload_over_the_limit_is_413_and_leaves_nothing(tmp_path, settings):
    from tests.api.conftest import LiveServer

    settings.max_upload_bytes = 1000
    with LiveServer(settings) as live:
        client = live.client()
        with pytest.raises(openai.APIStatusError) as e:
            client.files.create(file=("big.jsonl", b"x" * 5000), purpose="fine-tune")
        assert e.value.status_code == 413 and e.value.body["code"] == "file_too_large"
        assert client.files.list().data == []
        assert [p for p in settings.files_dir.rglob("*") if p.is_file()] == []


def test_auth_and_isolation(server, client, train_path):
    f = client.files.create(file=train_path.open("rb"), purpose="fine-tune")
    with pytest.raises(openai.AuthenticationError) as e:
        server.client("sk-wrong").files.list()
    assert e.value.body["code"] == "invalid_api_key"
    with server.http() as http:
        r = http.get("/v1/files", headers={"Authorization": ""})
        assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}

    other = server.client(create_org_key(server.settings, "acme"))
    assert other.files.list().data == []
    for call in (
        lambda: other.files.retrieve(f.id),
        lambda: other.files.content(f.id),
        lambda: other.files.delete(f.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert client.files.retrieve(f.id).id == f.id  # still there for its owner


def test_unknown_route_and_method_use_the_error_shape(server):
    with server.http() as http:
        r = http.get("/v1/nothing-here")
        assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
        r = http.post("/v1/models")
        assert r.status_code == 405 and "error" in r.json()
