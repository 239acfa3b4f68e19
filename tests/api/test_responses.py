"""/v1/responses through the official SDK over real HTTP, on the tiny base model, one server for the
module: a response and its stored copy, the stream's events in OpenAI's order, conversation state
(`previous_response_id`), function tools round trip, `text.format` json_schema, background runs with
retrieve and cancel, delete, `input_items`, refused fields (each CreateResponse field of the spec is
decided: honoured or refused naming it), isolation between organizations, a batch over
/v1/responses and a fine-tuned model. Every JSON answer is checked against the spec's schemas by
tests/api/conftest.py; the streamed events and the batch's bodies here.

Time: ~60 s for all but the last two on a quiet 2-core VM (the first request pays the engine's
warm-up); the batch (its job's process loads the engine) and the fine-tuning job add ~30-80 s
each, SQLite pass only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import openai
import pytest

from tests.api.conftest import LiveServer, create_org_key, create_tenant_key, free_port
from tests.api.openapi_wire import check, request_fields
from tests.conftest import MODELS_DIR, TINY_MODEL

ADD = {
    "type": "function",
    "name": "add",
    "description": "Add two integers.",
    "parameters": {
        "type": "object",
        "properties": {  # bounded, so that the tiny random model's greedy answer ends
            "a": {"type": "integer", "minimum": 0, "maximum": 9},
            "b": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["a", "b"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def client(shared_server):
    return shared_server.client()


def create(client, **kw):
    return client.responses.create(
        **{"model": TINY_MODEL, "input": "Tell me a story.", "max_output_tokens": 16, "temperature": 0, **kw}
    )


def refused(client, param: str, status: int = 400, **kw) -> None:
    with pytest.raises(openai.APIStatusError) as e:
        create(client, **kw)
    assert e.value.status_code == status and e.value.body["param"] == param, e.value.body


def test_response_object_stored_and_metered(client, shared_server):
    r = create(client, instructions="Be brief.", metadata={"app": "t"}, user="u1", safety_identifier="s1")
    assert r.id.startswith("resp_") and r.object == "response" and r.model == TINY_MODEL
    assert r.status in ("completed", "incomplete") and r.error is None
    assert r.instructions == "Be brief." and r.metadata == {"app": "t"} and r.store is True
    assert r.service_tier == "default" and r.truncation == "disabled" and r.max_output_tokens == 16
    [message] = r.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.content[0].type == "output_text" and r.output_text == message.content[0].text
    u = r.usage
    assert (
        u.input_tokens > 0
        and 0 < u.output_tokens <= 16
        and u.total_tokens == u.input_tokens + u.output_tokens
    )
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens" and u.output_tokens == 16
    # the same deterministic answer again; stored as answered
    assert create(client, instructions="Be brief.").output_text == r.output_text
    assert client.responses.retrieve(r.id).model_dump() == r.model_dump()

    # metered like chat completions: the usage API adds up what the response said
    key = create_org_key(shared_server.settings, "metered")
    other = shared_server.client(key)
    done = create(other, max_output_tokens=20)
    deadline = time.time() + 20
    while True:
        page = shared_server.http(key).get(
            "/v1/organization/usage/completions", params={"start_time": int(time.time()) - 86400 * 2}
        )
        results = [x for b in page.json()["data"] for x in b["results"]]
        got = (
            (sum(x["input_tokens"] for x in results), sum(x["output_tokens"] for x in results))
            if results
            else None
        )
        if got == (done.usage.input_tokens, done.usage.output_tokens) or time.time() > deadline:
            break
        time.sleep(0.2)
    assert got == (done.usage.input_tokens, done.usage.output_tokens)


def _events(stream) -> list:
    out = []
    for event in stream:
        body = event.model_dump(mode="json", exclude_unset=True)
        check(body, "ResponseStreamEvent")
        out.append(event)
    return out


def test_stream_event_sequence(client):
    events = _events(create(client, stream=True, max_output_tokens=24))
    types = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[4 : 4 + len(deltas)] == ["response.output_text.delta"] * len(deltas) and deltas
    assert types[4 + len(deltas) :] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed" if events[-1].response.status == "completed" else "response.incomplete",
    ]
    final = events[-1].response
    text = "".join(d.delta for d in deltas)
    assert events[4 + len(deltas)].text == text == final.output_text
    assert events[0].response.status == "in_progress" and final.usage.output_tokens > 0
    # streamed and stored: the same as a non-streamed answer, and retrievable
    assert create(client, max_output_tokens=24).output_text == text
    assert client.responses.retrieve(final.id).output_text == text


def test_previous_response_id_carries_the_conversation(client):
    first = create(client, input="My name is Ada.", instructions="Remember names.")
    second = create(client, input="What is my name?", previous_response_id=first.id)
    assert second.previous_response_id == first.id and second.instructions is None
    # the model saw the first turn (input and answer): more input tokens than the first's total
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    items = client.responses.input_items.list(second.id, order="asc").data
    assert [i.type for i in items] == ["message", "message", "message"]
    assert [i.role for i in items] == ["user", "assistant", "user"]
    assert items[0].content[0].text == "My name is Ada." and items[1].id == first.output[0].id
    # stateless, the same conversation given whole is the same prompt
    whole = create(
        client,
        input=[
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": [{"type": "input_text", "text": "What is my name?"}]},
        ],
    )
    assert whole.usage.input_tokens == second.usage.input_tokens and whole.output_text == second.output_text


def test_function_tool_round_trip(client):
    call_r = create(
        client,
        input="What is 2 + 3?",
        tools=[ADD],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=128,
    )
    [call] = call_r.output
    assert (
        call is not None
        and call.name == "add"
        and call.call_id.startswith("call_")
        and call.id.startswith("fc_")
    )
    args = json.loads(call.arguments)
    assert set(args) == {"a", "b"} and all(isinstance(v, int) for v in args.values())
    assert (
        call_r.tools[0].name == "add" and call_r.tools[0].strict is True and call_r.tool_choice == "required"
    )

    answer = create(
        client,
        previous_response_id=call_r.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "5"}],
        tools=[ADD],
    )
    assert answer.status in ("completed", "incomplete")
    kinds = [i.type for i in client.responses.input_items.list(answer.id, order="asc").data]
    assert kinds == ["message", "function_call", "function_call_output"]

    # named tool, one call at most, streamed: the function-call argument events
    events = _events(
        create(
            client,
            input="Add 1 and 2.",
            tools=[ADD],
            tool_choice={"type": "function", "name": "add"},
            parallel_tool_calls=False,
            stream=True,
            max_output_tokens=64,
        )
    )
    types = [e.type for e in events]
    assert "response.function_call_arguments.delta" in types
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    final = events[-1].response
    [item] = final.output
    assert item.type == "function_call" and done.arguments == item.arguments and done.name == "add"
    assert (
        "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        == item.arguments
    )
    json.loads(item.arguments)

    # stateless round trip, the call and its output given as input items
    stateless = create(
        client,
        input=[
            {"role": "user", "content": "What is 2 + 3?"},
            {"type": "function_call", "call_id": "call_1", "name": "add", "arguments": '{"a": 2, "b": 3}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "5"},
        ],
        tools=[ADD],
        tool_choice="none",
        store=False,
    )
    assert stateless.output[0].type == "message"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(stateless.id)  # store: false keeps nothing


def test_text_format_json_schema(client):
    schema = {  # small values, so that the tiny random model's answer ends within the tokens given
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["color", "size"],
        "additionalProperties": False,
    }
    r = create(
        client,
        text={"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}},
        max_output_tokens=300,
    )
    doc = json.loads(r.output_text)
    assert (
        set(doc) == {"color", "size"} and doc["color"] in ("red", "green", "blue") and 0 <= doc["size"] <= 9
    )
    assert r.text.format.type == "json_schema" and r.text.format.name == "thing" and r.status == "completed"
    # json_object: constrained to an object (the tiny model may not close it within 32 tokens)
    r = create(client, text={"format": {"type": "json_object"}}, max_output_tokens=32)
    assert r.output_text.lstrip().startswith("{") and r.text.format.type == "json_object"


def test_background_retrieve_and_cancel(client):
    quick = create(client, background=True, max_output_tokens=16)
    assert quick.background is True and quick.status in ("queued", "in_progress")
    deadline = time.time() + 30
    while (got := client.responses.retrieve(quick.id)).status in ("queued", "in_progress"):
        assert time.time() < deadline
        time.sleep(0.1)
    assert got.status in ("completed", "incomplete") and got.usage.output_tokens > 0 and got.output_text

    slow = create(client, background=True, max_output_tokens=2000, temperature=1)
    cancelled = client.responses.cancel(slow.id)
    assert cancelled.status == "cancelled" and client.responses.retrieve(slow.id).status == "cancelled"
    assert client.responses.cancel(slow.id).status == "cancelled"  # again: the same answer
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.cancel(got.id)  # finished
    assert e.value.body["param"] == "response_id"
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(create(client).id)  # not a background response


def test_delete_and_input_items_pages(client):
    r = create(
        client,
        input=[{"role": "system", "content": "Be brief."}]
        + [{"role": "user", "content": f"Line {i}"} for i in range(4)],
    )
    items = client.responses.input_items.list(r.id)  # newest first by default
    assert [i.content[0].text for i in items.data] == ["Line 3", "Line 2", "Line 1", "Line 0", "Be brief."]
    page = client.responses.input_items.list(r.id, order="asc", limit=2)
    assert [i.content[0].text for i in page.data] == ["Be brief.", "Line 0"] and page.has_more
    rest = client.responses.input_items.list(r.id, order="asc", limit=10, after=page.data[-1].id)
    assert [i.content[0].text for i in rest.data] == ["Line 1", "Line 2", "Line 3"] and not rest.has_more
    assert [i.id for i in client.responses.input_items.list(r.id, order="asc")] == [
        i.id for i in page.data + rest.data
    ]

    client.responses.delete(r.id)
    for call in (client.responses.retrieve, client.responses.delete, client.responses.input_items.list):
        with pytest.raises(openai.NotFoundError):
            call(r.id)
    refused(client, "previous_response_id", previous_response_id=r.id)


def test_isolation_between_organizations(client, shared_server):
    mine = create(client, background=True, max_output_tokens=16)
    theirs = shared_server.client(create_org_key(shared_server.settings, "other-org"))
    for call in (
        theirs.responses.retrieve,
        theirs.responses.delete,
        theirs.responses.cancel,
        theirs.responses.input_items.list,
    ):
        with pytest.raises(openai.NotFoundError):
            call(mine.id)
    with pytest.raises(openai.BadRequestError) as e:
        create(theirs, previous_response_id=mine.id)
    assert e.value.body["param"] == "previous_response_id"
    assert client.responses.retrieve(mine.id).id == mine.id

    # projects: a project's keys see its responses only; deleting the project deletes them
    settings = shared_server.settings
    web_key, web = create_tenant_key(settings, org="default", project="web")
    app_key, _ = create_tenant_key(settings, org="default", project="app")
    made = create(shared_server.client(web_key))
    assert client.responses.retrieve(made.id).id == made.id  # the organization's admin key
    with pytest.raises(openai.NotFoundError):
        shared_server.client(app_key).responses.retrieve(made.id)
    assert shared_server.http().delete(f"/v1/organization/projects/{web}").status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made.id)


# Each field of the spec's CreateResponse: honoured (tested above or here) or refused naming it.
HONOURED = {
    "model", "input", "instructions", "previous_response_id", "tools", "tool_choice", "parallel_tool_calls",
    "max_tool_calls", "text", "max_output_tokens", "temperature", "top_p", "metadata", "store",
    "background", "stream", "stream_options", "user", "safety_identifier", "service_tier", "truncation",
    "include", "top_logprobs", "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options",
}  # fmt: skip
REFUSED = {
    "prompt": {"id": "pmpt_1"},
    "reasoning": {"effort": "low"},
    "moderation": {"model": "omni-moderation-latest"},
    "conversation": "conv_1",
    "context_management": [{"type": "compaction"}],
}


def test_every_spec_field_is_decided():
    assert HONOURED | set(REFUSED) == request_fields("CreateResponse")


def test_refused_fields_and_bad_inputs(client):
    for name, value in REFUSED.items():
        refused(client, name, extra_body={name: value})
    refused(client, "unknown_field", extra_body={"unknown_field": 1})
    refused(client, "tools[0].type", tools=[{"type": "web_search"}])
    refused(client, "tools[0].name", tools=[{**ADD, "name": "bad name"}])
    refused(client, "tool_choice", tool_choice="required")  # no tools
    refused(
        client,
        "input[0].content[0].type",
        input=[{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}],
    )
    refused(client, "input[0].type", input=[{"type": "reasoning", "summary": []}])
    refused(client, "input[0].role", input=[{"role": "robot", "content": "hi"}])
    refused(client, "input", input=[{"type": "function_call_output", "call_id": "call_x", "output": "1"}])
    refused(client, "max_output_tokens", max_output_tokens=5)
    refused(client, "temperature", temperature=3)
    refused(client, "previous_response_id", previous_response_id="resp_nope")
    refused(
        client,
        "text.format",
        text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}},
    )
    refused(client, "text.verbosity", text={"verbosity": "low"})
    refused(client, "include[0]", include=["reasoning.encrypted_content"])
    refused(client, "top_logprobs", top_logprobs=2)
    refused(client, "store", background=True, store=False)
    refused(client, "stream", background=True, stream=True)
    refused(client, "prompt_cache_retention", prompt_cache_retention="24h")
    refused(client, "metadata", metadata={f"k{i}": "v" for i in range(17)})
    refused(client, "model", 404, model="no-such-model")
    refused(client, "input", input=[{"role": "user", "content": "word " * 5000}])  # beyond the context


def test_honoured_details(client):
    # include logprobs: each output token with its alternatives
    r = create(client, include=["message.output_text.logprobs"], top_logprobs=2, max_output_tokens=16)
    lp = r.output[0].content[0].logprobs
    assert len(lp) == r.usage.output_tokens and all(len(x.top_logprobs) == 2 for x in lp)
    # truncation auto: a conversation too long for the context loses its oldest items
    long = [{"role": "user", "content": "word " * 1500} for _ in range(3)] + [
        {"role": "user", "content": "Hi"}
    ]
    refused(client, "input", input=long)
    fits = create(client, input=long, truncation="auto")
    assert fits.truncation == "auto" and fits.status in ("completed", "incomplete")
    # top_p, service_tier echoed, max_tool_calls caps the calls made
    r = create(
        client,
        top_p=0.5,
        service_tier="flex",
        input="Add 1 and 2, and 3 and 4.",
        tools=[ADD],
        tool_choice="required",
        max_tool_calls=1,
        max_output_tokens=128,
    )
    assert r.top_p == 0.5 and r.service_tier == "default" and r.max_tool_calls == 1
    assert len([i for i in r.output if i.type == "function_call"]) == 1


@pytest.mark.one_database  # the queue and storage paths run on both databases in the tests above and test_batches
def test_a_batch_over_responses_answers_as_the_endpoint_does(client):
    from tests.api.test_batches import file_lines, line, upload, wait_batch

    first = create(client, input="My name is Ada.")
    bodies = [
        {"model": TINY_MODEL, "input": "Tell me a story.", "max_output_tokens": 16, "temperature": 0},
        {
            "model": TINY_MODEL,
            "input": "What is 2 + 3?",
            "tools": [ADD],
            "tool_choice": "required",
            "parallel_tool_calls": False,
            "max_output_tokens": 128,
            "temperature": 0,
        },
        {
            "model": TINY_MODEL,
            "input": "And my name?",
            "previous_response_id": first.id,
            "instructions": "Be brief.",
            "max_output_tokens": 16,
            "temperature": 0,
        },
    ]
    bad = {**bodies[0], "store": True}
    f = upload(client, [line(f"r{i}", b, url="/v1/responses") for i, b in enumerate([*bodies, bad])])
    failed = client.batches.create(input_file_id=f.id, endpoint="/v1/responses", completion_window="24h")
    assert failed.status == "failed" and [(e.line, e.param) for e in failed.errors.data] == [
        (4, "body.store")
    ]

    f = upload(client, [line(f"r{i}", b, url="/v1/responses") for i, b in enumerate(bodies)])
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/responses", completion_window="24h")
    done = wait_batch(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 3, done.errors
    out = file_lines(client, done.output_file_id)
    for o, body in zip(out, bodies, strict=True):
        got = o["response"]["body"]
        check(got, "Response")
        direct = client.responses.create(**body, store=False).model_dump(mode="json")
        assert got["object"] == "response" and got["id"].startswith("resp_") and got["store"] is False
        assert got["status"] == direct["status"] and got["instructions"] == direct["instructions"]
        tokens = ("input_tokens", "output_tokens", "total_tokens")
        assert [got["usage"][k] for k in tokens] == [direct["usage"][k] for k in tokens]
        assert [_essence(i) for i in got["output"]] == [_essence(i) for i in direct["output"]]
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(got["id"])  # a batch's responses are in its output file only


def _essence(item: dict) -> tuple:
    if item["type"] == "function_call":
        return item["type"], item["name"], item["arguments"], item["status"]
    return item["type"], item["content"][0]["text"], item["status"]


@pytest.mark.one_database  # the queue and storage paths run on both databases in the tests above and test_batches
def test_a_fine_tuned_model_answers_and_continues_a_conversation(client, tmp_path):
    from tests.api.conftest import arithmetic_lines, wait_for_job, write_jsonl

    f = client.files.create(
        file=write_jsonl(tmp_path / "t.jsonl", arithmetic_lines(10)).open("rb"), purpose="fine-tune"
    )
    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL,
        training_file=f.id,
        suffix="resp",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}},
    )
    job = wait_for_job(client, job.id)
    assert job.status == "succeeded", job.error
    base = create(client, input="What is 2 + 2?")
    ft = create(client, model=job.fine_tuned_model, input="And 3 + 3?", previous_response_id=base.id)
    assert ft.model == job.fine_tuned_model and ft.status in ("completed", "incomplete")
    assert ft.usage.input_tokens > base.usage.input_tokens + base.usage.output_tokens
    events = _events(create(client, model=job.fine_tuned_model, stream=True))
    assert events[-1].response.model == job.fine_tuned_model and events[-1].response.output_text


@pytest.mark.one_database  # what it checks is the lease, written the same on either database
def test_a_background_response_whose_server_died_fails_instead_of_staying_in_progress(settings):
    """A background response runs in the server process that accepted it. That process killed with
    -9 stops renewing the response's lease; once it lapses, the next read fails the response with
    a server_error instead of answering `in_progress` for ever."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEHOUSE_")}
    env.update(
        TUNEHOUSE_MODELS_DIR=str(MODELS_DIR),
        TUNEHOUSE_BASE_MODELS=json.dumps({TINY_MODEL: str(settings.base_models[TINY_MODEL])}),
        TUNEHOUSE_ADMIN_KEY=settings.admin_key,
        TUNEHOUSE_LEASE_SECONDS="2",
        **({"TUNEHOUSE_DATABASE_URL": settings.database_url} if settings.database_url else {}),
    )
    cmd = [sys.executable, "-m", "tunehouse", "serve", "--port", str(port), "--home", str(settings.home)]
    proc = subprocess.Popen([*cmd, "--no-worker"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        dying = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=settings.admin_key, max_retries=0
        )
        deadline = time.time() + 120
        while True:
            try:
                dying.models.list()
                break
            except openai.APIConnectionError:
                assert time.time() < deadline and proc.poll() is None, proc.stdout.read().decode()
                time.sleep(0.2)
        response = create(dying, background=True, max_output_tokens=1500, temperature=1)
        assert response.status in ("queued", "in_progress")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    settings.lease_seconds = 2
    with LiveServer(settings) as live:
        client = live.client()
        assert client.responses.retrieve(response.id).status == "in_progress"  # its lease still runs
        time.sleep(2.5)
        failed = client.responses.retrieve(response.id)
        assert failed.status == "failed" and failed.error.code == "server_error", failed
        assert "stopped before it finished" in failed.error.message
        with pytest.raises(openai.BadRequestError):
            client.responses.cancel(response.id)  # an end is final
