"""OpenAI-style errors: every failure a client can cause answers `{"error": {...}}` with a 4xx.

OpenAI's API reports errors as `{"error": {"message", "type", "param", "code"}}`, and its clients
(the `openai` package, chat front ends) show `message` to the user. This module is the one place
that builds that body: `APIError` for the failures the routes detect themselves, and handlers that
turn FastAPI's own responses into it too. FastAPI answers a body that does not validate with 422
and its own list of problems; here that becomes a 400 naming the first bad field, as OpenAI does.
Malformed JSON is a 400 too, an unknown route a 404, and any exception nobody expected a 500 with
one line, so no request can take the server down or leak a traceback.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moecli.errors import first_line

log = logging.getLogger("moecli.serve")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_exceeded",
         500: "server_error", 503: "server_error"}


UNION_TAGS = {"str", "int", "float", "bool", "list", "dict"}


class APIError(Exception):
    """A request that cannot be served: its HTTP status and the OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def field_name(loc) -> str | None:
    """pydantic's error location ("body", "messages", 0, "content") as "messages[0].content"."""
    out = ""
    for part in loc:
        if (part == "body" and not out) or (isinstance(part, str) and ("[" in part or part in UNION_TAGS)):
            continue  # pydantic names the union member it tried ("str", "list[str]"): not a field
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def validation_message(error: dict) -> tuple[str, str | None]:
    """One line for pydantic's first error: "messages[0].content: must be a string or ..."."""
    if error.get("type") == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON{f' ({detail})' if detail else ''}", None
    param = field_name(error.get("loc", ()))
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if error.get("type") == "missing":
        message = "is required"
    elif error.get("type") == "extra_forbidden":
        message = "is not a field this server knows"
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app can answer, in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        message, param = validation_message(errors[0]) if errors else ("invalid request", None)
        return bad_request(message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = err.detail if isinstance(err.detail, str) else "request failed"
        if err.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif err.status_code == 405:
            message = f"{request.url.path} does not take {request.method}"
        return APIError(err.status_code, message).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return APIError(500, f"internal error: {type(err).__name__}: {first_line(err)}").response()
