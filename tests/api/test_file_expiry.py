"""`expires_after` on /v1/files: checked as OpenAI does (anchor `created_at`, 3600 to 2592000
seconds), and enforced: an expired file is a 404 at once, and the sweeper deletes its row and bytes.
Official SDK over real HTTP; "time passes" by moving the row's expiry into the past."""

from __future__ import annotations

import io

import openai
import pytest
from sqlalchemy import select, update

from tests.api.conftest import create_org_key
from tunehouse.store.engine import Database
from tunehouse.store.tables import File

LINE = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'


@pytest.fixture
def client(shared_server, request):
    return shared_server.client(create_org_key(shared_server.settings, f"expiry-{request.node.name}"[:120]))


@pytest.fixture
def db(shared_server):
    database = Database(shared_server.settings.db_url)
    yield database
    database.dispose()


def upload(client, **kw):
    return client.files.create(file=("train.jsonl", io.BytesIO(LINE)), purpose="fine-tune", **kw)


@pytest.mark.parametrize(
    ("expires_after", "param"),
    [
        ({"anchor": "created_at", "seconds": 60}, "expires_after.seconds"),
        ({"anchor": "created_at", "seconds": 2592001}, "expires_after.seconds"),
        ({"anchor": "last_active_at", "seconds": 3600}, "expires_after.anchor"),
        ({"seconds": 3600}, "expires_after.anchor"),
    ],
)
def test_expires_after_is_checked(client, expires_after, param):
    with pytest.raises(openai.BadRequestError) as e:
        upload(client, expires_after=expires_after)
    assert e.value.body["param"] == param, e.value.body
    assert client.files.list().data == []  # nothing kept


def test_an_unknown_form_field_is_refused(client):
    with pytest.raises(openai.BadRequestError) as e:
        upload(client, extra_body={"ttl": "3600"})
    assert e.value.body["param"] == "ttl" and e.value.body["code"] == "unknown_parameter"


def test_an_expired_file_is_gone_then_swept(shared_server, client, db):
    keep = upload(client)
    assert (
        keep.expires_at is None
        and "expires_at" not in client.files.with_raw_response.retrieve(keep.id).http_response.json()
    )  # no null where the schema has none
    f = upload(client, expires_after={"anchor": "created_at", "seconds": 3600})
    assert f.expires_at == f.created_at + 3600 == client.files.retrieve(f.id).expires_at
    with db.session() as s:
        path = s.scalar(select(File.path).where(File.id == f.id))
    blob = shared_server.settings.files_dir / path
    assert blob.exists()

    with db.transaction() as s:  # an hour passes
        s.execute(update(File).where(File.id == f.id).values(expires_at=File.created_at - 1))
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(f.id)
    assert [x.id for x in client.files.list().data] == [keep.id]

    # The sweeper (with the uploads', before each uploads request, at start and every 10 minutes)
    # deletes the row and the bytes; the file that does not expire stays.
    client.uploads.create(filename="x.jsonl", purpose="fine-tune", bytes=1, mime_type="text/jsonl")
    with db.session() as s:
        assert s.scalar(select(File).where(File.id == f.id)) is None
        assert s.scalar(select(File).where(File.id == keep.id)) is not None
    assert not blob.exists()
    assert client.files.content(keep.id).read() == LINE
