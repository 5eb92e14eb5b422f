"""The FastAPI app: routes, the guard middleware (API key, draining, body size) and the
lifespan that starts and stops the engine thread.

`build_app(engine, options)` takes an already loaded LLMEngine, so loading errors surface
before the port is bound. Bodies are parsed here (not by FastAPI) so every malformed request
gets a 400 in OpenAI's shape rather than FastAPI's 422.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

import turbollm
from turbollm.engine.async_engine import AsyncEngine
from turbollm.engine.llm_engine import LLMEngine
from turbollm.server import chat, completions
from turbollm.server.errors import (
    APIError,
    api_error_handler,
    error_body,
    from_validation_error,
    http_error_handler,
    unexpected_error_handler,
)
from turbollm.server.metrics import CONTENT_TYPE, ServerMetrics
from turbollm.server.options import ServerOptions
from turbollm.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    dump,
)
from turbollm.server.serving import Serving

M = TypeVar("M", bound=BaseModel)
_OPEN_PATHS = ("/health",)


def build_app(engine: LLMEngine, options: ServerOptions) -> FastAPI:
    """The ASGI app serving `engine`; the engine thread runs while the app's lifespan does."""
    async_engine = AsyncEngine(engine, max_queue=options.max_queue)
    metrics = ServerMetrics(lambda: async_engine.stats)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        app.state.serving = Serving(async_engine, options, metrics)
        try:
            yield
        finally:
            async_engine.shutdown()

    app = FastAPI(title="turbollm", version=turbollm.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)
    app.add_middleware(GuardMiddleware, options=options)
    _add_routes(app)
    return app


def _serving(request: Request) -> Serving:
    return request.app.state.serving  # type: ignore[no-any-return]


def _add_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request) -> Response:
        s = _serving(request)
        if s.draining or not s.engine.is_alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": turbollm.__version__})

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        s = _serving(request)
        return JSONResponse(dump(ModelList(data=[ModelCard(id=s.model_name, max_model_len=s.max_model_len)])))

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(_serving(request).metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        s = _serving(request)
        body = await parse_body(request, TokenizeRequest)
        s.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if body.messages is not None:
            ids = await s.render_chat(body.messages, add_generation_prompt=True)
        else:
            ids = await s.tokenize(body.prompt or "", add_special_tokens=body.add_special_tokens)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": s.max_model_len})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        s = _serving(request)
        body = await parse_body(request, DetokenizeRequest)
        s.check_model(body.model)
        return JSONResponse({"prompt": await s.decode(body.tokens)})

    @app.post("/v1/completions")
    async def create_completion(request: Request) -> Response:
        body = await parse_body(request, CompletionRequest)
        return await completions.create_completion(_serving(request), request, body)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: Request) -> Response:
        body = await parse_body(request, ChatCompletionRequest)
        return await chat.create_chat_completion(_serving(request), request, body)


async def parse_body(request: Request, model: type[M]) -> M:
    """Read the body (within the size cap), parse JSON, validate into `model`; 400/413 else."""
    limit = _serving(request).options.max_body_bytes
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    try:
        obj: Any = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(obj).__name__}",
                       code="invalid_json")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise from_validation_error(e) from None


class GuardMiddleware:
    """Before any route: API key (constant-time), draining (503), declared body size (413)."""

    def __init__(self, app: ASGIApp, options: ServerOptions) -> None:
        self.app = app
        self.options = options
        self._key = f"Bearer {options.api_key}".encode() if options.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        err = self._check(scope)
        if err is not None:
            status, body, headers = err
            await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check(self, scope: Scope) -> tuple[int, dict, dict[str, str]] | None:
        path: str = scope["path"]
        headers = dict(scope["headers"])
        if self._key is not None and path not in _OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self._key):
                msg = "a valid API key is required (Authorization: Bearer <key>)"
                return 401, error_body(401, msg, code="invalid_api_key"), {"WWW-Authenticate": "Bearer"}
        state = scope["app"].state if "app" in scope else None
        serving = getattr(state, "serving", None) if state is not None else None
        if serving is not None and serving.draining and path not in _OPEN_PATHS:
            return 503, error_body(503, "the server is shutting down", code="shutting_down"), {
                "Retry-After": "5", "Connection": "close"}
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return 400, error_body(400, "bad Content-Length header"), {}
            if size > self.options.max_body_bytes:
                msg = f"the request body is larger than {self.options.max_body_bytes} bytes"
                return 413, error_body(413, msg, code="body_too_large"), {"Connection": "close"}
        return None
