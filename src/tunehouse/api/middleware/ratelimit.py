"""Per-key rate limits as ASGI middleware: OpenAI's `x-ratelimit-*` headers on every authenticated
/v1 answer, and a 429 with `Retry-After` when a limit is reached. The buckets, the limits and the
token estimate are `tunehouse.usage.ratelimit`'s; this module is their HTTP side: who is calling,
the request body (read once for the estimate and replayed to the app), and the answer's headers."""

from __future__ import annotations

import hashlib
import math
import time

from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from tunehouse.api.deps import get_principal
from tunehouse.api.errors import error_body
from tunehouse.api.middleware import replaying
from tunehouse.errors import APIError
from tunehouse.usage.ratelimit import LIMITS_TTL, Decision, RateLimiter, charging, estimate_tokens

# The token-counted paths: their bodies are read for the estimate.
TOKEN_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
MAX_ESTIMATED_BODY = 8 * 1024 * 1024  # bodies beyond this are not read for the estimate


class RateLimitMiddleware:
    """Authenticated /v1 requests only: an unauthenticated one goes through untouched, and the
    route's own authentication answers it (401)."""

    def __init__(self, app, *, state):
        self.app = app
        self.state = state
        self.limiter = RateLimiter(state.settings, state.db)
        self._principals: dict[str, tuple[float, object]] = {}

    async def _principal(self, authorization: str):
        h = hashlib.sha256(authorization.encode()).hexdigest()
        cached = self._principals.get(h)
        if cached and time.monotonic() - cached[0] < LIMITS_TTL:
            return cached[1]
        try:
            principal = await run_in_threadpool(get_principal, self.state, authorization)
        except APIError:
            return None
        if len(self._principals) > 10_000:
            self._principals.clear()
        self._principals[h] = (time.monotonic(), principal)
        return principal

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        principal = await self._principal(authorization) if authorization else None
        if principal is None:
            return await self.app(scope, receive, send)

        tokens = None
        if scope["method"] == "POST" and scope["path"] in TOKEN_PATHS:
            body, receive = await _buffer_body(receive)
            tokens = estimate_tokens(body) if body is not None else 0
        decision, ticket = await run_in_threadpool(self.limiter.admit, principal, tokens=tokens)
        if not decision.allowed:
            return await self._refuse(decision, scope, receive, send)

        extra = [(k.encode(), v.encode()) for k, v in decision.headers.items()]

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = dict(message)
                hdrs = list(message.get("headers", [])) + extra
                # A 429 that is not ours is a quota (usage/quotas.py): retrying soon does not help.
                if message["status"] == 429 and not any(k.lower() == b"retry-after" for k, _ in hdrs):
                    hdrs.append((b"x-should-retry", b"false"))
                message["headers"] = hdrs
            await send(message)

        with charging(ticket):
            await self.app(scope, receive, send_with_headers)

    async def _refuse(self, decision: Decision, scope, receive, send):
        headers = dict(decision.headers)
        if decision.retry_after is not None:
            headers["retry-after"] = str(max(1, math.ceil(decision.retry_after)))
            headers["retry-after-ms"] = str(max(1, math.ceil(decision.retry_after * 1000)))
        else:
            headers["x-should-retry"] = "false"
        response = JSONResponse(
            error_body(decision.message, decision.type, None, "rate_limit_exceeded"),
            status_code=429,
            headers=headers,
        )
        await response(scope, receive, send)


async def _buffer_body(receive):
    """Read the whole body (for the estimate) and hand the app a receive that replays it."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            # The client went away: replay the disconnect to the app.
            async def gone(message=message):
                return message

            return None, gone
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        more = message.get("more_body", False)
    body = b"".join(chunks)
    return (body if size <= MAX_ESTIMATED_BODY else None), replaying(body, receive)
