"""Rate limits per API key: requests and tokens per minute, as token buckets.

Each key has two token buckets (capacity = the per-minute limit, refilled continuously at limit/60
per second). They live in this process: with several API server processes, each enforces the
limits on its own share of the traffic (document: divide the limits, or route a key to one
process). Limits come from the key's override, else its organization's, else the settings
(`TUNEHOUSE_RATE_LIMIT_REQUESTS_PER_MINUTE`, `…_TOKENS_PER_MINUTE`; 0 turns one off).

Tokens are counted for chat, completions and responses only. Before the request they are estimated
as (characters of the messages, prompt or input) / 4 + `max_completion_tokens`/`max_tokens`/
`max_output_tokens` (256 when unset), and taken from the bucket; after it, `record_inference`
reports the true count and the difference is given back or taken (`reconcile`). A background
response is metered after its request has ended: its estimate is given back then, its tokens
counted in usage but not against the per-minute token limit. A request that produced no tokens
(an error) gets its whole estimate back.

No HTTP here: `api/middleware/ratelimit.py` asks `RateLimiter.admit` per request, answers 429 with
OpenAI's `x-ratelimit-*` and `Retry-After` headers from the `Decision`, and runs the request inside
`charging(ticket)` so that the true count settles the estimate.
"""

from __future__ import annotations

import contextvars
import json
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy import select

from tunehouse.store.tables import ApiKeyRateLimit
from tunehouse.usage.quotas import effective_quotas

DEFAULT_COMPLETION_ESTIMATE = 256
LIMITS_TTL = 5.0  # seconds a key's limits (and who a key is) are cached


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
    reconcile_ticket(ticket, actual_tokens)


@contextmanager
def charging(ticket: Ticket | None) -> Iterator[None]:
    """Run one admitted request: `reconcile` inside settles its estimate with the true count, and
    an estimate still unsettled at the end (an error, no tokens) is given back whole."""
    token = _current.set(ticket)
    try:
        yield
    finally:
        _current.reset(token)
        if ticket is not None and not ticket.settled:
            reconcile_ticket(ticket, 0)


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
    text = req.get("messages", req.get("prompt", req.get("input", "")))
    prompt_chars = len(text) if isinstance(text, str) else len(json.dumps(text, ensure_ascii=False))
    n = req.get("n") if isinstance(req.get("n"), int) and req.get("n") > 0 else 1
    completion = req.get("max_completion_tokens") or req.get("max_tokens") or req.get("max_output_tokens")
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


def reconcile_ticket(ticket: Ticket, actual_tokens: int) -> None:
    """Settle `ticket`'s estimate with the true count: the difference is given back or taken."""
    ticket.settled = True
    ticket.limiter.adjust(ticket.ident, actual_tokens - ticket.estimated)
