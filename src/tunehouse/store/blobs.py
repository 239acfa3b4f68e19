"""Blob storage for uploaded files, results and weights, behind an fsspec URL.

`TUNEHOUSE_STORAGE_URL` names the root (default: the home folder, `file://<home>`); files live
under `<root>/files/<org>/<file-id>` and weights (adapter folders) under `<root>/weights/...`.

Two implementations share one interface:

- `LocalBlobs` (a local folder: the default, or any `file://` URL, e.g. a shared NFS mount):
  readers get the real path; writes go to a `.partial` sibling that is renamed into place.
- `Blobs` (any other fsspec filesystem: `s3://` with s3fs, `gs://`, `memory://` in tests, ...):
  readers get a copy downloaded into a local cache folder keyed by blob path, because training
  and inference load weights from local paths. A single blob is written to a temporary key and
  then moved into place; a folder (adapter, checkpoint) is uploaded file by file and its marker
  file `.tunehouse-complete` written last, so a reader never takes a half-uploaded folder.

Keys are ours (ids joined by "/"), never user input; anything that would leave the root is refused.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import BinaryIO

COMPLETE_MARKER = ".tunehouse-complete"


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad blob key: {key!r}")
    return key


class BlobWriter:
    """A blob being written: `open()` gives a binary file; `commit()` publishes it; `abort()`
    (always safe to call, also after commit) removes whatever is left of an unfinished write."""

    def __init__(self, blobs: Blobs, key: str):
        self.blobs, self.key = blobs, key
        self.temp_key = f"{key}.partial-{uuid.uuid4().hex[:12]}"
        self._file: BinaryIO | None = None
        self.committed = False

    def open(self) -> BinaryIO:
        self._file = self.blobs._open_write(self.temp_key)
        return self._file

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()

    def commit(self) -> None:
        self.close()
        self.blobs._move(self.temp_key, self.key)
        self.committed = True

    def abort(self) -> None:
        if self.committed:
            return
        with contextlib.suppress(Exception):
            self.close()
        with contextlib.suppress(FileNotFoundError, OSError):
            self.blobs._remove(self.temp_key)


class Blobs:
    """Blobs on any fsspec filesystem, read through a local cache."""

    def __init__(self, fs, root: str, *, cache_dir: Path):
        self.fs = fs
        self.root = root.rstrip("/")
        self.cache_dir = Path(cache_dir)

    # --- reading ---------------------------------------------------------------------------------
    def _full(self, key: str) -> str:
        return f"{self.root}/{_check_key(key)}"

    def exists(self, key: str) -> bool:
        full = self._full(key)
        return self.fs.exists(f"{full}/{COMPLETE_MARKER}") or self.fs.isfile(full)

    def path(self, key: str) -> Path:
        """A local path holding the blob (a file or a folder), downloaded into the cache if need
        be. The path does not exist when the blob does not."""
        local = self.cache_dir / _check_key(key)
        full = self._full(key)
        marker = f"{full}/{COMPLETE_MARKER}"
        if self.fs.exists(marker):
            # A folder: the marker holds a token that changes with every upload, so a folder
            # uploaded again under the same key (a checkpoint redone after a resume) is fetched again.
            token = self.fs.cat_file(marker)
            cached = local / COMPLETE_MARKER
            if cached.is_file() and cached.read_bytes() == token:
                return local
            tmp = self._cache_tmp(local)
            try:
                if self.get_dir(key, tmp):
                    self._swap_into_cache(tmp, local)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return local
        if local.is_file():
            return local  # single blobs are never rewritten under the same key
        if self.fs.isfile(full):
            tmp = self._cache_tmp(local)
            try:
                self.fs.get_file(full, str(tmp / "blob"))
                local.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / "blob", local)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return local

    def open_read(self, key: str) -> BinaryIO:
        return self.fs.open(self._full(key), "rb")

    def get_dir(self, key: str, dest: Path) -> bool:
        """Download the complete folder `key` into the empty local folder `dest`, its marker
        included. False (dest then holds a partial copy, for the caller to remove) when the folder
        is not complete, or was replaced while it downloaded."""
        full = self._full(key)
        marker = f"{full}/{COMPLETE_MARKER}"
        try:
            token = self.fs.cat_file(marker)
        except FileNotFoundError:
            return False
        # File by file: fsspec's recursive get() nests folders differently per filesystem.
        prefix = self.fs._strip_protocol(full).rstrip("/") + "/"
        for remote in self.fs.find(full):
            rel = self.fs._strip_protocol(remote)[len(prefix) :]
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(remote, str(dest / rel))
        try:
            if self.fs.cat_file(marker) != token:
                return False
        except FileNotFoundError:
            return False
        (dest / COMPLETE_MARKER).write_bytes(token)
        return True

    def children(self, prefix: str) -> list[str]:
        """The names directly under the folder `prefix` ("": the root; complete or not: see exists), sorted;
        [] when there is none. Temporary names (a leading dot, `.partial-`) are left out."""
        full = self._full(prefix) if prefix else self.root
        try:
            entries = self.fs.ls(full, detail=False)
        except FileNotFoundError:
            return []
        names = (self.fs._strip_protocol(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)
        return sorted(n for n in names if n and not n.startswith(".") and ".partial-" not in n)

    def _cache_tmp(self, local: Path) -> Path:
        local.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{local.name}.", suffix=".partial", dir=local.parent))

    @staticmethod
    def _swap_into_cache(tmp: Path, local: Path) -> None:
        old = None
        if local.exists():
            old = local.with_name(f".{local.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(local, old)
        os.replace(tmp, local)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    # --- writing ---------------------------------------------------------------------------------
    def writer(self, key: str) -> BlobWriter:
        return BlobWriter(self, _check_key(key))

    def write_bytes(self, key: str, data: bytes) -> None:
        w = self.writer(key)
        try:
            w.open().write(data)
            w.commit()
        finally:
            w.abort()

    def put_dir(self, local_dir: Path, key: str) -> None:
        """Publish a local folder under `key`, replacing what was there; readers see the old
        folder or the new one, never a mix (the marker is removed first and written last)."""
        full = self._full(key)
        marker = f"{full}/{COMPLETE_MARKER}"
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(marker)
        if self.fs.exists(full):
            self.fs.rm(full, recursive=True)
        self.fs.makedirs(full, exist_ok=True)
        for src in sorted(Path(local_dir).rglob("*")):
            if src.is_file() and src.name != COMPLETE_MARKER:
                dest = f"{full}/{src.relative_to(local_dir).as_posix()}"
                self.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)  # object stores: a no-op
                self.fs.put_file(str(src), dest)
        self.fs.pipe_file(marker, uuid.uuid4().hex.encode())

    def delete(self, key: str) -> None:
        full = self._full(key)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(f"{full}/{COMPLETE_MARKER}")
        with contextlib.suppress(FileNotFoundError):
            if self.fs.exists(full):
                self.fs.rm(full, recursive=self.fs.isdir(full))
        local = self.cache_dir / key
        if local.is_dir():
            shutil.rmtree(local, ignore_errors=True)
        else:
            local.unlink(missing_ok=True)

    # --- primitives the writer uses ----------------------------------------------------------------
    def _open_write(self, key: str) -> BinaryIO:
        full = self._full(key)
        self.fs.makedirs(full.rsplit("/", 1)[0], exist_ok=True)
        return self.fs.open(full, "wb")

    def _move(self, src_key: str, dst_key: str) -> None:
        self.fs.mv(self._full(src_key), self._full(dst_key))

    def _remove(self, key: str) -> None:
        self.fs.rm_file(self._full(key))


class LocalBlobs(Blobs):
    """Blobs in a local folder: readers use the files in place (no cache, no copy)."""

    def __init__(self, root: Path):
        from fsspec.implementations.local import LocalFileSystem

        self.root_path = Path(root)
        self.root_path.mkdir(parents=True, exist_ok=True)
        super().__init__(LocalFileSystem(), str(self.root_path), cache_dir=self.root_path)

    def path(self, key: str) -> Path:
        p = (self.root_path / _check_key(key)).resolve()
        if self.root_path.resolve() not in p.parents:
            raise ValueError(f"blob key escapes its root: {key!r}")
        return p

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def open_read(self, key: str) -> BinaryIO:
        return open(self.path(key), "rb")  # noqa: SIM115 - the caller closes it

    def get_dir(self, key: str, dest: Path) -> bool:
        src = self.path(key)
        if not src.is_dir():  # put_dir renames a folder into place whole: present means complete
            return False
        shutil.copytree(src, dest, dirs_exist_ok=True)
        return True

    def children(self, prefix: str) -> list[str]:
        folder = self.path(prefix) if prefix else self.root_path
        if not folder.is_dir():
            return []
        return sorted(
            p.name for p in folder.iterdir() if not p.name.startswith(".") and ".partial-" not in p.name
        )

    def put_dir(self, local_dir: Path, key: str) -> None:
        # Copy beside the destination, then swap it in with renames (atomic on one filesystem).
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
        try:
            shutil.copytree(local_dir, tmp, dirs_exist_ok=True)
            self._swap_into_cache(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def delete(self, key: str) -> None:
        p = self.path(key)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)

    def _open_write(self, key: str) -> BinaryIO:
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        return open(p, "wb")  # noqa: SIM115 - BlobWriter closes it

    def _move(self, src_key: str, dst_key: str) -> None:
        os.replace(self.path(src_key), self.path(dst_key))

    def _remove(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)


def open_blobs(settings, kind: str) -> Blobs:
    """The store for `kind` ("files" or "weights") under settings.storage_url."""
    from fsspec.core import url_to_fs
    from fsspec.implementations.local import LocalFileSystem

    url = settings.storage_url
    if url is None:
        return LocalBlobs(settings.home / kind)
    fs, root = url_to_fs(url, **(settings.storage_options or {}))
    root = f"{root.rstrip('/')}/{kind}" if root.strip("/") else kind
    if isinstance(fs, LocalFileSystem):
        return LocalBlobs(Path(root if root.startswith("/") else "/" + root))
    return Blobs(fs, root, cache_dir=settings.home / "cache" / "blobs" / kind)


_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def is_disk_full(exc: BaseException | None) -> bool:
    """An error that says the disk (or a file-size or quota limit) is full. Native libraries
    (tokenizers, safetensors) raise plain exceptions that end in "(os error 28)", so the message
    counts too, and so do the exceptions this one was raised from."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        if any(f"(os error {n})" in str(exc) for n in _FULL_ERRNOS):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False
