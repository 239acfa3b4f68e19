"""The sender: delivers the outbox's due rows, signed the Standard Webhooks way, with retries.

A delivery is claimed by a conditional update (its `next_attempt_at` moves past the send's
timeout and its attempt count goes up), so several server processes can run senders without
sending a row twice at once. A 2xx answer marks it delivered; anything else (an error status, a
timeout, a refused connection) schedules attempt n+1 after base × 2^(n-1) seconds, until
`webhook_max_attempts`, when it is marked failed. Every attempt carries the same `webhook-id`
(the event id), so a receiver can drop duplicates.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time

import httpx2 as httpx
from sqlalchemy import select, update
from standardwebhooks.webhooks import Webhook

from tunehouse.config import Settings
from tunehouse.store.engine import Database
from tunehouse.store.tables import WebhookDelivery, WebhookEndpoint, now

log = logging.getLogger(__name__)
BATCH = 20


def signed_headers(secret: str, *, msg_id: str, body: str, timestamp: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else timestamp
    signature = Webhook(secret).sign(msg_id, dt.datetime.fromtimestamp(ts, dt.UTC), body)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": signature,
        "content-type": "application/json",
        "user-agent": "tunehouse-webhooks",
    }


class WebhookSender:
    def __init__(self, settings: Settings, db: Database):
        self.settings = settings
        self.db = db
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = httpx.Client(timeout=settings.webhook_timeout_seconds, follow_redirects=False)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="tunehouse-webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.webhook_timeout_seconds + 5)
        self._client.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                while self.run_once() and not self._stop.is_set():
                    pass
            except Exception:  # a database hiccup must not end delivery; the next round retries
                log.exception("webhook delivery round failed")
            self._stop.wait(self.settings.webhook_poll_seconds)

    def _claim(self) -> list[tuple[WebhookDelivery, WebhookEndpoint, int]]:
        t = time.time()
        lease = t + self.settings.webhook_timeout_seconds + 30
        claimed = []
        with self.db.transaction() as s:
            due = s.execute(
                select(WebhookDelivery, WebhookEndpoint)
                .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
                .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= t)
                .order_by(WebhookDelivery.next_attempt_at)
                .limit(BATCH)
            ).all()
            for d, e in due:
                attempt = d.attempts + 1
                n = s.execute(
                    update(WebhookDelivery)
                    .where(
                        WebhookDelivery.id == d.id,
                        WebhookDelivery.status == "pending",
                        WebhookDelivery.next_attempt_at == d.next_attempt_at,
                    )
                    .values(next_attempt_at=lease, attempts=WebhookDelivery.attempts + 1)
                ).rowcount
                if n:
                    claimed.append((d, e, attempt))
        return claimed

    def run_once(self) -> int:
        """Send what is due now; returns how many were attempted."""
        claimed = self._claim()
        for d, e, attempt in claimed:
            self._send(d, e, attempt=attempt)
        return len(claimed)

    def _send(self, d: WebhookDelivery, e: WebhookEndpoint, *, attempt: int) -> None:
        code, error = None, None
        try:
            r = self._client.post(
                e.url,
                content=d.payload.encode(),
                headers=signed_headers(e.secret, msg_id=d.event_id, body=d.payload),
            )
            code = r.status_code
            if not 200 <= code < 300:
                error = f"HTTP {code}"
        except Exception as exc:  # any transport failure is a failed attempt, retried
            error = f"{type(exc).__name__}: {exc}"[:500]
        values: dict = {"last_status_code": code, "last_error": error}
        if error is None:
            values |= {"status": "delivered", "delivered_at": now()}
        elif attempt >= self.settings.webhook_max_attempts:
            values |= {"status": "failed"}
            log.warning("webhook %s to %s failed after %d attempts: %s", d.event_id, e.url, attempt, error)
        else:
            delay = self.settings.webhook_retry_base_seconds * 2 ** (attempt - 1)
            values |= {"next_attempt_at": time.time() + delay}
        with self.db.transaction() as s:
            s.execute(update(WebhookDelivery).where(WebhookDelivery.id == d.id).values(**values))
