"""Every request field of OpenAI's CreateChatCompletionRequest and CreateCompletionRequest is either
honoured (a test of its effect) or refused with a 400 naming it; a field the spec does not define
is refused too. The field lists come from the spec itself (tests/api/openapi_wire.json), so a field OpenAI adds
fails `test_every_spec_field_is_decided` until it is decided here. Official SDK over real HTTP,
one shared server on the tiny random model, one or two requests per field.

Effects the tiny random model cannot show by itself are forced: `logit_bias` makes a token win
(penalties then make it lose), the tool grammar makes a call.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import openai
import pytest

from tests.api.openapi_wire import request_fields
from tests.conftest import TINY_MODEL

MESSAGES = [{"role": "user", "content": "Tell me a story."}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    }
]
TOKEN = 42  # the token logit_bias favours


@pytest.fixture(scope="module")
def client(shared_server):
    return shared_server.client()


@pytest.fixture(scope="module")
def token_text(tiny_model_dir) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir).decode([TOKEN])


def chat(client, **kw):
    return client.chat.completions.create(
        **{"model": TINY_MODEL, "messages": MESSAGES, "max_tokens": 4, **kw}
    )


def complete(client, **kw):
    return client.completions.create(**{"model": TINY_MODEL, "prompt": "Once upon", "max_tokens": 4, **kw})


def refused(call: Callable, param: str, **kw) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        call(**kw)
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body


# --------------------------------------------------------------------------------------------------
# Chat completions: one check per field of CreateChatCompletionRequest


def _chat_metadata(client, _):
    # Validated as OpenAI does; without `store` it is kept nowhere, as OpenAI (see _chat_store).
    assert chat(client, metadata={"app": "x"}).choices
    refused(chat, "metadata", client=client, metadata={f"k{i}": "v" for i in range(17)})
    refused(chat, "metadata", client=client, metadata={"k" * 65: "v"})
    refused(chat, "metadata", client=client, metadata={"k": "v" * 513})


def _chat_temperature(client, _):
    out = chat(client, temperature=0, n=2, max_tokens=8, seed=1)
    assert out.choices[0].message.content == out.choices[1].message.content


def _chat_top_p(client, _):
    out = chat(client, top_p=0, n=2, max_tokens=8, seed=1)  # only the likeliest token is left
    assert out.choices[0].message.content == out.choices[1].message.content


def _chat_top_logprobs(client, _):
    out = chat(client, logprobs=True, top_logprobs=3)
    assert all(len(t.top_logprobs) == 3 for t in out.choices[0].logprobs.content)


def _chat_logprobs(client, _):
    out = chat(
        client, logprobs=True, seed=3
    )  # seeded: an unseeded draw may pick a special token, which content leaves out
    assert "".join(t.token for t in out.choices[0].logprobs.content) == out.choices[0].message.content


def _chat_accepted_identifier(field):
    def check(client, _):
        # Accepted as OpenAI does; they go to the server's log (api/chat/service.py).
        assert chat(client, extra_body={field: "end-user-7"}).choices

    return check


def _chat_safety_identifier(client, _):
    assert chat(client, extra_body={"safety_identifier": "end-user-7"}).choices
    refused(chat, "safety_identifier", client=client, extra_body={"safety_identifier": "x" * 65})


def _chat_prompt_cache_retention(client, _):
    assert chat(client, extra_body={"prompt_cache_retention": "in_memory"}).choices
    refused(chat, "prompt_cache_retention", client=client, extra_body={"prompt_cache_retention": "24h"})


def _chat_prompt_cache_options(client, _):
    assert chat(client, extra_body={"prompt_cache_options": {"ttl": "30m", "mode": "implicit"}}).choices
    refused(
        chat,
        "prompt_cache_options.mode",
        client=client,
        extra_body={"prompt_cache_options": {"mode": "explicit"}},
    )


def _chat_model(client, _):
    assert chat(client).model == TINY_MODEL
    with pytest.raises(openai.NotFoundError):
        chat(client, model="no-such-model")


def _chat_messages(client, _):
    a = chat(client, temperature=0, max_tokens=8)
    b = chat(client, temperature=0, max_tokens=8, messages=[{"role": "user", "content": "Other words."}])
    assert a.usage.prompt_tokens != b.usage.prompt_tokens


def _chat_service_tier(client, _):
    assert chat(client, service_tier="priority").service_tier == "default"  # the tier that served it


def _chat_modalities(client, _):
    assert chat(client, modalities=["text"]).choices
    refused(chat, "modalities", client=client, modalities=["text", "audio"])


def _chat_verbosity(client, _):
    assert chat(client, extra_body={"verbosity": "medium"}).choices
    refused(chat, "verbosity", client=client, extra_body={"verbosity": "low"})


def _chat_max_tokens(field):
    def check(client, _):
        out = chat(client, **{"max_tokens": None, field: 3})
        assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"

    return check


def _chat_frequency_penalty(client, tok):
    bias = {str(TOKEN): 8}
    assert chat(client, temperature=0, max_tokens=6, logit_bias=bias).choices[0].message.content == tok * 6
    out = chat(client, temperature=0, max_tokens=6, logit_bias=bias, frequency_penalty=2)
    assert out.choices[0].message.content.count(tok) < 6


def _chat_presence_penalty(client, tok):
    # A lead of 1.5 makes the token win every time on the random model's flat logits; a presence
    # penalty of 2 takes more than that lead away once the token has come.
    bias = {str(TOKEN): 1.5}
    assert chat(client, temperature=0, max_tokens=6, logit_bias=bias).choices[0].message.content == tok * 6
    out = chat(client, temperature=0, max_tokens=6, logit_bias=bias, presence_penalty=2)
    assert out.choices[0].message.content.count(tok) <= 1


def _chat_response_format(client, _):
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}
    out = chat(client, response_format=fmt, max_tokens=60, seed=2)
    assert set(json.loads(out.choices[0].message.content)) == {"a"}


def _chat_store(client, _):
    # `store: true` keeps the answer: listed (filtered by model and metadata), retrieved, its
    # request's messages listed, its metadata replaced, deleted. Not stored without it.
    tag = {"run": "store-test"}
    kept = chat(
        client, store=True, metadata=tag, messages=[*MESSAGES, {"role": "assistant", "content": "ok"}]
    )
    chat(client, store=False, metadata=tag)
    listed = client.chat.completions.list(metadata=tag)
    assert [c.id for c in listed.data] == [kept.id]
    assert listed.data[0].choices[0].message.content == kept.choices[0].message.content
    assert client.chat.completions.list(model="other-model", metadata=tag).data == []
    got = client.chat.completions.retrieve(kept.id)
    assert got.choices[0].message.content == kept.choices[0].message.content and got.metadata == tag
    msgs = client.chat.completions.messages.list(kept.id)
    assert [(m.role, m.content) for m in msgs.data] == [("user", "Tell me a story."), ("assistant", "ok")]
    assert client.chat.completions.update(kept.id, metadata={"run": "renamed"}).metadata == {"run": "renamed"}
    assert client.chat.completions.list(metadata=tag).data == []
    assert client.chat.completions.delete(kept.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(kept.id)
    refused(chat, "store", client=client, store=True, stream=True)


def _chat_stream(client, _):
    chunks = list(chat(client, stream=True, temperature=0))
    assert chunks[0].object == "chat.completion.chunk"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat(client, temperature=0).choices[0].message.content


def _chat_stream_options(client, _):
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    refused(chat, "stream_options.bogus", client=client, stream=True, stream_options={"bogus": True})


def _chat_stop(client, tok):
    out = chat(client, temperature=0, logit_bias={str(TOKEN): 100}, stop=[tok])
    assert out.choices[0].message.content == "" and out.choices[0].finish_reason == "stop"


def _chat_logit_bias(client, tok):
    assert chat(client, temperature=0, logit_bias={str(TOKEN): 100}).choices[0].message.content == tok * 4


def _chat_n(client, _):
    assert [c.index for c in chat(client, n=3).choices] == [0, 1, 2]


def _chat_seed(client, _):
    a, b = (chat(client, seed=11, max_tokens=10).choices[0].message.content for _ in range(2))
    assert a == b


def _chat_tools(client, _):
    out = chat(client, tools=TOOLS, tool_choice="required", max_tokens=100, seed=1)
    assert out.choices[0].message.tool_calls[0].function.name == "add"
    assert out.choices[0].finish_reason == "tool_calls" and out.choices[0].message.function_call is None


def _chat_tool_choice(client, _):
    out = chat(client, tools=TOOLS, tool_choice="none", max_tokens=8)
    assert out.choices[0].message.tool_calls is None


def _chat_parallel_tool_calls(client, _):
    out = chat(
        client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, n=3, seed=4, max_tokens=150
    )
    assert all(len(c.message.tool_calls) == 1 for c in out.choices)


def _chat_functions(client, _):
    fn = TOOLS[0]["function"]
    out = chat(client, functions=[fn], function_call={"name": "add"}, max_tokens=100, seed=1)
    choice = out.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.tool_calls is None
    assert choice.message.function_call.name == "add"
    assert set(json.loads(choice.message.function_call.arguments)) == {"a", "b"}
    # Streamed, as OpenAI streamed it: `delta.function_call`, the name first, then the arguments.
    chunks = list(
        chat(client, functions=[fn], function_call={"name": "add"}, max_tokens=100, seed=1, stream=True)
    )
    deltas = [
        c.choices[0].delta.function_call for c in chunks if c.choices and c.choices[0].delta.function_call
    ]
    assert deltas[0].name == "add"
    assert "".join(d.arguments or "" for d in deltas) == choice.message.function_call.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "function_call"
    refused(chat, "functions", client=client, functions=[fn], tools=TOOLS)
    refused(chat, "functions[0].name", client=client, functions=[{"name": "bad name"}])


def _chat_function_call(client, _):
    out = chat(client, functions=[TOOLS[0]["function"]], function_call="none", max_tokens=8)
    assert out.choices[0].message.function_call is None and out.choices[0].finish_reason != "function_call"
    refused(chat, "function_call", client=client, function_call="auto")  # without functions
    refused(
        chat,
        "function_call",
        client=client,
        functions=[TOOLS[0]["function"]],
        function_call={"name": "missing"},
    )


def _chat_refused(field, value, param=None):
    def check(client, _):
        refused(chat, param or field, client=client, extra_body={field: value})

    return check


CHAT: dict[str, Callable] = {
    "metadata": _chat_metadata,
    "top_logprobs": _chat_top_logprobs,
    "temperature": _chat_temperature,
    "top_p": _chat_top_p,
    "user": _chat_accepted_identifier("user"),
    "safety_identifier": _chat_safety_identifier,
    "prompt_cache_key": _chat_accepted_identifier("prompt_cache_key"),
    "prompt_cache_retention": _chat_prompt_cache_retention,
    "prompt_cache_options": _chat_prompt_cache_options,
    "messages": _chat_messages,
    "model": _chat_model,
    "service_tier": _chat_service_tier,
    "modalities": _chat_modalities,
    "verbosity": _chat_verbosity,
    "reasoning_effort": _chat_refused("reasoning_effort", "low"),
    "max_completion_tokens": _chat_max_tokens("max_completion_tokens"),
    "frequency_penalty": _chat_frequency_penalty,
    "presence_penalty": _chat_presence_penalty,
    "web_search_options": _chat_refused("web_search_options", {}),
    "response_format": _chat_response_format,
    "audio": _chat_refused("audio", {"voice": "alloy", "format": "mp3"}),
    "store": _chat_store,
    "moderation": _chat_refused("moderation", {"model": "omni-moderation-latest"}),
    "stream": _chat_stream,
    "stop": _chat_stop,
    "logit_bias": _chat_logit_bias,
    "logprobs": _chat_logprobs,
    "max_tokens": _chat_max_tokens("max_tokens"),
    "n": _chat_n,
    "prediction": _chat_refused("prediction", {"type": "content", "content": "Once upon a time"}),
    "seed": _chat_seed,
    "stream_options": _chat_stream_options,
    "tools": _chat_tools,
    "tool_choice": _chat_tool_choice,
    "parallel_tool_calls": _chat_parallel_tool_calls,
    "function_call": _chat_function_call,
    "functions": _chat_functions,
}


# --------------------------------------------------------------------------------------------------
# Legacy completions: one check per field of CreateCompletionRequest


def _cmpl_model(client, _):
    assert complete(client).model == TINY_MODEL


def _cmpl_prompt(client, _):
    assert complete(client, prompt=[1, 2, 3]).usage.prompt_tokens == 3


def _cmpl_best_of(client, _):
    assert complete(client, best_of=1).choices
    refused(complete, "best_of", client=client, best_of=3)


def _cmpl_echo(client, _):
    assert complete(client, echo=True).choices[0].text.startswith("Once upon")


def _cmpl_frequency_penalty(client, tok):
    out = complete(client, temperature=0, max_tokens=6, logit_bias={str(TOKEN): 8}, frequency_penalty=2)
    assert out.choices[0].text.count(tok) < 6


def _cmpl_presence_penalty(client, tok):
    bias = {str(TOKEN): 1.5}
    assert complete(client, temperature=0, max_tokens=6, logit_bias=bias).choices[0].text == tok * 6
    out = complete(client, temperature=0, max_tokens=6, logit_bias=bias, presence_penalty=2)
    assert out.choices[0].text.count(tok) <= 1


def _cmpl_logit_bias(client, tok):
    assert complete(client, temperature=0, logit_bias={str(TOKEN): 100}).choices[0].text == tok * 4


def _cmpl_logprobs(client, _):
    lp = complete(client, logprobs=2).choices[0].logprobs
    assert len(lp.tokens) == 4 and all(len(t) <= 2 for t in lp.top_logprobs)


def _cmpl_max_tokens(client, _):
    out = complete(client, max_tokens=3)
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"


def _cmpl_n(client, _):
    assert [c.index for c in complete(client, n=2).choices] == [0, 1]


def _cmpl_seed(client, _):
    a, b = (complete(client, seed=5, max_tokens=8).choices[0].text for _ in range(2))
    assert a == b


def _cmpl_stop(client, tok):
    out = complete(client, temperature=0, logit_bias={str(TOKEN): 100}, stop=tok)
    assert out.choices[0].text == "" and out.choices[0].finish_reason == "stop"


def _cmpl_stream(client, _):
    chunks = list(complete(client, stream=True, temperature=0))
    assert (
        "".join(c.choices[0].text for c in chunks if c.choices)
        == complete(client, temperature=0).choices[0].text
    )


def _cmpl_stream_options(client, _):
    chunks = list(complete(client, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 4


def _cmpl_suffix(client, _):
    refused(complete, "suffix", client=client, suffix=" the end.")


def _cmpl_temperature(client, _):
    out = complete(client, temperature=0, n=2, max_tokens=8, seed=3)
    assert out.choices[0].text == out.choices[1].text


def _cmpl_top_p(client, _):
    out = complete(client, top_p=0, n=2, max_tokens=8, seed=3)
    assert out.choices[0].text == out.choices[1].text


def _cmpl_user(client, _):
    assert complete(client, user="end-user-7").choices  # accepted; it goes to the server's log


COMPLETIONS: dict[str, Callable] = {
    "model": _cmpl_model,
    "prompt": _cmpl_prompt,
    "best_of": _cmpl_best_of,
    "echo": _cmpl_echo,
    "frequency_penalty": _cmpl_frequency_penalty,
    "logit_bias": _cmpl_logit_bias,
    "logprobs": _cmpl_logprobs,
    "max_tokens": _cmpl_max_tokens,
    "n": _cmpl_n,
    "presence_penalty": _cmpl_presence_penalty,
    "seed": _cmpl_seed,
    "stop": _cmpl_stop,
    "stream": _cmpl_stream,
    "stream_options": _cmpl_stream_options,
    "suffix": _cmpl_suffix,
    "temperature": _cmpl_temperature,
    "top_p": _cmpl_top_p,
    "user": _cmpl_user,
}


def test_every_spec_field_is_decided():
    assert set(CHAT) == request_fields("CreateChatCompletionRequest")
    assert set(COMPLETIONS) == request_fields("CreateCompletionRequest")


@pytest.mark.parametrize("field", sorted(CHAT))
def test_chat_field(client, token_text, field):
    CHAT[field](client, token_text)


@pytest.mark.parametrize("field", sorted(COMPLETIONS))
def test_completions_field(client, token_text, field):
    COMPLETIONS[field](client, token_text)


def test_fields_outside_the_spec_are_refused(client):
    # A field of another endpoint, a misspelling, an inference-server extension: none is dropped.
    for field in ("input", "max_token", "top_k"):
        refused(chat, field, client=client, extra_body={field: 1})
        refused(complete, field, client=client, extra_body={field: 1})
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, extra_body={"top_k": 1})
    assert e.value.code == "unknown_parameter" and "top_k" in e.value.message


# --------------------------------------------------------------------------------------------------
# Fine-tuning job creation: OpenAI's fields and two tunehouse extensions, nothing else


def test_fine_tuning_job_fields(client):
    from tunehouse.api.fine_tuning.protocol import CreateFineTuningJobRequest

    ours = set(CreateFineTuningJobRequest.model_fields)
    assert ours - request_fields("CreateFineTuningJobRequest") == {"overlap_is_error", "evaluation"}
    assert request_fields("CreateFineTuningJobRequest") <= ours
    create = client.fine_tuning.jobs.create
    base = {"model": TINY_MODEL, "training_file": "file-missing"}
    refused(create, "learning_rate", **base, extra_body={"learning_rate": 1e-4})
    refused(
        create,
        "method.supervised.epochs",
        **base,
        method={"type": "supervised", "supervised": {"epochs": 2}},
    )
    refused(
        create,
        "method.mode",
        **base,
        method={"type": "supervised"},
        extra_body={"method": {"type": "supervised", "mode": "x"}},
    )
    # The extensions are fields like the others: the request gets as far as the missing file.
    for extra in ({"overlap_is_error": True}, {"evaluation": {"select_checkpoint": "last"}}):
        with pytest.raises(openai.APIStatusError) as e:
            create(**base, extra_body=extra)
        assert e.value.body["param"] == "training_file", e.value.body


# --------------------------------------------------------------------------------------------------
# Batches, files, uploads and checkpoint permissions: the spec's request fields, nothing else


def test_batch_file_upload_and_permission_requests_take_the_spec_fields(shared_server):
    from tunehouse.api.batches.protocol import CreateBatchRequest
    from tunehouse.api.organization.protocol import CheckpointPermissionCreateRequest
    from tunehouse.api.uploads.protocol import CompleteUploadRequest, CreateUploadRequest

    assert set(CreateBatchRequest.model_fields) == request_fields("CreateBatchRequest")
    assert set(CreateUploadRequest.model_fields) == request_fields("CreateUploadRequest")
    assert set(CompleteUploadRequest.model_fields) == request_fields("CompleteUploadRequest")
    assert set(CheckpointPermissionCreateRequest.model_fields) == request_fields(
        "CreateFineTuningCheckpointPermissionRequest"
    )
    assert request_fields("CreateFileRequest") == {"file", "purpose", "expires_after"}
    assert request_fields("AddUploadPartRequest") == {"data"}
    # A field outside them is refused with its name, on each endpoint.
    http = shared_server.http()
    for path, body in (
        (
            "/v1/batches",
            {"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        ),
        (
            "/v1/uploads",
            {"filename": "a.jsonl", "purpose": "fine-tune", "bytes": 1, "mime_type": "text/jsonl"},
        ),
        ("/v1/fine_tuning/checkpoints/ft:x:ckpt-step-1/permissions", {"project_ids": ["proj_x"]}),
    ):
        r = http.post(path, json={**body, "colour": "blue"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "colour", (path, r.text)
    r = http.post(
        "/v1/files", files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": "fine-tune", "colour": "blue"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "colour", r.text


# --------------------------------------------------------------------------------------------------
# Streamed chunks, as sent (the SDK's objects hide a null): each one OpenAI's chunk schema


def _sse_objects(http, path: str, body: dict) -> list[dict]:
    out = []
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[len("data: ") :]))
    return out


def test_streamed_chunks_match_the_spec(shared_server):
    from tests.api.openapi_wire import check

    http = shared_server.http()
    base = {"model": TINY_MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": True}
    bodies = [
        {**base, "logprobs": True, "top_logprobs": 1, "stream_options": {"include_usage": True}},
        {**base, "tools": TOOLS, "tool_choice": "required", "max_tokens": 60},
        {**base, "functions": [TOOLS[0]["function"]], "function_call": {"name": "add"}, "max_tokens": 60},
    ]
    for body in bodies:
        chunks = _sse_objects(http, "/v1/chat/completions", body)
        assert chunks
        for chunk in chunks:
            check(chunk, "CreateChatCompletionStreamResponse")
    for chunk in _sse_objects(
        http, "/v1/completions", {"model": TINY_MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True}
    ):
        check(chunk, "CompletionChunk")


def test_stored_completions_belong_to_their_organization(shared_server):
    from tests.api.conftest import create_org_key

    mine = shared_server.client(create_org_key(shared_server.settings, "wire-store-a"))
    theirs = shared_server.client(create_org_key(shared_server.settings, "wire-store-b"))
    kept = chat(mine, store=True)
    assert [c.id for c in mine.chat.completions.list().data] == [kept.id]
    assert theirs.chat.completions.list().data == []
    for call in (
        lambda: theirs.chat.completions.retrieve(kept.id),
        lambda: theirs.chat.completions.messages.list(kept.id),
        lambda: theirs.chat.completions.update(kept.id, metadata={}),
        lambda: theirs.chat.completions.delete(kept.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert mine.chat.completions.retrieve(kept.id).id == kept.id
