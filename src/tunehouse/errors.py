"""The errors services raise. api/errors.py turns each into OpenAI's {"error": {...}} shape.

Never use 409 for a state conflict: the SDK retries 409. State conflicts are 400.
"""

from __future__ import annotations


class APIError(Exception):
    status_code = 500
    type = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code


class InvalidRequest(APIError):
    status_code = 400
    type = "invalid_request_error"


class Unauthorized(APIError):
    status_code = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDenied(APIError):
    status_code = 403
    type = "invalid_request_error"


class NotFound(APIError):
    status_code = 404
    type = "invalid_request_error"


class ModelNotFound(NotFound):
    default_code = "model_not_found"

    def __init__(self, model: str, *, param: str | None = "model"):
        super().__init__(f"The model `{model}` does not exist or you do not have access to it.", param=param)


class PayloadTooLarge(APIError):
    status_code = 413
    type = "invalid_request_error"
    default_code = "file_too_large"


class RateLimited(APIError):
    status_code = 429
    type = "rate_limit_error"


class ServiceUnavailable(APIError):
    status_code = 503
    type = "server_error"
