"""Rate limits per key: OpenAI's x-ratelimit-* headers on every authenticated response, and a 429
with Retry-After (the SDK's RateLimitError) once a key's requests or tokens per minute run out."""

import time

import openai
import pytest
from typer.testing import CliRunner

from tests.api.conftest import LiveServer, create_org_key
from tests.conftest import TINY_MODEL
from tunehouse.cli.main import app as cli_app


@pytest.fixture
def limited(settings):
    settings.local_worker = False
    settings.rate_limit_requests_per_minute = 3
    settings.rate_limit_tokens_per_minute = 1000
    with LiveServer(settings) as live:
        yield live


def test_requests_per_minute_headers_and_429(limited):
    key, other_key = create_org_key(limited.settings, "acme"), create_org_key(limited.settings, "acme")
    http = limited.http(key)
    remaining = []
    for _ in range(3):
        r = http.get("/v1/files")
        assert r.status_code == 200
        assert r.headers["x-ratelimit-limit-requests"] == "3"
        assert r.headers["x-ratelimit-limit-tokens"] == "1000"
        assert r.headers["x-ratelimit-reset-requests"].endswith("s")
        remaining.append(int(r.headers["x-ratelimit-remaining-requests"]))
    assert remaining == [2, 1, 0]

    r = http.get("/v1/files")
    assert r.status_code == 429
    assert 1 <= int(r.headers["retry-after"]) <= 20  # one request comes back every 20 s at 3/min
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    err = r.json()["error"]
    assert (err["type"], err["code"]) == ("requests", "rate_limit_exceeded")
    assert "Limit 3" in err["message"]
    with pytest.raises(openai.RateLimitError):
        limited.client(key).files.list()

    # Per key: another key of the same organization has its own buckets.
    assert limited.http(other_key).get("/v1/files").status_code == 200
    # No key, no limit to report: the 401 carries no rate-limit headers.
    r = limited.http("sk-wrong").get("/v1/files")
    assert r.status_code == 401 and "x-ratelimit-limit-requests" not in r.headers


def test_token_estimate_is_refused_when_too_large_and_given_back_after_an_error(limited):
    key = create_org_key(limited.settings, "acme")
    http = limited.http(key)
    # Larger than the whole minute's tokens: it could never run, and is not worth retrying.
    r = http.post(
        "/v1/chat/completions",
        json={"model": TINY_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000},
    )
    assert r.status_code == 429 and r.json()["error"]["type"] == "tokens"
    assert "retry-after" not in r.headers and r.headers["x-should-retry"] == "false"

    # A request that fails (unknown model) produced no tokens: its estimate is given back.
    r = http.post(
        "/v1/chat/completions",
        json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 800},
    )
    assert r.status_code == 404
    assert 0 < int(r.headers["x-ratelimit-remaining-tokens"]) <= 1000 - 800
    r = http.get("/v1/models")
    assert int(r.headers["x-ratelimit-remaining-tokens"]) >= 990


def test_limits_per_organization_and_per_key_from_the_cli(settings):
    from tunehouse.tenancy.auth import authenticate

    settings.local_worker = False
    with LiveServer(settings) as live:
        env = {"TUNEHOUSE_HOME": str(settings.home), "TUNEHOUSE_DATABASE_URL": settings.db_url}
        create_org_key(settings, "acme")
        r = CliRunner().invoke(
            cli_app, ["quotas", "set", "--org", "acme", "--requests-per-minute", "7"], env=env
        )
        assert r.exit_code == 0, r.output
        key = create_org_key(settings, "acme")  # a key not seen yet reads its limits at once
        assert live.http(key).get("/v1/files").headers["x-ratelimit-limit-requests"] == "7"

        # The key's own override wins over its organization's (once the few-second cache expires).
        with live.app.state.tunehouse.db.transaction() as s:
            key_id = authenticate(s, f"Bearer {key}", admin_key=None).key_id
        r = CliRunner().invoke(
            cli_app,
            ["quotas", "set", "--org", "acme", "--key", key_id, "--requests-per-minute", "unlimited"],
            env=env,
        )
        assert r.exit_code == 0, r.output
        deadline = time.time() + 30
        while "x-ratelimit-limit-requests" in live.http(key).get("/v1/files").headers:
            assert time.time() < deadline, "the key's override was not applied"
            time.sleep(1)
        # Tokens per minute still come from the settings.
        assert live.http(key).get("/v1/files").headers["x-ratelimit-limit-tokens"] == "10000000"


def test_a_streamed_chat_is_charged_its_real_tokens(settings):
    """The estimate taken before a stream is settled with the tokens the stream really used (not
    refunded to zero when the stream ends)."""
    settings.local_worker = False
    settings.rate_limit_tokens_per_minute = 600  # refills 10 tokens a second
    with LiveServer(settings) as live:
        key = create_org_key(settings, "acme")
        started = time.monotonic()
        stream = live.client(key).chat.completions.create(
            model=TINY_MODEL,
            messages=[{"role": "user", "content": "Say something."}],
            max_tokens=60,
            logit_bias={"2": -100},  # no end of turn: all 60 tokens
            stream=True,
            stream_options={"include_usage": True},
        )
        used = [c.usage for c in stream if c.usage is not None][-1].total_tokens
        time.sleep(0.5)  # the stream's end is settled just after its last chunk
        remaining = int(live.http(key).get("/v1/files").headers["x-ratelimit-remaining-tokens"])
        refilled = (time.monotonic() - started) * 10 + 1
        assert used >= 60
        assert 600 - used - 1 <= remaining <= 600 - used + refilled
