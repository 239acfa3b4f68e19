"""Limits on JSON request bodies, checked before anything parses them.

Python's json module recurses once per nesting level, so a body like `[[[[...]]]]` 100,000 deep
raises RecursionError wherever it is parsed (a route, a middleware counting tokens): that must be
a 400, not a 500. A huge body is a 413 before it is held in memory whole. File uploads are
multipart and stream to disk (files/upload.py), so they are not touched here.
"""

from __future__ import annotations

import json
import re

from tunehouse.api.errors import error_body
from tunehouse.api.middleware import replaying

MAX_JSON_BODY_BYTES = 16 * 1024 * 1024
MAX_JSON_DEPTH = 256
_SPECIAL = re.compile(rb'["\\\[\]{}]')


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in `body` (brackets inside strings do not count)."""
    # Fast path: fewer opening brackets than the limit cannot nest deeper than it.
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return 0
    depth = deepest = 0
    in_string = False
    skip = -1
    for m in _SPECIAL.finditer(body):
        pos, ch = m.start(), m.group()
        if pos == skip:
            continue
        if in_string:
            if ch == b"\\":
                skip = pos + 1
            elif ch == b'"':
                in_string = False
        elif ch == b'"':
            in_string = True
        elif ch in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


class JsonBodyGuard:
    """Pure ASGI middleware: buffers JSON bodies (bounded), refuses too large or too deep ones,
    and replays the body to the app unchanged."""

    def __init__(self, app, *, max_bytes: int = MAX_JSON_BODY_BYTES, max_depth: int = MAX_JSON_DEPTH):
        self.app = app
        self.max_bytes = max_bytes
        self.max_depth = max_depth

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if b"multipart/" in headers.get(b"content-type", b""):
            return await self.app(scope, receive, send)
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send, 413, f"The request body is larger than {self.max_bytes} bytes.")
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._refuse(
                    send, 413, f"The request body is larger than {self.max_bytes} bytes."
                )
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if json_depth(body) > self.max_depth:
            return await self._refuse(
                send,
                400,
                f"The JSON body is nested more than {self.max_depth} levels deep.",
                code="invalid_json",
            )
        return await self.app(scope, replaying(body, receive), send)

    @staticmethod
    async def _refuse(send, status: int, message: str, code: str | None = None) -> None:
        if status == 413:
            code = "request_too_large"
        payload = json.dumps(error_body(message, "invalid_request_error", None, code)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"x-should-retry", b"false"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
