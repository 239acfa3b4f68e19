"""Streaming multipart parsing: the upload goes to disk chunk by chunk, never whole in memory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header

from tunehouse.errors import InvalidRequest, PayloadTooLarge


@dataclass
class ParsedUpload:
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    bytes: int = 0


async def stream_multipart_to_file(
    content_type: str | None,
    body: AsyncIterator[bytes],
    dest: Path | Callable[[], BinaryIO],
    *,
    max_bytes: int,
    file_field: str = "file",
    expected: str = "a `file` and a `purpose`",
) -> ParsedUpload:
    """Parse a multipart body; the `file_field` part (`file`; `data` for an upload's part) is
    written to `dest` (a path, or a function that opens the binary file to write: a blob in
    storage), text parts are collected.

    Raises PayloadTooLarge as soon as the file part passes max_bytes (the partial file is the
    caller's to delete).
    """
    ctype, params = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise InvalidRequest(f"Expected a multipart/form-data body with {expected}.", param=file_field)

    result = ParsedUpload()
    state: dict = {"headers": {}, "name": None, "header_field": b"", "header_value": b"", "text": b""}
    out: list[BinaryIO | None] = [None]

    def on_part_begin():
        state.update(headers={}, name=None, text=b"")

    def on_header_field(data, start, end):
        state["header_field"] += data[start:end]

    def on_header_value(data, start, end):
        state["header_value"] += data[start:end]

    def on_header_end():
        state["headers"][state["header_field"].lower()] = state["header_value"]
        state["header_field"] = state["header_value"] = b""

    def on_headers_finished():
        _, disp = parse_options_header(state["headers"].get(b"content-disposition", b""))
        state["name"] = disp.get(b"name", b"").decode("utf-8", "replace")
        if state["name"] == file_field:
            result.filename = disp.get(b"filename", b"upload").decode("utf-8", "replace")
            out[0] = dest() if callable(dest) else open(dest, "wb")  # noqa: SIM115 - closed in on_part_end / finally

    def on_part_data(data, start, end):
        if state["name"] == file_field and out[0] is not None:
            result.bytes += end - start
            if result.bytes > max_bytes:
                raise PayloadTooLarge(f"File is too large: the limit is {max_bytes} bytes.", param=file_field)
            out[0].write(data[start:end])
        elif len(state["text"]) < 65536:
            state["text"] += data[start:end]

    def on_part_end():
        if state["name"] == file_field and out[0] is not None:
            out[0].close()
        elif state["name"]:
            result.fields[state["name"]] = state["text"].decode("utf-8", "replace")

    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        async for chunk in body:
            parser.write(chunk)
        parser.finalize()
    finally:
        if out[0] is not None and not out[0].closed:
            out[0].close()
    return result
