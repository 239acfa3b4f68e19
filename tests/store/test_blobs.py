"""The blob store on a local folder and on a non-local fsspec filesystem (memory://)."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pytest

from tunehouse.config import Settings
from tunehouse.store.blobs import COMPLETE_MARKER, Blobs, LocalBlobs, open_blobs


@pytest.fixture
def memory_blobs(tmp_path: Path):
    root = f"/tunehouse-test-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    yield Blobs(fs, root, cache_dir=tmp_path / "cache")
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture(params=["local", "memory"])
def blobs(request, tmp_path: Path, memory_blobs):
    return LocalBlobs(tmp_path / "local") if request.param == "local" else memory_blobs


def test_a_written_blob_reads_back_through_a_local_path(blobs):
    blobs.write_bytes("org-1/file-a", b"hello\n")
    assert blobs.exists("org-1/file-a")
    assert blobs.path("org-1/file-a").read_bytes() == b"hello\n"
    with blobs.open_read("org-1/file-a") as f:
        assert f.read() == b"hello\n"
    blobs.delete("org-1/file-a")
    assert not blobs.exists("org-1/file-a")
    assert not blobs.path("org-1/file-a").exists()


def test_an_unfinished_write_leaves_nothing_behind(blobs):
    w = blobs.writer("org-1/file-b")
    w.open().write(b"half")
    w.abort()
    assert not blobs.exists("org-1/file-b")
    assert not blobs.path("org-1/file-b").exists()
    # and nothing under a temporary name either
    assert [p for p in blobs.fs.find(blobs.root) if "partial" in p] == []


def test_a_folder_is_published_whole_and_replaced_whole(blobs, tmp_path: Path):
    src = tmp_path / "adapter"
    (src / "sub").mkdir(parents=True)
    (src / "adapter_config.json").write_text("{}")
    (src / "sub" / "weights.bin").write_bytes(b"\x00" * 1000)
    blobs.put_dir(src, "org-1/job-1/step-3")
    got = blobs.path("org-1/job-1/step-3")
    assert (got / "adapter_config.json").read_text() == "{}"
    assert (got / "sub" / "weights.bin").stat().st_size == 1000

    # Uploaded again under the same key (a checkpoint redone after a resume): readers get the new one.
    (src / "adapter_config.json").write_text('{"v": 2}')
    blobs.put_dir(src, "org-1/job-1/step-3")
    assert (blobs.path("org-1/job-1/step-3") / "adapter_config.json").read_text() == '{"v": 2}'

    blobs.delete("org-1/job-1/step-3")
    assert not blobs.exists("org-1/job-1/step-3")


def test_a_folder_whose_upload_did_not_finish_is_not_read(memory_blobs, tmp_path: Path):
    # Files present but no completion marker: an upload that died half-way.
    memory_blobs.fs.pipe_file(f"{memory_blobs.root}/org-1/job-2/step-1/adapter_config.json", b"{}")
    assert not memory_blobs.exists("org-1/job-2/step-1")
    assert not memory_blobs.path("org-1/job-2/step-1").exists()


def test_keys_that_leave_the_root_are_refused(blobs):
    for bad in ("../x", "/etc/passwd", "a//b", "a/./b", ""):
        with pytest.raises(ValueError):
            blobs.write_bytes(bad, b"x")


def test_storage_url_chooses_the_store(tmp_path: Path):
    home = tmp_path / "home"
    default = open_blobs(Settings(home=home), "files")
    assert isinstance(default, LocalBlobs) and default.root_path == home / "files"

    elsewhere = open_blobs(Settings(home=home, storage_url=f"file://{tmp_path}/shared"), "weights")
    assert isinstance(elsewhere, LocalBlobs) and elsewhere.root_path == tmp_path / "shared" / "weights"

    remote = open_blobs(Settings(home=home, storage_url="memory://tunehouse-url-test"), "files")
    assert type(remote) is Blobs and remote.root == "/tunehouse-url-test/files"
    assert remote.cache_dir == home / "cache" / "blobs" / "files"
    remote.write_bytes("o/f", b"1")
    assert remote.fs.cat_file("/tunehouse-url-test/files/o/f") == b"1"
    remote.fs.rm("/tunehouse-url-test", recursive=True)


def test_marker_is_written_last(memory_blobs, tmp_path: Path):
    src = tmp_path / "a"
    src.mkdir()
    (src / "z.bin").write_bytes(b"z")
    written = []
    real_put = memory_blobs.fs.put_file
    real_pipe = memory_blobs.fs.pipe_file

    # Record the order in which the filesystem receives the files.
    memory_blobs.fs.put_file = lambda a, b, **kw: (written.append(b), real_put(a, b, **kw))
    memory_blobs.fs.pipe_file = lambda p, d, **kw: (written.append(p), real_pipe(p, d, **kw))
    try:
        memory_blobs.put_dir(src, "k/step-1")
    finally:
        del memory_blobs.fs.put_file, memory_blobs.fs.pipe_file
    assert written[-1].endswith(COMPLETE_MARKER) and len(written) == 2
