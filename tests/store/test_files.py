"""The files domain module: rows and bytes together, without a server (what the worker uses)."""

from __future__ import annotations

import pytest

from tunehouse import ids
from tunehouse.store import files
from tunehouse.store.blobs import LocalBlobs
from tunehouse.store.engine import Database, migrate
from tunehouse.store.tables import File, Organization


@pytest.fixture
def db(settings):
    settings.ensure_dirs()
    migrate(settings.db_url)
    database = Database(settings.db_url)
    yield database
    database.dispose()


@pytest.fixture
def org_id(db) -> str:
    with db.transaction() as s:
        org = Organization(id=ids.org_id(), name="acme", slug="acme")
        s.add(org)
    return org.id


def test_a_created_file_has_its_row_and_its_bytes(db, org_id, tmp_path):
    blobs = LocalBlobs(tmp_path / "files")
    with db.transaction() as s:
        row = files.create_file(
            s,
            blobs,
            organization_id=org_id,
            filename="results.csv",
            purpose="fine-tune-results",
            data=b"a,b\n",
        )
        file_id = row.id
    assert file_id.startswith("file-") and row.path == files.blob_key(org_id, file_id)
    with db.session() as s:
        found = files.get_file(s, file_id)
        assert (found.filename, found.purpose, found.bytes, found.status, found.project_id) == (
            "results.csv",
            "fine-tune-results",
            4,
            "processed",
            None,
        )
        assert files.file_path(blobs, found).read_bytes() == b"a,b\n"
        assert files.get_file(s, "file-nope") is None


def test_a_rolled_back_row_leaves_bytes_the_caller_deletes(db, org_id, tmp_path):
    blobs = LocalBlobs(tmp_path / "files")
    with pytest.raises(RuntimeError), db.transaction() as s:
        row = files.create_file(s, blobs, organization_id=org_id, filename="x", purpose="p", data=b"x")
        key = row.path
        raise RuntimeError("the job was taken over")
    with db.session() as s:
        assert s.query(File).count() == 0
    assert blobs.exists(key)
    files.delete_bytes(blobs, key)
    assert not blobs.exists(key)


def test_delete_removes_the_row_then_the_bytes(db, org_id, tmp_path):
    blobs = LocalBlobs(tmp_path / "files")
    with db.transaction() as s:
        file_id = files.create_file(
            s, blobs, organization_id=org_id, filename="t.jsonl", purpose="fine-tune", data=b"{}\n"
        ).id
    with db.transaction() as s:
        key = files.delete_file(s, files.get_file(s, file_id))
        assert blobs.exists(key)  # bytes go only once the deletion has committed
    files.delete_bytes(blobs, key)
    with db.session() as s:
        assert files.get_file(s, file_id) is None
    assert not blobs.exists(key)
