"""Faults that must end in a clear job error or a retry, never a stuck or corrupt job: a disk that
fills up while saving, a training process that raises, the database unreachable for a while.
(An out-of-memory kill, SIGKILL, is tests/api/test_job_lifecycle.py's killed-process test.)"""

from __future__ import annotations

import contextlib
import resource
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time

from sqlalchemy.engine import make_url

from tests.api.conftest import LiveServer, wait_for_job
from tests.jobs.conftest import LINES, create_job, events, metric_steps, wait_until
from tunehouse.jobs import queue
from tunehouse.jobs.runner import TRAIN_ERROR_ATTEMPTS
from tunehouse.jobs.worker import Worker, child_env
from tunehouse.store.engine import Database


def _run_phase(settings, phase, job_id, worker_id, *, max_file_bytes=None):
    """Run one phase as a worker does, optionally with a file-size limit (RLIMIT_FSIZE): past it a
    write fails with EFBIG, as on a full disk."""

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run(
        [sys.executable, "-m", "tunehouse.jobs.runner", phase, job_id, worker_id],
        env=child_env(settings),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit if max_file_bytes else None,
    )


def test_disk_full_while_saving_a_checkpoint_fails_the_job_clearly(api, tmp_path):
    settings, client = api.settings, api.client()
    db = Database(settings.db_url)
    try:
        job = create_job(client, tmp_path, lines=LINES[:10])
        assert queue.claim(db, worker_id="w", phase="validate", lease_seconds=300) == job.id
        out = _run_phase(settings, "validate", job.id, "w")
        assert client.fine_tuning.jobs.retrieve(job.id).status == "queued", out.stdout[-2000:]
        assert queue.claim(db, worker_id="w", phase="train", lease_seconds=300) == job.id
        # 2 MB per file: the adapter fits, the checkpoint's tokenizer.json (3.4 MB) does not.
        out = _run_phase(settings, "train", job.id, "w", max_file_bytes=2 * 2**20)
        assert out.returncode == 0, out.stdout[-3000:]
        done = client.fine_tuning.jobs.retrieve(job.id)
        assert done.status == "failed", (out.stdout + out.stderr)[-3000:]
        assert done.error.code == "server_error"
        assert "ran out of disk space" in done.error.message and "File too large" in done.error.message
        # Nothing half-written was published: no checkpoint, no weights.
        assert client.fine_tuning.jobs.checkpoints.list(job.id).data == []
        assert not list((settings.home / "weights").rglob("adapter_config.json"))
        assert queue.job_state(db, job.id) == ("failed", None)
    finally:
        db.dispose()


def test_a_training_process_that_raises_is_retried_then_fails_clearly(settings, tiny_model_dir, tmp_path):
    # A base model whose weights file is cut short: validation (tokenizer, config) passes, loading
    # the weights for training raises every time.
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    with open(weights, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
    with open(weights, "r+b") as f:
        f.truncate(8 + size + 100)
    settings.base_models = {**settings.base_models, "broken-tiny": broken}
    with LiveServer(settings) as live:
        client = live.client()
        job = create_job(client, tmp_path, model="broken-tiny")
        done = wait_for_job(client, job.id, timeout=300)
        assert done.status == "failed"
        assert done.error.message.startswith("The train step failed: ")
        retries = [
            e.message
            for e in events(client, job.id)
            if e.message.startswith("Retrying in ") and "the training process failed" in e.message
        ]
        assert len(retries) == TRAIN_ERROR_ATTEMPTS - 2  # validation counts as the first start
        assert queue.job_state(live.app.state.tunehouse.db, job.id) == ("failed", None)


class TcpProxy:
    """127.0.0.1:port → the database server; `cut()` drops every connection and refuses new ones
    until `restore()`: the database is unreachable, as when its machine or the network goes away."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.listener: socket.socket | None = None
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.restore()

    def restore(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def cut(self) -> None:
        with self.lock:
            self.listener.close()
            for c in self.conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
                c.close()
            self.conns.clear()

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                if listener is not self.listener or listener.fileno() == -1:
                    # Accepted as cut() ran: this connection must not outlive the cut.
                    client.close()
                    upstream.close()
                    continue
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def test_the_database_unreachable_for_a_while_delays_the_job_but_loses_nothing(api, tmp_path):
    settings, client = api.settings, api.client()
    settings.state_save_seconds = 0  # a retried training process loses no step
    url = make_url(settings.db_url)
    proxy = None
    if url.get_backend_name() == "postgresql":
        proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
        worker_url = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    else:
        worker_url = settings.db_url
    worker = Worker(settings.model_copy(update={"database_url": worker_url}))
    worker.start()
    try:
        job = create_job(client, tmp_path)
        wait_until(lambda: len(metric_steps(client, job.id)) >= 3, timeout=240, what="training to start")
        if proxy is not None:
            proxy.cut()  # PostgreSQL gone: every query of the worker and its training process fails
            time.sleep(8)
            proxy.restore()
        else:
            # SQLite: another process holds the write lock for a while (writers wait, then go on).
            lock = sqlite3.connect(url.database, timeout=30)
            lock.execute("BEGIN EXCLUSIVE")
            time.sleep(8)
            lock.rollback()
            lock.close()
        done = wait_for_job(client, job.id, timeout=300)
        assert done.status == "succeeded", (done.error, [e.message for e in events(client, job.id)])
        assert metric_steps(client, job.id) == list(range(1, 21))  # none lost, none twice
        assert worker._thread.is_alive()
        beat = queue.list_workers(Database(settings.db_url), alive_within=60)
        assert [w["id"] for w in beat] == [worker.worker_id]  # heartbeating again
    finally:
        worker.stop()
        if proxy is not None:
            proxy.cut()


def test_a_job_handed_back_after_a_failure_waits_out_its_backoff(api, tmp_path):
    """A retry is not claimed before its delay has passed, then is; the delay doubles per retry."""
    client = api.client()
    db = Database(api.settings.db_url)
    try:
        job = create_job(client, tmp_path)
        assert queue.claim(db, worker_id="w", phase="validate", lease_seconds=30) == job.id
        queue.release(db, worker_id="w", job_id=job.id, message="Retrying in 1.5 s: test", delay=1.5)
        assert queue.claim(db, worker_id="w", phase="validate", lease_seconds=30) is None
        time.sleep(1.6)
        assert queue.claim(db, worker_id="w", phase="validate", lease_seconds=30) == job.id
        assert [queue.retry_delay(5, n) for n in range(1, 9)] == [5, 5, 10, 20, 40, 80, 160, 300]
    finally:
        db.dispose()


def test_a_failed_job_quotes_the_exception_not_sqlalchemy_boilerplate(tmp_path):
    from tunehouse.jobs.worker import _log_tail

    log = tmp_path / "train.log"
    log.write_text(
        "Traceback (most recent call last):\n  ...\n"
        "sqlalchemy.exc.OperationalError: (psycopg.OperationalError) connection refused\n"
        "(Background on this error at: https://sqlalche.me/e/21/e3q8)\n\n"
    )
    assert _log_tail(log) == "sqlalchemy.exc.OperationalError: (psycopg.OperationalError) connection refused"
