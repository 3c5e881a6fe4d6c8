"""HTTP errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Services raise :class:`APIError` (or a :class:`tunesmith.errors.TunesmithError` from
the layers below, mapped here); the app's handlers turn both into JSON with the
right status. Request-validation problems (FastAPI's 422) are rewritten into one
400 message naming each field, never a raw pydantic dump.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.errors import ConfigError, DataError, NotFoundError, TunesmithError

log = logging.getLogger("tunesmith.service")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error the API returns to the client.

    Args:
        status: the HTTP status.
        message: what is wrong and what to do, for the caller.
        param: the request field at fault.
        code: OpenAI-style machine-readable code.
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def not_found(kind: str, object_id: str, param: str | None = None) -> APIError:
    """404 for an unknown id, or one of another project (the same answer, so nothing leaks)."""
    return APIError(404, f"No such {kind}: '{object_id}'.", param=param, code=f"{kind.replace(' ', '_')}_not_found")


def conflict(message: str, code: str = "invalid_state") -> APIError:
    """409: the object is in a state that does not allow the action."""
    return APIError(409, message, code=code)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400: the request itself is invalid."""
    return APIError(400, message, param=param, code=code)


def error_body(status: int, message: str, param: str | None, code: str | None) -> dict:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    """A JSON error response."""
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def from_tunesmith(exc: TunesmithError) -> APIError:
    """Map a lower layer's error to a status: not found → 404, everything else the caller can fix → 400."""
    message = exc.message
    problems = [p for p in getattr(exc, "problems", []) if p not in message]
    if problems:
        message = message + "\n" + "\n".join(problems)
    if exc.hint:
        message = f"{message}\nHint: {exc.hint}"
    if isinstance(exc, NotFoundError):
        return APIError(404, message, param=exc.param, code=exc.code or "not_found")
    if isinstance(exc, (ConfigError, DataError)):
        return APIError(400, message, param=exc.param, code=exc.code)
    return APIError(400, message, param=exc.param, code=exc.code)


def _field_path(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) if parts else "body"


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line per invalid field, and the first field's name as ``param``."""
    lines, first = [], None
    for err in exc.errors():
        field = _field_path(tuple(err.get("loc", ())))
        first = first or field
        lines.append(f"{field}: {err.get('msg', 'invalid value')}")
    return "Invalid request: " + "; ".join(lines), first


def install_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.message, exc.param, exc.code, headers)

    @app.exception_handler(TunesmithError)
    async def _tunesmith_error(_request: Request, exc: TunesmithError):
        mapped = from_tunesmith(exc)
        return error_response(mapped.status, mapped.message, mapped.param, mapped.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return error_response(400, message, param, "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return error_response(404, f"Unknown request URL: {_request.method} {_request.url.path}.",
                                  code="unknown_url")
        if exc.status_code == 405:
            return error_response(405, f"Method {_request.method} is not allowed on {_request.url.path}.",
                                  code="method_not_allowed")
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", _request.method, _request.url.path)
        return error_response(500, f"The server had an error while processing your request "
                                   f"({type(exc).__name__}).", code="server_error")
