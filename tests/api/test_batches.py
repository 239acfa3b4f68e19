"""The Batches API (/v1/batches) through the official SDK: a batch's greedy answers equal what the
endpoint gives for the same bodies, the output and error files as OpenAI writes them, located
input errors, the completions endpoint, tenancy, reader keys, and the batch discount in usage."""

from __future__ import annotations

import io
import json
import time

import openai
import pytest
from openai import OpenAI

from tests.api.conftest import create_tenant_key
from tests.conftest import TINY_MODEL

CHAT = "/v1/chat/completions"


def chat_body(i: int, **extra) -> dict:
    return {
        "model": TINY_MODEL,
        "messages": [{"role": "user", "content": f"Say the number {i}."}],
        "max_tokens": 8,
        "temperature": 0,
        **extra,
    }


def line(custom_id: str, body: dict, url: str = CHAT, **extra) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body, **extra})


def upload(client: OpenAI, lines: list[str], purpose: str = "batch"):
    data = ("\n".join(lines) + "\n").encode()
    return client.files.create(file=("batch.jsonl", io.BytesIO(data)), purpose=purpose)


def wait_batch(
    client: OpenAI,
    batch_id: str,
    *,
    timeout: float = 240,
    until=("completed", "failed", "expired", "cancelled"),
):
    deadline = time.time() + timeout
    while True:
        b = client.batches.retrieve(batch_id)
        if b.status in until:
            return b
        assert time.time() < deadline, f"batch {batch_id} still {b.status} after {timeout}s"
        time.sleep(0.3)


def file_lines(client: OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines() if x]


def test_a_chat_batch_answers_as_the_endpoint_does(server):
    client = server.client()
    bodies = [chat_body(i) for i in range(5)] + [chat_body(5, n=2, stop=["."], seed=3)]
    f = upload(client, [line(f"req-{i}", b) for i, b in enumerate(bodies)])
    batch = client.batches.create(
        input_file_id=f.id, endpoint=CHAT, completion_window="24h", metadata={"run": "nightly"}
    )
    assert batch.object == "batch" and batch.status == "validating"
    assert batch.endpoint == CHAT and batch.input_file_id == f.id and batch.metadata == {"run": "nightly"}
    assert batch.request_counts.total == 6 and batch.expires_at == batch.created_at + 24 * 3600
    done = wait_batch(client, batch.id)
    assert done.status == "completed", done.errors
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert (
        done.request_counts.total == 6
        and done.request_counts.completed == 6
        and done.request_counts.failed == 0
    )
    assert done.error_file_id is None and done.model == TINY_MODEL
    out = file_lines(client, done.output_file_id)
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"
    assert [o["custom_id"] for o in out] == [f"req-{i}" for i in range(6)]
    total_in = total_out = 0
    for o, body in zip(out, bodies, strict=True):
        assert o["id"].startswith("batch_req_") and o["error"] is None
        assert o["response"]["status_code"] == 200 and o["response"]["request_id"].startswith("req_")
        got = o["response"]["body"]
        assert got["object"] == "chat.completion" and got["model"] == TINY_MODEL
        direct = client.chat.completions.create(**body)
        assert [c["message"]["content"] for c in got["choices"]] == [
            c.message.content for c in direct.choices
        ]
        assert [c["finish_reason"] for c in got["choices"]] == [c.finish_reason for c in direct.choices]
        assert got["usage"] == direct.usage.model_dump(
            include={"prompt_tokens", "completion_tokens", "total_tokens"}
        )
        total_in += got["usage"]["prompt_tokens"]
        total_out += got["usage"]["completion_tokens"]
    assert done.usage.input_tokens == total_in and done.usage.output_tokens == total_out
    assert [b.id for b in client.batches.list()] == [batch.id]


def test_a_completions_batch(server):
    client = server.client()
    bodies = [
        {"model": TINY_MODEL, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0},
        {"model": TINY_MODEL, "prompt": ["One", "Two"], "max_tokens": 4, "temperature": 0, "echo": True},
    ]
    f = upload(client, [line(f"c{i}", b, url="/v1/completions") for i, b in enumerate(bodies)])
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    done = wait_batch(client, batch.id)
    assert done.status == "completed", done.errors
    out = file_lines(client, done.output_file_id)
    for o, body in zip(out, bodies, strict=True):
        got = o["response"]["body"]
        assert got["object"] == "text_completion"
        direct = client.completions.create(**body)
        assert [(c["index"], c["text"]) for c in got["choices"]] == [
            (c.index, c.text) for c in direct.choices
        ]


def test_every_bad_line_is_reported_with_its_number(server):
    client = server.client()
    lines = [
        line("ok-1", chat_body(1)),
        "{not json",
        line("ok-1", chat_body(2)),  # duplicate custom_id
        line("wrong-url", chat_body(3), url="/v1/completions"),
        line("bad-temp", chat_body(4, temperature=7)),
        line("bad-model", {**chat_body(5), "model": "no-such-model"}),
        line("unknown-field", chat_body(6, bogus_field=1)),
        line("bad-logprobs", chat_body(7, top_logprobs=2)),
        json.dumps({"custom_id": "m", "method": "GET", "url": CHAT, "body": chat_body(8)}),
        line("stored", chat_body(9, store=True)),  # a batch's answers are not stored: refused
    ]
    f = upload(client, lines)
    batch = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    assert batch.status == "failed" and batch.failed_at
    errors = {(e.line, e.code, e.param) for e in batch.errors.data}
    assert (2, "invalid_json_line", None) in errors
    assert (3, "duplicate_custom_id", "custom_id") in errors
    assert (4, "invalid_url", "url") in errors
    assert (5, "invalid_value", "body.temperature") in errors
    assert (6, "mismatched_model", "body.model") in errors
    assert (8, "invalid_value", "body.top_logprobs") in errors
    assert (9, "invalid_method", "method") in errors
    assert (10, "invalid_value", "body.store") in errors
    assert all(e.line != 1 for e in batch.errors.data)  # the good line has none
    # A field the chat endpoint refuses is refused in a batch too (and accepted when it is).
    direct_refuses = True
    try:
        client.chat.completions.create(**chat_body(6), extra_body={"bogus_field": 1})
    except openai.BadRequestError:
        pass
    else:
        direct_refuses = False
    assert any(e.line == 7 for e in batch.errors.data) == direct_refuses
    assert client.batches.retrieve(batch.id).status == "failed"


def test_an_unknown_model_fails_the_batch(server):
    client = server.client()
    f = upload(client, [line("a", {**chat_body(1), "model": "no-such-model"})])
    batch = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    assert batch.status == "failed"
    (e,) = batch.errors.data
    assert (e.code, e.param, e.line) == ("model_not_found", "body.model", 1)


def test_create_refuses_what_it_cannot_run(server):
    client = server.client()
    good = upload(client, [line("a", chat_body(1))])
    for endpoint in ("/v1/embeddings", "/v1/moderations"):  # /v1/responses: tests/api/test_responses.py
        with pytest.raises(openai.BadRequestError) as e:
            client.batches.create(input_file_id=good.id, endpoint=endpoint, completion_window="24h")
        assert e.value.body["param"] == "endpoint"
        if endpoint != "/v1/moderations":
            assert "not available on this server" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.batches.create(input_file_id=good.id, endpoint=CHAT, completion_window="48h")
    assert e.value.body["param"] == "completion_window"
    with pytest.raises(openai.BadRequestError) as e:
        client.batches.create(
            input_file_id=good.id, endpoint=CHAT, completion_window="24h", extra_body={"priority": 1}
        )
    assert e.value.body["param"] == "priority"
    tuning = upload(client, [line("a", chat_body(1))], purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as e:
        client.batches.create(input_file_id=tuning.id, endpoint=CHAT, completion_window="24h")
    assert e.value.body["param"] == "input_file_id" and e.value.body["code"] == "invalid_file_purpose"
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.BadRequestError) as e:
        client.batches.create(
            input_file_id=good.id,
            endpoint=CHAT,
            completion_window="24h",
            extra_body={"output_expires_after": {"anchor": "created_at", "seconds": 5}},
        )
    assert e.value.body["param"] == "output_expires_after.seconds"
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    assert client.batches.list().data == []  # nothing half-made


def test_batches_belong_to_their_project_and_readers_only_read(server):
    settings = server.settings
    key_a, _ = create_tenant_key(settings, org="acme", project="a")
    key_b, _ = create_tenant_key(settings, org="acme", project="b")
    other, _ = create_tenant_key(settings, org="other")
    reader, _ = create_tenant_key(settings, org="acme", project="a", role="reader")
    a, b, o, r = (server.client(k) for k in (key_a, key_b, other, reader))
    f = upload(a, [line("x", chat_body(1))])
    batch = a.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    for c in (b, o):
        with pytest.raises(openai.NotFoundError):
            c.batches.retrieve(batch.id)
        with pytest.raises(openai.NotFoundError):
            c.batches.cancel(batch.id)
        assert c.batches.list().data == []
        with pytest.raises(openai.NotFoundError):  # another project's file
            c.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    assert r.batches.retrieve(batch.id).id == batch.id
    with pytest.raises(openai.PermissionDeniedError):
        r.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.PermissionDeniedError):
        r.batches.cancel(batch.id)
    done = wait_batch(a, batch.id)
    assert done.status == "completed"
    assert a.files.retrieve(done.output_file_id).purpose == "batch_output"
    with pytest.raises(openai.NotFoundError):
        b.files.retrieve(done.output_file_id)


def test_batch_usage_is_metered_at_half_price_and_shown_as_batch(server):
    key, project_id = create_tenant_key(server.settings, org="metered", project="p")
    admin, _ = create_tenant_key(server.settings, org="metered")
    client = server.client(key)
    body = chat_body(1, max_tokens=6)
    client.chat.completions.create(**body)
    f = upload(client, [line("a", body)])
    done = wait_batch(
        client, client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h").id
    )
    assert done.status == "completed"
    http = server.http(admin)
    start = int(time.time()) - 3600
    usage = http.get(
        "/v1/organization/usage/completions", params={"start_time": start, "group_by": "batch"}
    ).json()
    results = [r for bucket in usage["data"] for r in bucket["results"]]
    by_batch = {r["batch"]: r for r in results}
    assert set(by_batch) == {True, False}
    # The same body, the same tokens (greedy): once direct, once in the batch.
    assert by_batch[True]["input_tokens"] == by_batch[False]["input_tokens"] == done.usage.input_tokens
    assert by_batch[True]["num_model_requests"] == 1
    only = http.get(
        "/v1/organization/usage/completions", params={"start_time": start, "batch": "true"}
    ).json()
    assert [r["input_tokens"] for b in only["data"] for r in b["results"]] == [done.usage.input_tokens]
    costs = http.get("/v1/organization/costs", params={"start_time": start, "group_by": "line_item"}).json()
    items = {r["line_item"]: r["amount"]["value"] for b in costs["data"] for r in b["results"]}
    direct, batched = items[f"{TINY_MODEL}, inference"], items[f"{TINY_MODEL}, batch"]
    assert batched == pytest.approx(direct / 2)
