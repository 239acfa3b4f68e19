"""Rate limits per API key: requests and tokens per minute, OpenAI's `x-ratelimit-*` headers, and a
429 with `Retry-After` when a limit is reached.

Each key has two token buckets (capacity = the per-minute limit, refilled continuously at limit/60
per second). They live in this process: with several API server processes, each enforces the
limits on its own share of the traffic (document: divide the limits, or route a key to one
process). Limits come from the key's override, else its organization's, else the settings
(`TUNEHOUSE_RATE_LIMIT_REQUESTS_PER_MINUTE`, `…_TOKENS_PER_MINUTE`; 0 turns one off).

Tokens are counted for chat and completions only. Before the request they are estimated as
(characters of the messages or prompt) / 4 + `max_completion_tokens`/`max_tokens` (256 when
unset), and taken from the bucket; after it, `record_inference` reports the true count and the
difference is given back or taken (`reconcile`). A request that produced no tokens (an error) gets
its whole estimate back.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import math
import threading
import time
from dataclasses import dataclass, field

from sqlalchemy import select

from tunehouse.store.tables import ApiKeyRateLimit

TOKEN_PATHS = ("/v1/chat/completions", "/v1/completions")
DEFAULT_COMPLETION_ESTIMATE = 256
LIMITS_TTL = 5.0  # seconds a key's limits (and who a key is) are cached
MAX_ESTIMATED_BODY = 8 * 1024 * 1024  # bodies beyond this are not read for the estimate


class TokenBucket:
    def __init__(self, per_minute: int, now: float):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = float(per_minute)
        self.updated = now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, n: float) -> float:
        """Seconds until n can be taken (inf when n exceeds the capacity)."""
        if n > self.capacity:
            return math.inf
        return max(0.0, (n - self.level) / self.rate)

    def reset_seconds(self) -> float:
        """Seconds until the bucket is full again: OpenAI's `x-ratelimit-reset-*`."""
        return max(0.0, (self.capacity - self.level) / self.rate)

    def resize(self, per_minute: int) -> None:
        self.capacity, self.rate = float(per_minute), per_minute / 60.0
        self.level = min(self.level, self.capacity)


@dataclass
class Ticket:
    """What one request took, so that the true token count can be settled after it."""

    limiter: RateLimiter
    ident: str
    estimated: int
    settled: bool = False


@dataclass
class Decision:
    allowed: bool
    headers: dict[str, str] = field(default_factory=dict)
    retry_after: float | None = None
    message: str = ""
    type: str = "requests"


_current: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar("tunehouse_ratelimit", default=None)


def reconcile(actual_tokens: int) -> None:
    """Settle the current request's token estimate with the true count (see module doc)."""
    ticket = _current.get()
    if ticket is None or ticket.settled:
        return
    ticket.settled = True
    ticket.limiter.adjust(ticket.ident, actual_tokens - ticket.estimated)


def duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `1s`, `6m0s`, `1.5s`."""
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    minutes, secs = divmod(seconds, 60)
    secs_s = f"{round(secs, 3):g}s"
    return f"{int(minutes)}m{secs_s}" if minutes >= 1 else secs_s


def estimate_tokens(body: bytes) -> int:
    try:
        req = json.loads(body)
    except ValueError:
        return 0
    if not isinstance(req, dict):
        return 0
    text = req.get("messages", req.get("prompt", ""))
    prompt_chars = len(text) if isinstance(text, str) else len(json.dumps(text, ensure_ascii=False))
    n = req.get("n") if isinstance(req.get("n"), int) and req.get("n") > 0 else 1
    completion = req.get("max_completion_tokens") or req.get("max_tokens")
    if not isinstance(completion, int) or completion < 0:
        completion = DEFAULT_COMPLETION_ESTIMATE
    return prompt_chars // 4 + completion * n


class RateLimiter:
    """Buckets per key identity, behind one lock (each decision is a few arithmetic operations)."""

    def __init__(self, settings, db):
        self.settings = settings
        self.db = db
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._limits: dict[str, tuple[float, tuple[int | None, int | None]]] = {}

    def limits_for(self, principal) -> tuple[int | None, int | None]:
        """(requests, tokens) per minute for this caller; None: no limit."""
        ident = identity(principal)
        cached = self._limits.get(ident)
        if cached and time.monotonic() - cached[0] < LIMITS_TTL:
            return cached[1]
        from tunehouse.usage.quotas import effective_quotas

        with self.db.session() as s:
            q = effective_quotas(self.settings, s, principal.organization_id)
            rpm, tpm = q.requests_per_minute, q.tokens_per_minute
            if principal.key_id:
                row = s.scalar(select(ApiKeyRateLimit).where(ApiKeyRateLimit.key_id == principal.key_id))
                if row is not None:
                    if row.requests_per_minute is not None:
                        rpm = None if row.requests_per_minute < 0 else row.requests_per_minute
                    if row.tokens_per_minute is not None:
                        tpm = None if row.tokens_per_minute < 0 else row.tokens_per_minute
        limits = (rpm or None, tpm or None)
        self._limits[ident] = (time.monotonic(), limits)
        return limits

    def _bucket(self, ident: str, kind: str, per_minute: int, now: float) -> TokenBucket:
        b = self._buckets.get((ident, kind))
        if b is None:
            b = self._buckets[(ident, kind)] = TokenBucket(per_minute, now)
        elif b.capacity != per_minute:
            b.resize(per_minute)
        b.refill(now)
        return b

    def admit(self, principal, *, tokens: int | None) -> tuple[Decision, Ticket | None]:
        """Take one request (and `tokens`, for token-counted paths) from the caller's buckets."""
        rpm, tpm = self.limits_for(principal)
        ident = identity(principal)
        now = time.monotonic()
        with self._lock:
            req_b = self._bucket(ident, "requests", rpm, now) if rpm else None
            tok_b = self._bucket(ident, "tokens", tpm, now) if tpm else None
            need = tokens or 0
            wait_req = req_b.wait_for(1) if req_b else 0.0
            wait_tok = tok_b.wait_for(need) if (tok_b and tokens is not None) else 0.0
            allowed = wait_req == 0 and wait_tok == 0
            if allowed:
                if req_b:
                    req_b.level -= 1
                if tok_b and tokens is not None:
                    tok_b.level -= need
            headers = {}
            if req_b:
                headers |= {
                    "x-ratelimit-limit-requests": str(rpm),
                    "x-ratelimit-remaining-requests": str(max(0, int(req_b.level))),
                    "x-ratelimit-reset-requests": duration(req_b.reset_seconds()),
                }
            if tok_b:
                headers |= {
                    "x-ratelimit-limit-tokens": str(tpm),
                    "x-ratelimit-remaining-tokens": str(max(0, int(tok_b.level))),
                    "x-ratelimit-reset-tokens": duration(tok_b.reset_seconds()),
                }
        if allowed:
            ticket = Ticket(self, ident, need) if (tok_b and tokens is not None) else None
            return Decision(True, headers), ticket
        if wait_req > 0:
            used = rpm - max(0, int(req_b.level))
            return Decision(
                False,
                headers,
                retry_after=wait_req,
                message=f"Rate limit reached for requests per minute (RPM): Limit {rpm}, Used {used}, "
                f"Requested 1. Please try again in {duration(wait_req)}.",
                type="requests",
            ), None
        too_big = math.isinf(wait_tok)
        return Decision(
            False,
            headers,
            retry_after=None if too_big else wait_tok,
            message=(
                f"Request too large for tokens per min (TPM): Limit {tpm}, Requested {need} (estimated). "
                "Lower max_tokens or the prompt."
                if too_big
                else f"Rate limit reached for tokens per min (TPM): Limit {tpm}, Used {tpm - max(0, int(tok_b.level))}, "
                f"Requested {need} (estimated). Please try again in {duration(wait_tok)}."
            ),
            type="tokens",
        ), None

    def adjust(self, ident: str, delta: int) -> None:
        """Take `delta` more tokens (give back when negative); the level may go below zero, which
        delays the key's next requests by exactly the overdraft."""
        with self._lock:
            b = self._buckets.get((ident, "tokens"))
            if b is not None:
                b.refill(time.monotonic())
                b.level = min(b.capacity, b.level - delta)


def identity(principal) -> str:
    return principal.key_id or f"admin-key:{principal.organization_id}"


# --- the ASGI middleware ---------------------------------------------------------------------------


class RateLimitMiddleware:
    """Authenticated /v1 requests only: an unauthenticated one goes through untouched, and the
    route's own authentication answers it (401)."""

    def __init__(self, app, *, state):
        self.app = app
        self.state = state
        self.limiter = RateLimiter(state.settings, state.db)
        self._principals: dict[str, tuple[float, object]] = {}

    async def _principal(self, authorization: str):
        from starlette.concurrency import run_in_threadpool

        from tunehouse.api.deps import get_principal
        from tunehouse.errors import APIError

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

        from starlette.concurrency import run_in_threadpool

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

        token = _current.set(ticket)
        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            _current.reset(token)
            if ticket is not None and not ticket.settled:
                reconcile_ticket(ticket, 0)

    async def _refuse(self, decision: Decision, scope, receive, send):
        from fastapi.responses import JSONResponse

        from tunehouse.api.errors import error_body

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


def reconcile_ticket(ticket: Ticket, actual_tokens: int) -> None:
    ticket.settled = True
    ticket.limiter.adjust(ticket.ident, actual_tokens - ticket.estimated)


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
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return (body if size <= MAX_ESTIMATED_BODY else None), replay
