"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Handlers raise APIError; the app's exception handlers turn it (and pydantic, Starlette and
unexpected errors) into JSON responses. No response ever carries a traceback or a memory
address: unexpected errors are logged and answered with a fixed message.
"""

from __future__ import annotations

import json
import logging
import re

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from turbollm.engine.async_engine import EngineDeadError

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error answered to the client as-is (the message must be safe to show)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The JSON body of an error response (also used for in-stream error frames)."""
    return {"error": {"message": _scrub(message), "type": _TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def stream_error_frame(err: Exception) -> bytes:
    """The SSE frame for an error after a stream started (the caller then sends [DONE])."""
    if isinstance(err, APIError):
        body = error_body(err.status, err.message, err.param, err.code)
    elif isinstance(err, EngineDeadError):
        body = error_body(503, str(err), code="engine_unavailable")
    else:
        logger.error("error in a stream", exc_info=err)
        body = error_body(500, "internal server error")
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.param, err.code),
                        status_code=err.status, headers=err.headers)


_ADDR = re.compile(r"0x[0-9a-fA-F]{6,}")


def _scrub(message: str) -> str:
    """Drop memory addresses (object reprs) from a message; cap its length."""
    message = _ADDR.sub("0x…", message)
    return message if len(message) <= 2000 else message[:2000] + "…"


def from_validation_error(err: ValidationError) -> APIError:
    """400 naming the first bad field of a request body."""
    first = err.errors(include_url=False)[0]
    loc = [str(p) for p in first.get("loc", ()) if not isinstance(p, int)]
    # pydantic reports union branches as loc parts ("str", "list[int]"); keep field names only.
    loc = [p for p in loc if not re.match(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|function.*)$", p)]
    param = ".".join(loc) or None
    got = first.get("input")
    shown = json.dumps(got)[:200] if _jsonable(got) else type(got).__name__
    msg = f"{param or 'body'}: {first.get('msg', 'invalid value')} (got {shown})"
    return APIError(400, msg, param=param)


def _jsonable(value: object) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def from_value_error(err: ValueError, known_params: set[str]) -> APIError:
    """400 for a ValueError from SamplingParams / the engine; `param` is the field it names."""
    msg = str(err)
    first = re.split(r"[\s\[]", msg, maxsplit=1)[0]
    return APIError(400, msg, param=first if first in known_params else None)


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    msg = {404: f"no route {request.url.path!r}", 405: f"method {request.method} is not allowed on "
           f"{request.url.path!r}"}.get(exc.status_code, str(exc.detail))
    return error_response(APIError(exc.status_code, msg, headers=dict(exc.headers or {})))


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s", request.url.path)
    return JSONResponse(error_body(500, "internal server error"), status_code=500)
