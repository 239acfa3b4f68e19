"""/v1/uploads through the official SDK over real HTTP: create, parts, complete (into a File
usable like any other), cancel, expiry and its sweeper, validation, tenancy."""

from __future__ import annotations

import hashlib

import openai
import pytest
from sqlalchemy import select, update

from tests.api.conftest import arithmetic_lines, create_org_key, create_tenant_key
from tests.conftest import TINY_MODEL
from tunehouse.store.engine import Database
from tunehouse.store.tables import File, Upload, UploadPart

JSONL = ("\n".join(arithmetic_lines(12)) + "\n").encode()


@pytest.fixture
def org_client(shared_server, request):
    """A client of a fresh organization of its own (each test sees only what it made)."""
    return shared_server.client(create_org_key(shared_server.settings, f"uploads-{request.node.name}"[:120]))


@pytest.fixture
def db(shared_server):
    database = Database(shared_server.settings.db_url)
    yield database
    database.dispose()


def part_folder(server, upload_id: str):
    found = [p for p in server.settings.files_dir.rglob(upload_id) if p.is_dir()]
    return found[0] if found else None


def create(client, data: bytes, *, filename="train.jsonl", purpose="fine-tune", mime_type="text/jsonl", **kw):
    return client.uploads.create(
        filename=filename, purpose=purpose, bytes=len(data), mime_type=mime_type, **kw
    )


def test_parts_complete_into_a_file_in_the_order_given(shared_server, org_client):
    chunks = [JSONL[:300], JSONL[300:700], JSONL[700:]]
    up = create(org_client, JSONL)
    assert up.id.startswith("upload_") and up.object == "upload"
    assert (up.status, up.bytes, up.filename, up.purpose, up.file) == (
        "pending",
        len(JSONL),
        "train.jsonl",
        "fine-tune",
        None,
    )
    assert up.expires_at == up.created_at + 3600
    # Sent out of order (as parallel parts may arrive), completed in the file's order.
    parts = {i: org_client.uploads.parts.create(up.id, data=chunks[i]) for i in (2, 0, 1)}
    for p in parts.values():
        assert p.id.startswith("part_") and p.object == "upload.part" and p.upload_id == up.id
        assert p.created_at >= up.created_at
    assert part_folder(shared_server, up.id) is not None

    done = org_client.uploads.complete(
        up.id, part_ids=[parts[0].id, parts[1].id, parts[2].id], md5=hashlib.md5(JSONL).hexdigest()
    )
    assert done.status == "completed" and done.id == up.id and done.expires_at == up.expires_at
    f = done.file
    assert f is not None and f.id.startswith("file-") and f.object == "file"
    assert (f.bytes, f.filename, f.purpose, f.status) == (len(JSONL), "train.jsonl", "fine-tune", "processed")
    # An ordinary File: listed, retrievable, its content the parts in the order given.
    assert org_client.files.retrieve(f.id) == f
    assert f.id in [x.id for x in org_client.files.list()]
    assert org_client.files.content(f.id).read() == JSONL
    # The parts' bytes are gone once they are in the file.
    assert part_folder(shared_server, up.id) is None
    # Usable for fine-tuning: the data check reads it and finds it clean.
    report = org_client.post(
        "/fine_tuning/data_checks", body={"training_file": f.id, "model": TINY_MODEL}, cast_to=object
    )
    assert report["error"] is None and report["n_examples"] == 12, report

    # A reversed order makes a different file (and the SDK's own chunked upload works too).
    up2 = create(org_client, JSONL, purpose="user_data", filename="notes.jsonl")
    a = org_client.uploads.parts.create(up2.id, data=JSONL[:500])
    b = org_client.uploads.parts.create(up2.id, data=JSONL[500:])
    unlisted = org_client.uploads.parts.create(up2.id, data=b"x" * 10)
    done2 = org_client.uploads.complete(up2.id, part_ids=[b.id, a.id])
    assert org_client.files.content(done2.file.id).read() == JSONL[500:] + JSONL[:500]
    assert unlisted.id  # not listed: discarded with the rest
    assert part_folder(shared_server, up2.id) is None


def test_sdk_upload_file_chunked(shared_server, org_client, tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_bytes(JSONL * 3)
    up = org_client.uploads.upload_file_chunked(
        file=path, mime_type="application/jsonl", purpose="fine-tune", part_size=1000
    )
    assert up.status == "completed" and up.file.bytes == path.stat().st_size
    assert org_client.files.content(up.file.id).read() == path.read_bytes()


def test_expires_after_sets_the_files_expiry(org_client):
    up = create(org_client, b"{}\n", purpose="batch", expires_after={"anchor": "created_at", "seconds": 7200})
    assert up.expires_at == up.created_at + 3600  # the upload's own hour is OpenAI's, whatever the file's
    part = org_client.uploads.parts.create(up.id, data=b"{}\n")
    f = org_client.uploads.complete(up.id, part_ids=[part.id]).file
    assert f.expires_at == f.created_at + 7200
    assert org_client.files.retrieve(f.id).expires_at == f.expires_at


def test_md5_and_byte_count_mismatches_are_refused(shared_server, org_client, db):
    up = create(org_client, JSONL)
    p1 = org_client.uploads.parts.create(up.id, data=JSONL[:100])
    with pytest.raises(openai.BadRequestError) as e:
        org_client.uploads.complete(up.id, part_ids=[p1.id])
    assert e.value.body["param"] == "part_ids" and f"bytes={len(JSONL):,}" in e.value.body["message"]
    p2 = org_client.uploads.parts.create(up.id, data=JSONL[100:])
    with pytest.raises(openai.BadRequestError) as e:
        org_client.uploads.complete(up.id, part_ids=[p1.id, p2.id], md5=hashlib.md5(b"other").hexdigest())
    assert e.value.body["param"] == "md5" and "does not match" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        org_client.uploads.complete(up.id, part_ids=[p1.id, p1.id, p2.id])
    assert e.value.body["param"] == "part_ids" and "more than once" in e.value.body["message"]
    other = create(org_client, b"{}\n")
    foreign = org_client.uploads.parts.create(other.id, data=b"{}\n")
    with pytest.raises(openai.BadRequestError) as e:
        org_client.uploads.complete(up.id, part_ids=[p1.id, foreign.id])
    assert e.value.body["param"] == "part_ids" and foreign.id in e.value.body["message"]
    # Nothing was made by the refusals; the upload still completes.
    with db.session() as s:
        assert s.scalar(select(File).where(File.filename == "train.jsonl", File.bytes == 100)) is None
    done = org_client.uploads.complete(
        up.id, part_ids=[p1.id, p2.id], md5=hashlib.md5(JSONL).hexdigest().upper()
    )
    assert done.status == "completed"


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"purpose": "nonsense"}, "purpose", "Supported values"),
        ({"bytes": 0}, "bytes", "between 1 and"),
        ({"bytes": -5}, "bytes", "between 1 and"),
        ({"bytes": 10**15}, "bytes", "between 1 and"),
        ({"mime_type": "image/png"}, "mime_type", "text/jsonl"),
        ({"purpose": "vision", "filename": "cat.png", "mime_type": "text/jsonl"}, "mime_type", "image/png"),
        ({"filename": "train.csv"}, "filename", ".jsonl"),
        ({"filename": "  "}, "filename", "empty"),
        ({"expires_after": {"anchor": "created_at", "seconds": 60}}, "expires_after.seconds", "3600"),
        ({"expires_after": {"anchor": "last_active_at", "seconds": 3600}}, "expires_after.anchor", ""),
    ],
)
def test_each_bad_create_field_is_named(org_client, fields, param, says):
    body = {
        "filename": "train.jsonl",
        "purpose": "fine-tune",
        "bytes": 10,
        "mime_type": "text/jsonl",
    } | fields
    with pytest.raises(openai.BadRequestError) as e:
        org_client.uploads.create(**body)
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body
    assert says in e.value.body["message"] and e.value.body["type"] == "invalid_request_error"


def test_missing_and_unknown_fields_are_refused(shared_server, org_client):
    with pytest.raises(openai.BadRequestError) as e:
        org_client.uploads.create(
            filename="t.jsonl",
            purpose="fine-tune",
            bytes=3,
            mime_type="text/jsonl",
            extra_body={"colour": "red"},
        )
    assert e.value.body["param"] == "colour"
    with pytest.raises(openai.BadRequestError) as e:
        org_client.post(
            "/uploads", body={"filename": "t.jsonl", "purpose": "fine-tune", "bytes": 3}, cast_to=object
        )
    assert e.value.body["param"] == "mime_type" and e.value.body["code"] == "missing_required_parameter"
    up = create(org_client, b"{}\n")
    with pytest.raises(openai.BadRequestError) as e:
        org_client.uploads.complete(up.id, part_ids=[], extra_body={"sha256": "x"})
    assert e.value.body["param"] == "sha256"
    # A part without its `data` field; a part with a field besides it; not multipart at all.
    with shared_server.http(org_client.api_key) as http:
        r = http.post(f"/v1/uploads/{up.id}/parts", files={"other": ("x.bin", b"x")})
        assert (r.status_code, r.json()["error"]["param"]) == (400, "data"), r.text
        assert "Missing required parameter: 'data'" in r.json()["error"]["message"]
        r = http.post(
            f"/v1/uploads/{up.id}/parts", files={"data": ("x.bin", b"{}\n")}, data={"colour": "red"}
        )
        assert (r.status_code, r.json()["error"]["param"]) == (400, "colour"), r.text
        r = http.post(f"/v1/uploads/{up.id}/parts", json={"data": "x"})
        assert (r.status_code, r.json()["error"]["param"]) == (400, "data"), r.text
        assert "multipart/form-data" in r.json()["error"]["message"]
        # A text field (no file name), as `curl -F data=...` sends it.
        r = http.post(f"/v1/uploads/{up.id}/parts", files={"data": (None, b"{}\n")})
        assert r.status_code == 200 and r.json()["object"] == "upload.part", r.text


def test_parts_over_the_declared_size_are_refused(shared_server, org_client):
    up = create(org_client, b"0123456789")
    org_client.uploads.parts.create(up.id, data=b"0123456789")
    org_client.uploads.parts.create(up.id, data=b"0123456789")  # sent again: one part's worth of slack
    with pytest.raises(openai.BadRequestError) as e:
        org_client.uploads.parts.create(up.id, data=b"0")
    assert e.value.body["param"] == "data" and "does not fit" in e.value.body["message"]
    assert len(list(part_folder(shared_server, up.id).iterdir())) == 2  # nothing of the refused part left


def test_complete_and_cancel_end_an_upload(shared_server, org_client):
    up = create(org_client, b"{}\n")
    part = org_client.uploads.parts.create(up.id, data=b"{}\n")
    org_client.uploads.complete(up.id, part_ids=[part.id])
    for call in (
        lambda: org_client.uploads.complete(up.id, part_ids=[part.id]),
        lambda: org_client.uploads.parts.create(up.id, data=b"{}\n"),
        lambda: org_client.uploads.cancel(up.id),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert "it is completed" in e.value.body["message"] and e.value.body["param"] == "upload_id"

    up = create(org_client, b"{}\n")
    part = org_client.uploads.parts.create(up.id, data=b"{}\n")
    assert part_folder(shared_server, up.id) is not None
    cancelled = org_client.uploads.cancel(up.id)
    assert (cancelled.id, cancelled.status, cancelled.file) == (up.id, "cancelled", None)
    assert part_folder(shared_server, up.id) is None, "cancelling deletes the parts' bytes"
    for call in (
        lambda: org_client.uploads.parts.create(up.id, data=b"{}\n"),
        lambda: org_client.uploads.complete(up.id, part_ids=[part.id]),
        lambda: org_client.uploads.cancel(up.id),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert "it is cancelled" in e.value.body["message"]


def test_an_expired_upload_takes_nothing_and_is_swept(shared_server, org_client, db):
    up = create(org_client, JSONL)
    part = org_client.uploads.parts.create(up.id, data=JSONL[:100])
    folder = part_folder(shared_server, up.id)
    assert folder is not None and any(folder.iterdir())
    with db.transaction() as s:  # an hour passes
        s.execute(update(Upload).where(Upload.id == up.id).values(expires_at=Upload.created_at - 1))
    with pytest.raises(openai.BadRequestError) as e:
        org_client.uploads.parts.create(up.id, data=JSONL[100:])
    assert "it is expired" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        org_client.uploads.complete(up.id, part_ids=[part.id])
    assert "it is expired" in e.value.body["message"]
    # The sweeper (run before each uploads request) marked it expired and removed its parts.
    assert not folder.exists()
    with db.session() as s:
        assert s.scalar(select(Upload.status).where(Upload.id == up.id)) == "expired"
        assert s.scalars(select(UploadPart).where(UploadPart.upload_id == up.id)).all() == []


def test_other_organizations_and_reader_keys(shared_server, org_client):
    up = create(org_client, b"{}\n")
    part = org_client.uploads.parts.create(up.id, data=b"{}\n")
    stranger = shared_server.client(create_org_key(shared_server.settings, "uploads-stranger"))
    for call in (
        lambda: stranger.uploads.parts.create(up.id, data=b"{}\n"),
        lambda: stranger.uploads.complete(up.id, part_ids=[part.id]),
        lambda: stranger.uploads.cancel(up.id),
    ):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.body["message"] == f"No such Upload object: {up.id}"
    # A part of another organization's upload cannot be completed into one's own file either.
    mine = create(stranger, b"{}\n")
    with pytest.raises(openai.BadRequestError):
        stranger.uploads.complete(mine.id, part_ids=[part.id])

    key, _ = create_tenant_key(shared_server.settings, org="uploads-readers", project="p", role="reader")
    reader = shared_server.client(key)
    with pytest.raises(openai.PermissionDeniedError) as e:
        create(reader, b"{}\n")
    assert e.value.body["code"] == "insufficient_permissions"
    # The organization's other project sees nothing of this project's upload.
    writer_key, _ = create_tenant_key(shared_server.settings, org="uploads-readers", project="p")
    other_key, _ = create_tenant_key(shared_server.settings, org="uploads-readers", project="q")
    theirs = create(shared_server.client(writer_key), b"{}\n")
    with pytest.raises(openai.NotFoundError):
        shared_server.client(other_key).uploads.cancel(theirs.id)
    with pytest.raises(openai.PermissionDeniedError):
        reader.uploads.cancel(theirs.id)
    assert shared_server.client(writer_key).uploads.cancel(theirs.id).status == "cancelled"


def test_storage_quota_applies_to_uploads(shared_server, db):
    from tunehouse.store.tables import Organization
    from tunehouse.usage.quotas import set_overrides

    client = shared_server.client(create_org_key(shared_server.settings, "uploads-quota"))
    with db.transaction() as s:
        org = s.scalar(select(Organization).where(Organization.name == "uploads-quota"))
        set_overrides(s, org.id, {"max_storage_bytes": 10})
    with pytest.raises(openai.RateLimitError) as e:
        create(client, b"x" * 11, purpose="user_data", filename="a.txt", mime_type="text/plain")
    assert e.value.body["code"] == "quota_exceeded"
    up = create(client, b"x" * 8, purpose="user_data", filename="a.txt", mime_type="text/plain")
    part = client.uploads.parts.create(up.id, data=b"x" * 8)
    client.files.create(file=("b.txt", b"yyy"), purpose="user_data")  # 3 of the 10 bytes go meanwhile
    with pytest.raises(openai.RateLimitError):
        client.uploads.complete(up.id, part_ids=[part.id])
    assert [f.filename for f in client.files.list()] == ["b.txt"]


def test_deleting_an_organization_deletes_its_uploads(shared_server, db):
    from tunehouse.store.tables import Organization
    from tunehouse.tenancy.deletion import Stores, delete_organization

    client = shared_server.client(create_org_key(shared_server.settings, "uploads-doomed"))
    up = create(client, JSONL)
    client.uploads.parts.create(up.id, data=JSONL[:100])
    done = create(client, b"{}\n")
    client.uploads.complete(done.id, part_ids=[client.uploads.parts.create(done.id, data=b"{}\n").id])
    folder = part_folder(shared_server, up.id)
    assert folder is not None
    with db.session() as s:
        org_id = s.scalar(select(Organization.id).where(Organization.name == "uploads-doomed"))
    out = delete_organization(
        db, Stores.of(shared_server.app.state.tunehouse), organization_id=org_id, actor=None
    )
    assert out.uploads == 2
    assert not folder.exists()
    with db.session() as s:
        assert s.scalars(select(Upload).where(Upload.organization_id == org_id)).all() == []
        assert s.scalars(select(UploadPart).where(UploadPart.upload_id.in_([up.id, done.id]))).all() == []


def test_deleting_a_project_deletes_its_uploads_only(shared_server, db):
    key, pid = create_tenant_key(shared_server.settings, org="default", project="uploads-doomed")
    keep, _ = create_tenant_key(shared_server.settings, org="default", project="uploads-kept")
    doomed, kept = create(shared_server.client(key), JSONL), create(shared_server.client(keep), JSONL)
    shared_server.client(key).uploads.parts.create(doomed.id, data=JSONL[:10])
    shared_server.client(keep).uploads.parts.create(kept.id, data=JSONL[:10])
    with shared_server.http() as admin:
        assert admin.delete(f"/v1/organization/projects/{pid}").json()["deleted"] is True
    assert part_folder(shared_server, doomed.id) is None
    assert part_folder(shared_server, kept.id) is not None
    with db.session() as s:
        assert s.scalar(select(Upload).where(Upload.id == doomed.id)) is None
        assert s.scalars(select(UploadPart).where(UploadPart.upload_id == doomed.id)).all() == []
    assert shared_server.client(keep).uploads.cancel(kept.id).status == "cancelled"
