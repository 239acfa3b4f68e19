"""The administration API (/v1/organization/...), roles and project scoping inside an organization.
No training here: files are enough to see who sees what."""

from __future__ import annotations

import io

import openai
import pytest

from tests.api.conftest import chat_line, create_tenant_key

INSUFFICIENT = "You have insufficient permissions for this operation."


def _upload(client: openai.OpenAI, name: str = "t.jsonl"):
    return client.files.create(
        file=(name, io.BytesIO((chat_line("hi", "hello") + "\n").encode())), purpose="fine-tune"
    )


def _error(r) -> dict:
    return r.json()["error"]


def test_projects_and_project_keys_lifecycle(server):
    admin = server.http()
    # Projects: create, list, retrieve, modify.
    p = admin.post("/v1/organization/projects", json={"name": "Web"}).json()
    assert p["object"] == "organization.project" and p["id"].startswith("proj_")
    assert p["status"] == "active" and p["archived_at"] is None and p["name"] == "Web"
    listed = admin.get("/v1/organization/projects").json()
    assert listed["object"] == "list" and {"Default project", "Web"} <= {x["name"] for x in listed["data"]}
    assert admin.get(f"/v1/organization/projects/{p['id']}").json()["name"] == "Web"
    assert (
        admin.post(f"/v1/organization/projects/{p['id']}", json={"name": "Website"}).json()["name"]
        == "Website"
    )
    dup = admin.post("/v1/organization/projects", json={"name": "Website"})
    assert dup.status_code == 400 and _error(dup)["param"] == "name"

    # A project key, shown once; lists show a prefix only.
    k = admin.post(
        f"/v1/organization/projects/{p['id']}/api_keys", json={"name": "ci", "role": "member"}
    ).json()
    assert k["object"] == "organization.project.api_key" and k["value"].startswith("sk-")
    assert k["role"] == "member" and k["owner"]["service_account"]["role"] == "member"
    keys = admin.get(f"/v1/organization/projects/{p['id']}/api_keys").json()["data"]
    assert [x["id"] for x in keys] == [k["id"]]
    assert keys[0]["value"] is None and keys[0]["redacted_value"].endswith("...")
    assert k["value"] not in str(keys) and k["value"].startswith(keys[0]["redacted_value"][:-3])
    fetched = admin.get(f"/v1/organization/projects/{p['id']}/api_keys/{k['id']}").json()
    assert fetched["id"] == k["id"] and fetched["value"] is None

    member = server.client(k["value"])
    assert member.files.list().data == []
    fetched = admin.get(f"/v1/organization/projects/{p['id']}/api_keys/{k['id']}").json()
    assert fetched["last_used_at"] is not None

    # Rotate: the old key stops working in the same moment the new one starts.
    new = admin.post(f"/v1/organization/projects/{p['id']}/api_keys/{k['id']}/rotate").json()
    assert new["id"] != k["id"] and new["value"] != k["value"] and new["role"] == "member"
    with pytest.raises(openai.AuthenticationError):
        member.files.list()
    rotated = server.client(new["value"])
    assert rotated.files.list().data == []

    # Delete (revoke).
    d = admin.delete(f"/v1/organization/projects/{p['id']}/api_keys/{new['id']}").json()
    assert d == {"object": "organization.project.api_key.deleted", "id": new["id"], "deleted": True}
    with pytest.raises(openai.AuthenticationError):
        rotated.files.list()
    assert admin.get(f"/v1/organization/projects/{p['id']}/api_keys/{new['id']}").status_code == 404

    # Archive: the project's keys stop working; archived projects are listed only on request.
    k2 = admin.post(f"/v1/organization/projects/{p['id']}/api_keys", json={"role": "owner"}).json()
    server.client(k2["value"]).files.list()
    a = admin.post(f"/v1/organization/projects/{p['id']}/archive").json()
    assert a["status"] == "archived" and a["archived_at"] is not None
    with pytest.raises(openai.AuthenticationError):
        server.client(k2["value"]).files.list()
    assert p["id"] not in [x["id"] for x in admin.get("/v1/organization/projects").json()["data"]]
    everything = admin.get("/v1/organization/projects", params={"include_archived": "true"}).json()["data"]
    assert p["id"] in [x["id"] for x in everything]
    default = next(x for x in everything if x["name"] == "Default project")
    r = admin.post(f"/v1/organization/projects/{default['id']}/archive")
    assert r.status_code == 400 and _error(r)["code"] == "default_project"


def test_admin_api_keys(server):
    admin = server.http()
    created = admin.post("/v1/organization/admin_api_keys", json={"name": "ops"}).json()
    assert created["object"] == "organization.admin_api_key" and created["value"].startswith("sk-")
    assert created["owner"]["role"] == "owner"
    listed = admin.get("/v1/organization/admin_api_keys").json()
    assert created["id"] in [x["id"] for x in listed["data"]] and created["value"] not in str(listed)
    assert admin.get(f"/v1/organization/admin_api_keys/{created['id']}").json()["name"] == "ops"
    # The new admin key administers the same organization.
    ops = server.http(created["value"])
    assert ops.get("/v1/organization/projects").status_code == 200
    rotated = ops.post(f"/v1/organization/admin_api_keys/{created['id']}/rotate").json()
    assert ops.get("/v1/organization/projects").status_code == 401
    ops = server.http(rotated["value"])
    d = ops.delete(f"/v1/organization/admin_api_keys/{rotated['id']}").json()
    assert d == {"id": rotated["id"], "object": "organization.admin_api_key.deleted", "deleted": True}
    assert ops.get("/v1/organization/projects").status_code == 401
    bad = admin.post("/v1/organization/admin_api_keys", json={"name": "x", "expires_in_seconds": 60})
    assert bad.status_code == 400 and _error(bad)["param"] == "expires_in_seconds"


def test_roles(server):
    org = "default"  # the organization of the settings' admin key
    reader, p1 = create_tenant_key(server.settings, org=org, project="p1", role="reader")
    member, _ = create_tenant_key(server.settings, org=org, project="p1", role="member")
    owner, _ = create_tenant_key(server.settings, org=org, project="p1", role="owner")
    other_owner, p2 = create_tenant_key(server.settings, org=org, project="p2", role="owner")

    # member: everything in its project.
    f = _upload(server.client(member))
    # reader: reads only; writes (uploads, deletes, chat) are 403 in OpenAI's shape.
    r = server.client(reader)
    assert [x.id for x in r.files.list()] == [f.id]
    assert r.files.retrieve(f.id).id == f.id
    for call in (
        lambda: _upload(r),
        lambda: r.files.delete(f.id),
        lambda: r.chat.completions.create(model="tiny-smollm2", messages=[{"role": "user", "content": "x"}]),
        lambda: r.fine_tuning.jobs.create(model="tiny-smollm2", training_file=f.id),
    ):
        with pytest.raises(openai.PermissionDeniedError) as e:
            call()
        assert e.value.status_code == 403 and e.value.body["message"].startswith(INSUFFICIENT)
        assert e.value.body["type"] == "invalid_request_error"
        assert e.value.body["code"] == "insufficient_permissions"
    assert server.client(member).files.retrieve(f.id).id == f.id  # nothing was deleted

    # Only admin keys administer the organization.
    for key in (reader, member, owner):
        h = server.http(key)
        for method, path in (
            ("GET", "/v1/organization/projects"),
            ("POST", "/v1/organization/admin_api_keys"),
            ("GET", "/v1/organization/audit_logs"),
        ):
            resp = h.request(method, path, json={"name": "x"} if method == "POST" else None)
            assert resp.status_code == 403, (key, path)
    # A project's owner manages its own project's keys, not another project's (unseen: 404).
    o = server.http(owner)
    made = o.post(f"/v1/organization/projects/{p1}/api_keys", json={"role": "reader"})
    assert made.status_code == 200 and made.json()["role"] == "reader"
    assert len(o.get(f"/v1/organization/projects/{p1}/api_keys").json()["data"]) == 4
    assert o.get(f"/v1/organization/projects/{p1}").json()["id"] == p1
    assert o.get(f"/v1/organization/projects/{p2}/api_keys").status_code == 404
    assert o.get(f"/v1/organization/projects/{p2}").status_code == 404
    assert server.http(member).get(f"/v1/organization/projects/{p1}/api_keys").status_code == 403
    assert server.http(other_owner).get(f"/v1/organization/projects/{p2}/api_keys").status_code == 200


def test_project_scoping_inside_an_organization(server):
    k1, p1 = create_tenant_key(server.settings, org="default", project="alpha", role="member")
    k2, p2 = create_tenant_key(server.settings, org="default", project="beta", role="member")
    admin = server.client()
    f1 = _upload(server.client(k1), "alpha.jsonl")
    f2 = _upload(server.client(k2), "beta.jsonl")
    f0 = _upload(admin, "admin.jsonl")  # an admin key's objects go to the default project

    assert [f.id for f in server.client(k1).files.list()] == [f1.id]
    assert [f.id for f in server.client(k2).files.list()] == [f2.id]
    with pytest.raises(openai.NotFoundError):
        server.client(k1).files.retrieve(f2.id)
    with pytest.raises(openai.NotFoundError):
        server.client(k2).files.content(f0.id)
    with pytest.raises(openai.NotFoundError):
        server.client(k1).fine_tuning.jobs.create(model="tiny-smollm2", training_file=f2.id)
    # The admin key sees the whole organization...
    assert {f1.id, f2.id, f0.id} <= {f.id for f in admin.files.list()}
    # ...or one project, with OpenAI's project header (the SDK's `project=`).
    scoped = openai.OpenAI(
        base_url=f"{server.url}/v1", api_key=server.settings.admin_key, project=p1, max_retries=0
    )
    assert [f.id for f in scoped.files.list()] == [f1.id]
    f3 = _upload(scoped, "into-alpha.jsonl")
    assert {f.id for f in server.client(k1).files.list()} == {f1.id, f3.id}
    # A project key cannot step into another project with the header.
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key=k1, project=p2, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.files.list()
    assert e.value.body["code"] == "mismatched_project"


def test_audit_log(server):
    admin = server.http()
    p = admin.post("/v1/organization/projects", json={"name": "audited"}).json()
    k = admin.post(f"/v1/organization/projects/{p['id']}/api_keys", json={"role": "member"}).json()
    rotated = admin.post(f"/v1/organization/projects/{p['id']}/api_keys/{k['id']}/rotate").json()
    admin.delete(f"/v1/organization/projects/{p['id']}/api_keys/{rotated['id']}")
    f = _upload(server.client())
    server.client().files.delete(f.id)
    admin.post(f"/v1/organization/projects/{p['id']}/archive")

    log = admin.get("/v1/organization/audit_logs", params={"limit": 100}).json()
    assert log["object"] == "list"
    types = [e["type"] for e in log["data"]]
    # Newest first.
    expected = [
        "project.archived",
        "file.deleted",
        "api_key.deleted",
        "api_key.rotated",
        "api_key.created",
        "project.created",
    ]
    assert [t for t in types if t in expected][: len(expected)] == expected
    created = next(
        e for e in log["data"] if e["type"] == "project.created" and e["project.created"]["id"] == p["id"]
    )
    assert created["project"] == {"id": p["id"], "name": "audited"}
    assert created["actor"]["type"] == "api_key" and created["project.created"]["data"]["name"] == "audited"
    assert created["id"].startswith("audit_log-") and isinstance(created["effective_at"], int)
    rot = next(e for e in log["data"] if e["type"] == "api_key.rotated")
    assert rot["api_key.rotated"] == {"id": rotated["id"], "data": {"replaces": k["id"], "name": None}}
    # No key material in the log.
    assert k["value"] not in str(log) and rotated["value"] not in str(log)

    only = admin.get("/v1/organization/audit_logs", params={"event_types[]": "file.deleted"}).json()["data"]
    assert [e["file.deleted"]["id"] for e in only] == [f.id]
    by_resource = admin.get("/v1/organization/audit_logs", params={"resource_ids[]": p["id"]}).json()["data"]
    assert {e["type"] for e in by_resource} == {"project.created", "project.archived"}
    page1 = admin.get("/v1/organization/audit_logs", params={"limit": 2}).json()
    page2 = admin.get("/v1/organization/audit_logs", params={"limit": 2, "after": page1["last_id"]}).json()
    assert page1["has_more"] and page2["data"][0]["id"] == log["data"][2]["id"]
    bad = admin.get("/v1/organization/audit_logs", params={"effective_at[gte]": "yesterday"})
    assert bad.status_code == 400 and _error(bad)["param"] == "effective_at[gte]"


def test_delete_project_removes_its_files_and_keys(server):
    admin = server.http()
    key, pid = create_tenant_key(server.settings, org="default", project="doomed", role="owner")
    keep, _ = create_tenant_key(server.settings, org="default", project="kept", role="owner")
    doomed = _upload(server.client(key))
    kept = _upload(server.client(keep))
    files_dir = server.settings.home / "files"
    stored = {p.name for p in files_dir.rglob("file-*")}
    assert {doomed.id, kept.id} <= stored

    d = admin.delete(f"/v1/organization/projects/{pid}").json()
    assert d["deleted"] is True and d["files"] == 1 and d["api_keys"] == 1
    assert doomed.id not in {p.name for p in files_dir.rglob("file-*")}
    assert kept.id in {p.name for p in files_dir.rglob("file-*")}
    with pytest.raises(openai.AuthenticationError):
        server.client(key).files.list()
    with pytest.raises(openai.NotFoundError):
        server.client().files.retrieve(doomed.id)
    assert admin.get(f"/v1/organization/projects/{pid}").status_code == 404
    entry = admin.get("/v1/organization/audit_logs", params={"event_types[]": "project.deleted"}).json()[
        "data"
    ][0]
    assert entry["project.deleted"]["id"] == pid and entry["project.deleted"]["data"]["files"] == 1
