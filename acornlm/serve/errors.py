"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with a fitting status.

Clients such as the `openai` package turn the status into an exception class (400 BadRequestError,
401 AuthenticationError, 404 NotFoundError, 422 UnprocessableEntityError, 429 RateLimitError, ...)
and show `message`, so every message says what was wrong and how to fix it. No response ever
carries a traceback: unexpected failures are logged on the server and answered with a short 500.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse


class APIError(Exception):
    """An HTTP error answered as OpenAI does."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key")


def not_found(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(404, message, param=param, code=code)


def request_timeout(message: str) -> APIError:
    return APIError(408, message, code="request_timeout")


def unsupported_media_type(message: str) -> APIError:
    return APIError(415, message, code="unsupported_media_type")


def too_large(message: str) -> APIError:
    return APIError(413, message, code="request_too_large")


def unprocessable(message: str, param: str | None = None) -> APIError:
    return APIError(422, message, param=param, code="invalid_type")


def too_many_requests(message: str) -> APIError:
    return APIError(429, message, type="rate_limit_error", code="rate_limit_exceeded")


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="service_unavailable")


def internal_error() -> APIError:
    return APIError(500, "the server failed to handle this request; see the server log", type="server_error",
                    code="internal_error")
