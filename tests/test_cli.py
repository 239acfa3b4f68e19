"""The command line: keys, and `serve` creating and printing a first key on a fresh home."""

import os
import re
import subprocess
import sys
import time

import httpx2 as httpx
from typer.testing import CliRunner

from tests.api.conftest import free_port
from tests.conftest import MODELS_DIR
from tunehouse.cli.main import app


def test_keys_create_gives_a_working_key_per_org(tmp_path):
    from tunehouse.store.engine import Database
    from tunehouse.tenancy.auth import authenticate

    home = tmp_path / "home"
    runner = CliRunner()
    a = runner.invoke(app, ["keys", "create", "--org", "Acme Corp", "--home", str(home)])
    b = runner.invoke(app, ["keys", "create", "--org", "Acme Corp", "--home", str(home)])
    c = runner.invoke(app, ["keys", "create", "--org", "Other", "--home", str(home)])
    assert a.exit_code == b.exit_code == c.exit_code == 0
    keys = [r.stdout.strip() for r in (a, b, c)]
    assert all(k.startswith("sk-") for k in keys) and len(set(keys)) == 3
    db = Database(f"sqlite:///{home / 'tunehouse.db'}")
    with db.transaction() as s:
        orgs = [authenticate(s, f"Bearer {k}", admin_key=None) for k in keys]
        # Only hashes are stored: the plain key appears nowhere in the database file.
    assert orgs[0].organization_id == orgs[1].organization_id != orgs[2].organization_id
    assert orgs[0].organization_slug == "acme-corp"
    assert keys[0].encode() not in (home / "tunehouse.db").read_bytes()


def test_serve_prints_a_first_key_once(tmp_path):
    home, port = tmp_path / "home", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEHOUSE_")}
    env["TUNEHOUSE_MODELS_DIR"] = str(MODELS_DIR)
    cmd = [
        sys.executable,
        "-m",
        "tunehouse",
        "serve",
        "--port",
        str(port),
        "--home",
        str(home),
        "--no-worker",
    ]

    def start():
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        deadline = time.time() + 60
        while time.time() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "serving on" in line:
                return proc, "".join(lines)
        proc.kill()
        raise AssertionError("".join(lines))

    proc, out = start()
    try:
        key = re.search(r"(sk-\S+)", out).group(1)
        deadline = time.time() + 30
        while True:
            try:
                r = httpx.get(
                    f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {key}"}
                )
                break
            except httpx.ConnectError:
                assert time.time() < deadline
                time.sleep(0.2)
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "smollm2-135m-instruct"
        bad = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer sk-nope"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    proc, out = start()  # same home: no new key is printed
    proc.terminate()
    proc.wait(timeout=30)
    assert "sk-" not in out
