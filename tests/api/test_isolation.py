"""Two organizations (and two projects in one of them) on one server: no endpoint shows or touches
another tenant's objects. One tiny job is trained for the whole module (organization A, project
P1); every other tenant then tries every endpoint on its objects.

To cover a new endpoint, add a row to ENDPOINTS: a 404 (or, for lists, absence) is expected.
Every route tried here must exist: a renamed or removed route fails the module up front (a 404
from an unknown path would otherwise pass for isolation).
The last tests share models with checkpoint permissions and then delete the project and the
organization, checking the storage folders (they run last because they destroy the fixture).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import httpx2 as httpx
import pytest
from fastapi import FastAPI
from starlette.routing import Match
from typer.testing import CliRunner

from tests.api.conftest import (
    LiveServer,
    arithmetic_lines,
    create_tenant_key,
    wait_for_job,
    write_jsonl,
)
from tests.conftest import TINY_MODEL, fresh_database, make_settings
from tunehouse.api.app import create_app


@dataclass
class Victim:
    """What organization A's project P1 owns after one trained job."""

    org_id: str
    project_id: str
    key: str
    admin_key: str
    file: str
    result_file: str
    job: str
    model: str
    checkpoint_model: str
    checkpoint_id: str
    alias: str  # a model alias of organization A, to its model (P1's)


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with fresh_database(home) as url, LiveServer(make_settings(home, tiny_model_dir, url)) as live:
        # Before anything is trained: a route that moved must fail every test here, not pass them.
        missing = unserved_routes(live.app)
        if missing:
            pytest.fail(f"routes this module tries are not served: {missing}")
        s = live.settings
        a_admin, _ = create_tenant_key(s, org="org-a", role="owner")
        a_p1, p1 = create_tenant_key(s, org="org-a", project="p1", role="member")
        a_p2, p2 = create_tenant_key(s, org="org-a", project="p2", role="member")
        b_admin, _ = create_tenant_key(s, org="org-b", role="owner")
        b_member, b_p = create_tenant_key(s, org="org-b", project="b1", role="member")

        client = live.client(a_p1)
        d = tmp_path_factory.mktemp("data")
        train = client.files.create(
            file=write_jsonl(d / "train.jsonl", arithmetic_lines(10)).open("rb"), purpose="fine-tune"
        )
        job = client.fine_tuning.jobs.create(
            model=TINY_MODEL,
            training_file=train.id,
            suffix="secret",
            metadata={"team": "a"},
            method={
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}},
            },
        )
        job = wait_for_job(client, job.id)
        assert job.status == "succeeded", job.error
        ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
        intermediate = next(c for c in ckpts if c.fine_tuned_model_checkpoint != job.fine_tuned_model)
        alias = live.http(a_admin).post(
            "/v1/organization/model_aliases", json={"name": "a-alias", "target": job.fine_tuned_model}
        )
        assert alias.status_code == 200, alias.text
        org_a = live.http(a_admin).get("/v1/organization/projects/" + p1).json()
        assert org_a["id"] == p1
        victim = Victim(
            org_id=job.organization_id,
            project_id=p1,
            key=a_p1,
            admin_key=a_admin,
            file=train.id,
            result_file=job.result_files[0],
            job=job.id,
            model=job.fine_tuned_model,
            checkpoint_model=intermediate.fine_tuned_model_checkpoint,
            checkpoint_id=intermediate.id,
            alias="a-alias",
        )
        attackers = {"org-b admin": b_admin, "org-b member": b_member, "org-a other project": a_p2}
        # Each attacker's own file, to try the victim's model with it.
        own_files = {
            name: live.client(key)
            .files.create(file=("mine.jsonl", io.BytesIO(train_bytes())), purpose="fine-tune")
            .id
            for name, key in attackers.items()
        }
        yield live, victim, attackers, own_files, {"p2": p2, "b1": b_p}


def train_bytes() -> bytes:
    return ("\n".join(arithmetic_lines(10)) + "\n").encode()


def _chat(model):
    return {"model": model, "messages": [{"role": "user", "content": "1+1"}], "max_tokens": 2}


# (name, method, path, json body): {file} {result_file} {job} {model} {checkpoint_model}
# {own_file} are filled in. Each must answer 404 to every other tenant.
ENDPOINTS = [
    ("file retrieve", "GET", "/v1/files/{file}", None),
    ("file content", "GET", "/v1/files/{file}/content", None),
    ("result file retrieve", "GET", "/v1/files/{result_file}", None),
    ("result file content", "GET", "/v1/files/{result_file}/content", None),
    ("file delete", "DELETE", "/v1/files/{file}", None),
    (
        "job create with their file",
        "POST",
        "/v1/fine_tuning/jobs",
        {"model": TINY_MODEL, "training_file": "{file}"},
    ),
    (
        "job create from their model",
        "POST",
        "/v1/fine_tuning/jobs",
        {"model": "{model}", "training_file": "{own_file}"},
    ),
    ("job retrieve", "GET", "/v1/fine_tuning/jobs/{job}", None),
    ("job cancel", "POST", "/v1/fine_tuning/jobs/{job}/cancel", None),
    ("job pause", "POST", "/v1/fine_tuning/jobs/{job}/pause", None),
    ("job resume", "POST", "/v1/fine_tuning/jobs/{job}/resume", None),
    ("job events", "GET", "/v1/fine_tuning/jobs/{job}/events", None),
    ("job checkpoints", "GET", "/v1/fine_tuning/jobs/{job}/checkpoints", None),
    ("permissions list", "GET", "/v1/fine_tuning/checkpoints/{model}/permissions", None),
    (
        "permissions create",
        "POST",
        "/v1/fine_tuning/checkpoints/{model}/permissions",
        {"project_ids": ["{own_project}"]},
    ),
    ("permissions delete", "DELETE", "/v1/fine_tuning/checkpoints/{model}/permissions/cp_x", None),
    ("model retrieve", "GET", "/v1/models/{model}", None),
    ("checkpoint model retrieve", "GET", "/v1/models/{checkpoint_model}", None),
    ("model delete", "DELETE", "/v1/models/{model}", None),
    ("checkpoint model delete", "DELETE", "/v1/models/{checkpoint_model}", None),
    ("model export", "GET", "/v1/models/{model}/export", None),
    ("checkpoint model export", "GET", "/v1/models/{checkpoint_model}/export", None),
    ("chat with their model", "POST", "/v1/chat/completions", _chat("{model}")),
    ("chat with their checkpoint", "POST", "/v1/chat/completions", _chat("{checkpoint_model}")),
    ("chat with their model alias", "POST", "/v1/chat/completions", _chat("{alias}")),
    ("model alias retrieve", "GET", "/v1/models/{alias}", None),
    (
        "completions with their model",
        "POST",
        "/v1/completions",
        {"model": "{model}", "prompt": "1+1", "max_tokens": 2},
    ),
    ("data check of their file", "POST", "/v1/fine_tuning/data_checks", {"training_file": "{file}"}),
]

# (name, path, what must not appear in the answer, whether the owner's own answer shows it)
LISTS = [
    ("files", "/v1/files", ("file", "result_file"), True),
    ("jobs", "/v1/fine_tuning/jobs", ("job",), True),
    ("jobs by metadata", "/v1/fine_tuning/jobs?metadata[team]=a", ("job",), True),
    ("models", "/v1/models", ("model", "checkpoint_model", "alias"), True),
    (
        "fine-tuning usage",
        "/v1/organization/usage/fine_tuning?start_time=0",
        ("model", "job", "project_id"),
        False,
    ),
    ("completions usage", "/v1/organization/usage/completions?start_time=0", ("model", "project_id"), False),
    ("audit log", "/v1/organization/audit_logs?limit=100", ("project_id",), True),
]

ATTACKERS = ["org-b admin", "org-b member", "org-a other project"]


def _fill(value, victim: Victim, own_file: str, own_project: str):
    subs = {**victim.__dict__, "own_file": own_file, "own_project": own_project}
    if isinstance(value, str):
        return value.format(**subs)
    if isinstance(value, list):
        return [_fill(v, victim, own_file, own_project) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, victim, own_file, own_project) for k, v in value.items()}
    return value


# Stand-ins for the ids in ENDPOINTS and LISTS, shaped like the real ones, to match routes with.
SAMPLE = {
    "file": "file-abc",
    "result_file": "file-def",
    "job": "ftjob-abc",
    "model": "ft:tiny-smollm2:org-a:secret:abcd1234",
    "checkpoint_model": "ft:tiny-smollm2:org-a:secret:abcd1234:ckpt-step-2",
    "own_file": "file-ghi",
    "own_project": "proj_abc",
    "alias": "a-alias",
}


def tried_routes() -> list[tuple[str, str]]:
    """Every (method, path) this module sends, with sample ids."""
    out = [(method, path.format(**SAMPLE)) for _, method, path, _ in ENDPOINTS]
    return out + [("GET", path.split("?")[0]) for _, path, _, _ in LISTS]


def unserved_routes(app) -> list[tuple[str, str]]:
    """Those of `tried_routes` that no route of `app` serves (path and method)."""

    def served(method: str, path: str) -> bool:
        scope = {"type": "http", "method": method, "path": path, "root_path": ""}
        return any(route.matches(scope)[0] == Match.FULL for route in app.routes)

    return [(method, path) for method, path in tried_routes() if not served(method, path)]


@pytest.mark.one_database
def test_every_route_tried_here_is_served(settings):
    """Checked against the app's route table, without the trained world: a route renamed or gone
    fails here by name (and fails `world`), instead of turning its isolation tests into skips."""
    settings.local_worker = False
    assert unserved_routes(create_app(settings)) == []
    # The check can fail: on an app without these routes, every one is reported.
    assert unserved_routes(FastAPI()) == tried_routes()


@pytest.mark.parametrize("attacker", ATTACKERS)
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=[e[0] for e in ENDPOINTS])
def test_other_tenants_get_404(world, endpoint, attacker):
    live, victim, attackers, own_files, projects = world
    name, method, path, body = endpoint
    own_project = projects["b1"] if attacker.startswith("org-b") else projects["p2"]
    h = live.http(attackers[attacker])
    url = _fill(path, victim, own_files[attacker], own_project)
    payload = _fill(body, victim, own_files[attacker], own_project)
    r = h.request(method, url, json=payload)
    assert r.status_code == 404, (name, attacker, r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    # The answer is the one for an object that does not exist: nothing of it leaks beyond what
    # the caller sent.
    sent = url + str(payload)
    for secret in (victim.org_id, victim.project_id, victim.job, victim.file, "secret", "team"):
        assert secret in sent or secret not in r.text, secret


@pytest.mark.parametrize("attacker", ATTACKERS)
@pytest.mark.parametrize("listing", LISTS, ids=[x[0] for x in LISTS])
def test_lists_never_show_other_tenants(world, listing, attacker):
    live, victim, attackers, _, _ = world
    name, path, hidden, controlled = listing
    r = live.http(attackers[attacker]).get(path)
    if r.status_code == 403 and path.startswith("/v1/organization/"):
        return  # admin-only listings: a project key sees none of them (its own organization's either)
    assert r.status_code == 200, r.text
    for field in hidden:
        assert getattr(victim, field) not in r.text, (name, attacker, field)
    if controlled:  # the same request by the owner does show them: the check above can fail
        mine = live.http(victim.admin_key).get(path).text
        assert all(getattr(victim, field) in mine for field in hidden), (name, mine[:500])


def test_owner_still_has_everything(world):
    """After every attempt above, the victim's objects are intact and unchanged."""
    live, victim, *_ = world
    client = live.client(victim.key)
    assert client.files.retrieve(victim.file).id == victim.file
    assert base64.b64decode(client.files.content(victim.result_file).read()).startswith(b"step,")
    job = client.fine_tuning.jobs.retrieve(victim.job)
    assert job.status == "succeeded" and job.fine_tuned_model == victim.model
    assert victim.model in [m.id for m in client.models.list()]
    out = client.chat.completions.create(
        model=victim.model, messages=[{"role": "user", "content": "1+1"}], max_tokens=2
    )
    assert out.model == victim.model
    # The organization's admin key sees P1's objects too.
    admin = live.client(victim.admin_key)
    assert victim.job in [j.id for j in admin.fine_tuning.jobs.list()]


def test_checkpoint_permissions_share_a_model(world):
    live, victim, attackers, _, projects = world
    owner_admin = live.client(victim.admin_key)
    p2 = live.client(attackers["org-a other project"])
    b_member = live.client(attackers["org-b member"])
    perms = owner_admin.fine_tuning.checkpoints.permissions

    # The project's own member key is not an admin key.
    r = live.http(victim.key).get(f"/v1/fine_tuning/checkpoints/{victim.model}/permissions")
    assert r.status_code == 403

    created = perms.create(victim.model, project_ids=[projects["p2"], projects["b1"]])
    assert [p.project_id for p in created.data] == [projects["p2"], projects["b1"]]
    assert all(p.object == "checkpoint.permission" and p.id.startswith("cp_") for p in created.data)
    again = perms.create(victim.model, project_ids=[projects["p2"]])
    assert again.data[0].id == created.data[0].id  # sharing twice is one permission
    listed = perms.list(victim.model, project_id=projects["b1"])
    assert [p.id for p in listed.data] == [created.data[1].id]

    # The other project (same organization) and the other organization's project can now use it.
    for client in (p2, b_member):
        assert victim.model in [m.id for m in client.models.list()]
        assert client.models.retrieve(victim.model).owned_by == victim.org_id
        out = client.chat.completions.create(
            model=victim.model, messages=[{"role": "user", "content": "2+2"}], max_tokens=2
        )
        assert out.model == victim.model
    # ...but not delete it, nor its other checkpoints, nor see the job or its files.
    for client in (p2, b_member):
        r = live.http(client.api_key).delete(f"/v1/models/{victim.model}")
        assert r.status_code == 404
        assert live.http(client.api_key).get(f"/v1/models/{victim.checkpoint_model}").status_code == 404
        assert live.http(client.api_key).get(f"/v1/fine_tuning/jobs/{victim.job}").status_code == 404
    # Another organization's admin can not list or change the owner's permissions.
    assert (
        live.http(attackers["org-b admin"])
        .get(f"/v1/fine_tuning/checkpoints/{victim.model}/permissions")
        .status_code
        == 404
    )

    for p in created.data:
        deleted = perms.delete(p.id, fine_tuned_model_checkpoint=victim.model)
        assert deleted.deleted and deleted.id == p.id
    for client in (p2, b_member):
        assert victim.model not in [m.id for m in client.models.list()]
        r = live.http(client.api_key).post("/v1/chat/completions", json=_chat(victim.model))
        assert r.status_code == 404
    types = [e["type"] for e in live.http(victim.admin_key).get("/v1/organization/audit_logs").json()["data"]]
    assert (
        types.count("checkpoint.permission.created") == 2
        and types.count("checkpoint.permission.deleted") == 2
    )


def _names(folder) -> set[str]:
    return {p.name for p in folder.rglob("*")} if folder.exists() else set()


def test_deleting_a_project_then_the_organization_removes_rows_and_bytes(world):
    live, victim, attackers, own_files, projects = world
    s = live.settings
    files_dir, weights_dir, jobs_dir = s.home / "files", s.home / "weights", s.jobs_dir
    # Org B shares nothing with A; A's P1 model is shared with B before the deletion.
    live.client(victim.admin_key).fine_tuning.checkpoints.permissions.create(
        victim.model, project_ids=[projects["b1"]]
    )
    before_files = _names(files_dir)
    assert {victim.file, victim.result_file} <= before_files
    assert any(victim.job in str(p) for p in weights_dir.rglob("*"))
    assert (jobs_dir / victim.job).exists()

    d = live.http(victim.admin_key).delete(f"/v1/organization/projects/{victim.project_id}").json()
    assert (
        d["deleted"] and d["jobs"] == 1 and d["files"] == 2 and d["checkpoints"] >= 2 and d["api_keys"] == 1
    )
    after = _names(files_dir)
    assert victim.file not in after and victim.result_file not in after
    assert not any(victim.job in str(p) for p in weights_dir.rglob("*"))
    assert not (jobs_dir / victim.job).exists()
    # The share is gone with the model; org B's own file is untouched.
    b_member = live.client(attackers["org-b member"])
    assert victim.model not in [m.id for m in b_member.models.list()]
    assert b_member.files.retrieve(own_files["org-b member"]).id == own_files["org-b member"]

    # A job still in flight when its organization goes is cancelled and removed too.
    admin_a = live.client(victim.admin_key)
    f = admin_a.files.create(file=("more.jsonl", io.BytesIO(train_bytes())), purpose="fine-tune")
    admin_a.fine_tuning.jobs.create(model=TINY_MODEL, training_file=f.id)
    from tunehouse.cli.main import app

    env = {"TUNEHOUSE_HOME": str(s.home)}
    if s.database_url:
        env["TUNEHOUSE_DATABASE_URL"] = s.database_url
    result = CliRunner().invoke(app, ["orgs", "delete", "org-a", "--yes"], env=env)
    assert result.exit_code == 0, result.output
    assert "Deleted organization org-a" in result.output
    assert not (files_dir / victim.org_id).exists() and not (weights_dir / victim.org_id).exists()
    from sqlalchemy import select

    from tunehouse.store.engine import Database
    from tunehouse.store.tables import File, Job, Project

    db = Database(s.db_url)
    with db.session() as session:
        assert session.scalar(select(Job.id).where(Job.organization_id == victim.org_id)) is None
        assert session.scalar(select(File.id).where(File.organization_id == victim.org_id)) is None
        assert session.scalar(select(Project.id).where(Project.organization_id == victim.org_id)) is None
    db.dispose()
    for key in (victim.admin_key, attackers["org-a other project"]):
        assert live.http(key).get("/v1/files").status_code == 401
    # Org B still works, and the deletion is on record.
    assert b_member.files.retrieve(own_files["org-b member"]).id
    audit = CliRunner().invoke(app, ["audit", "--org", victim.org_id, "--json"], env=env)
    assert (
        audit.exit_code == 0
        and '"organization.deleted"' in audit.output
        and '"project.deleted"' in audit.output
    )
    with httpx.Client(base_url=live.url) as h:
        assert h.get("/health").status_code == 200
