"""One error shape on every path: {"error": {"message", "type", "param", "code"}}.

Our APIError family, FastAPI's request validation, unknown routes and unexpected exceptions all
end here. An unexpected exception is logged with its trace and answered as a plain 500 message.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunehouse.errors import APIError

log = logging.getLogger(__name__)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def api_error_response(exc: APIError) -> JSONResponse:
    headers = {"x-should-retry": "false"} if exc.status_code < 500 and exc.status_code != 429 else None
    return JSONResponse(
        error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status_code, headers=headers
    )


# Pydantic names the member of a union that failed ("literal['auto']", "int", "function-after[...]"):
# those are not fields, so they stay out of `param`.
_UNION_TAGS = {"int", "float", "str", "bool", "list", "dict", "none", "json-or-python", "constrained-int"}


def _is_field(part) -> bool:
    return isinstance(part, int) or not (part in _UNION_TAGS or "[" in part or "-" in part or "'" in part)


def _loc_to_param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form") and _is_field(p)]
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out += f"[{p}]" if p.isdigit() else f".{p}"
    return out


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_req: Request, exc: APIError):
        return api_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        param = _loc_to_param(tuple(first.get("loc", ())))
        # For a union ("auto" or a number) the most telling complaint is not the literal one.
        same_field = [e for e in errors if _loc_to_param(tuple(e.get("loc", ()))) == param]
        first = next((e for e in same_field if e.get("type") != "literal_error"), first)
        errors = [first] + [e for e in errors if _loc_to_param(tuple(e.get("loc", ()))) != param]
        msg = first.get("msg", "Invalid request")
        if first.get("type") == "missing":
            message = f"Missing required parameter: '{param}'."
            code = "missing_required_parameter"
        elif first.get("type") == "extra_forbidden":
            # A field the request type does not define: refused, never silently dropped.
            message = f"Unrecognized request argument supplied: '{param}'."
            code = "unknown_parameter"
        elif first.get("type") == "json_invalid":
            message = "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly.)"
            code = None
            param = None
        else:
            message = f"Invalid value for '{param}': {msg}." if param else f"Invalid request: {msg}."
            code = "invalid_value"
        if len(errors) > 1:
            message += f" ({len(errors) - 1} more problem(s) in this request.)"
        return JSONResponse(
            error_body(message, "invalid_request_error", param, code),
            status_code=400,
            headers={"x-should-retry": "false"},
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(req: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"Invalid URL ({req.method} {req.url.path})"
        elif exc.status_code == 405:
            message = f"Method {req.method} is not allowed for {req.url.path}"
        else:
            message = str(exc.detail)
        return JSONResponse(
            error_body(message, "invalid_request_error"), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(
            error_body(
                "The server had an error while processing your request. Sorry about that!", "server_error"
            ),
            status_code=500,
        )
