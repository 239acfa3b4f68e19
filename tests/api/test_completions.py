"""The legacy /v1/completions endpoint through the official SDK, on the tiny base model."""

import openai
import pytest

from tests.conftest import TINY_MODEL


@pytest.fixture(scope="module")
def client(shared_server):
    return shared_server.client()


def test_text_completion_object_and_parameters(client):
    out = client.completions.create(model=TINY_MODEL, prompt="Once upon a time", temperature=0)
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == TINY_MODEL
    c = out.choices[0]
    assert (
        c.index == 0 and c.finish_reason == "length" and out.usage.completion_tokens == 16
    )  # default max_tokens
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens

    many = client.completions.create(
        model=TINY_MODEL, prompt=["Once upon a time", "The weather"], max_tokens=5, n=2, seed=4
    )
    assert [c.index for c in many.choices] == [0, 1, 2, 3] and many.usage.completion_tokens == 20
    again = client.completions.create(
        model=TINY_MODEL, prompt=["Once upon a time", "The weather"], max_tokens=5, n=2, seed=4
    )
    assert [c.text for c in again.choices] == [c.text for c in many.choices]

    echo = client.completions.create(
        model=TINY_MODEL, prompt="Once upon a time", max_tokens=4, temperature=0, echo=True
    )
    plain = client.completions.create(
        model=TINY_MODEL, prompt="Once upon a time", max_tokens=4, temperature=0
    )
    assert echo.choices[0].text == "Once upon a time" + plain.choices[0].text

    ids = client.completions.create(model=TINY_MODEL, prompt=[1, 2, 3], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3

    lp = client.completions.create(model=TINY_MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    info = lp.choices[0].logprobs
    assert "".join(info.tokens) == lp.choices[0].text and len(info.token_logprobs) == 4
    assert all(len(t) <= 2 for t in info.top_logprobs) and info.text_offset[0] == 0

    text = (
        client.completions.create(model=TINY_MODEL, prompt="Hello", max_tokens=20, temperature=0)
        .choices[0]
        .text
    )
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.completions.create(model=TINY_MODEL, prompt="Hello", max_tokens=20, temperature=0, stop=stop)
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[: text.index(stop)]


def test_streaming(client):
    full = client.completions.create(model=TINY_MODEL, prompt=["Hi", "Yo"], max_tokens=6, temperature=0)
    chunks = list(
        client.completions.create(
            model=TINY_MODEL,
            prompt=["Hi", "Yo"],
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = {0: "", 1: ""}
    finish = {}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert [texts[0], texts[1]] == [c.text for c in full.choices]
    assert finish == {0: "length", 1: "length"}
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_errors(client):
    cases = [
        (dict(prompt="x", suffix="y"), "suffix"),
        (dict(prompt=""), "prompt"),
        (dict(prompt=[999999]), "prompt"),
        (dict(prompt="x", logit_bias={"abc": 1}), "logit_bias"),
        (dict(prompt="x", echo=True, logprobs=1), "echo"),
        (dict(prompt="word " * 3000), "prompt"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=TINY_MODEL, **kwargs)
        assert e.value.body["param"] == param, e.value.body
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
