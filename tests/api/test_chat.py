"""/v1/chat/completions through the official SDK, on the tiny base model."""

import threading
import time

import openai
import pytest

from tests.conftest import TINY_MODEL

MESSAGES = [
    {"role": "developer", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Tell me a story."}]},
]


@pytest.fixture(scope="module")
def client(shared_server):
    return shared_server.client()


def test_completion_object(client):
    out = client.chat.completions.create(model=TINY_MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion" and out.model == TINY_MODEL
    choice = out.choices[0]
    assert (
        choice.index == 0
        and choice.message.role == "assistant"
        and choice.finish_reason in ("stop", "length")
    )
    assert choice.message.refusal is None and choice.logprobs is None
    u = out.usage
    assert u.prompt_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert (
        out.choices[0].message.content
        == client.chat.completions.create(model=TINY_MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
        .choices[0]
        .message.content
    )


def test_length_n_seed_and_stop(client):
    out = client.chat.completions.create(
        model=TINY_MODEL, messages=MESSAGES, max_completion_tokens=6, temperature=0
    )
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 6

    out = client.chat.completions.create(model=TINY_MODEL, messages=MESSAGES, max_tokens=5, n=3, seed=1)
    assert [c.index for c in out.choices] == [0, 1, 2] and out.usage.completion_tokens == 15
    a = client.chat.completions.create(
        model=TINY_MODEL, messages=MESSAGES, max_tokens=12, seed=42, temperature=1
    )
    b = client.chat.completions.create(
        model=TINY_MODEL, messages=MESSAGES, max_tokens=12, seed=42, temperature=1, top_p=1
    )
    assert a.choices[0].message.content == b.choices[0].message.content

    text = (
        client.chat.completions.create(model=TINY_MODEL, messages=MESSAGES, max_tokens=20, temperature=0)
        .choices[0]
        .message.content
    )
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = client.chat.completions.create(
        model=TINY_MODEL, messages=MESSAGES, max_tokens=20, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]


def test_streaming_with_usage(client):
    full = client.chat.completions.create(model=TINY_MODEL, messages=MESSAGES, max_tokens=10, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=TINY_MODEL,
            messages=MESSAGES,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])

    plain = list(
        client.chat.completions.create(model=TINY_MODEL, messages=MESSAGES, max_tokens=3, stream=True)
    )
    assert all(c.choices for c in plain)


def test_errors(client, shared_server):
    cases = [
        (dict(model="nope", messages=MESSAGES), openai.NotFoundError, "model_not_found"),
        (dict(model=TINY_MODEL, messages=[]), openai.BadRequestError, None),
        (dict(model=TINY_MODEL, messages=MESSAGES, temperature=3), openai.BadRequestError, "invalid_value"),
        (
            dict(model=TINY_MODEL, messages=MESSAGES, tool_choice="required"),
            openai.BadRequestError,
            "invalid_value",
        ),
        (
            dict(model=TINY_MODEL, messages=MESSAGES, logit_bias={"42": 101}),
            openai.BadRequestError,
            "invalid_value",
        ),
        (
            dict(model=TINY_MODEL, messages=MESSAGES, logit_bias={"999999": 1}),
            openai.BadRequestError,
            "invalid_value",
        ),
        (dict(model=TINY_MODEL, messages=MESSAGES, top_logprobs=2), openai.BadRequestError, "invalid_value"),
        (
            dict(model=TINY_MODEL, messages=[{"role": "user", "content": "word " * 3000}]),
            openai.BadRequestError,
            "context_length_exceeded",
        ),
        (dict(model=TINY_MODEL, messages=[{"role": "wizard", "content": "x"}]), openai.BadRequestError, None),
    ]
    for kwargs, exc, code in cases:
        with pytest.raises(exc) as e:
            client.chat.completions.create(**kwargs)
        if code:
            assert e.value.body["code"] == code, e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=TINY_MODEL, messages=[{"role": "user", "content": "word " * 3000}], stream=True
        )
    assert e.value.body["code"] == "context_length_exceeded"
    with shared_server.http() as http:
        r = http.post(
            "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_logprobs_penalties_and_logit_bias(client, tiny_model_dir):
    out = client.chat.completions.create(
        model=TINY_MODEL, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 5
    assert "".join(t.token for t in content) == out.choices[0].message.content
    assert all(
        len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content
    )
    assert all(t.logprob <= 0 and bytes(t.bytes).decode() == t.token for t in content)

    streamed = list(
        client.chat.completions.create(
            model=TINY_MODEL, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, stream=True
        )
    )
    tokens = [
        t.token
        for c in streamed
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content
    ]
    assert tokens == [t.token for t in content]

    # -100 bans a token: the greedy first token never comes again.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    first_id = tok(bytes(content[0].bytes).decode(), add_special_tokens=False)["input_ids"][0]
    banned = client.chat.completions.create(
        model=TINY_MODEL,
        messages=MESSAGES,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        logit_bias={str(first_id): -100},
    )
    assert banned.choices[0].logprobs.content[0].token != content[0].token
    # +100 forces one.
    token42 = tok.decode([42])
    forced = client.chat.completions.create(
        model=TINY_MODEL, messages=MESSAGES, max_tokens=4, temperature=0, logit_bias={"42": 100}
    )
    assert forced.choices[0].message.content == token42 * 4
    # Penalties: a mildly favoured token stops repeating.
    mild = client.chat.completions.create(
        model=TINY_MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logit_bias={"42": 8}
    )
    penalized = client.chat.completions.create(
        model=TINY_MODEL,
        messages=MESSAGES,
        max_tokens=6,
        temperature=0,
        logit_bias={"42": 8},
        frequency_penalty=2,
        presence_penalty=2,
    )
    assert mild.choices[0].message.content == token42 * 6
    assert penalized.choices[0].message.content.count(token42) < 6


def test_disconnect_frees_the_slot(client, shared_server, tiny_model_dir, monkeypatch):
    """A client that closes its stream frees its request's engine slot. Only the client's leaving
    may end the request: the client stays connected until it leaves the `with` block, the engine
    is held at the request's first event until then (so checking that it runs cannot race its end,
    however fast the engine or slow this test), and the tokens that end a text are banned (so the
    request cannot end on its own before `max_tokens`)."""
    from transformers import AutoTokenizer

    engine = shared_server.app.state.tunehouse.inference
    at_first_event, release = threading.Event(), threading.Event()
    handles = []
    submit = engine.submit

    def held_at_first_event(model, prompt, params, on_event):
        def on_event_after_release(item):  # called on the engine's scheduler thread
            at_first_event.set()
            release.wait(timeout=120)
            on_event(item)

        handle = submit(model, prompt, params, on_event_after_release)
        handles.append(handle)
        return handle

    monkeypatch.setattr(engine, "submit", held_at_first_event)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ends = {tok.eos_token_id, *tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])}
    body = {
        "model": TINY_MODEL,
        "messages": MESSAGES,
        "max_tokens": 1500,
        "stream": True,
        "temperature": 1,
        "logit_bias": {str(t): -100 for t in ends},
    }
    try:
        with shared_server.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            # Hold on to the line iterator: the client closes the response (so disconnects) as soon
            # as an iterator over it is closed, and `next(r.iter_lines())` drops it at once.
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert at_first_event.wait(timeout=120), "the engine never produced the request's first token"
            assert engine.active_sequences() == 1
    finally:
        release.set()  # the client has gone: let the engine go on
    deadline = time.monotonic() + 60
    while engine.active_sequences() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.active_sequences() == 0
    # Freed because the client left, not because the request ran to its end.
    (handle,) = handles
    assert handle.completion_tokens < body["max_tokens"]
    # The API answered meanwhile and still does.
    assert client.chat.completions.create(model=TINY_MODEL, messages=MESSAGES, max_tokens=2).choices


def test_a_server_set_to_int8_weights_answers_as_usual(settings):
    from tests.api.conftest import LiveServer

    settings.inference_quantization = "int8"
    with LiveServer(settings) as live:
        out = live.client().chat.completions.create(
            model=TINY_MODEL, messages=MESSAGES, max_tokens=8, temperature=0
        )
        assert out.choices[0].message.content and out.usage.completion_tokens > 0
        assert live.app.state.tunehouse.inference.quantization == "int8"
