"""The FastAPI application: TGI and OpenAI routes over the engines, health and metrics, and the
guard in front of them (bearer token, body size) with errors every client can read."""

from __future__ import annotations

import hmac
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from infuse import __version__
from infuse.serve import openai_api, tgi
from infuse.serve.metrics import Metrics
from infuse.serve.options import ServeOptions
from infuse.serve.registry import Registry
from infuse.serve.service import ApiError, Service

# Reachable without the API key: a liveness probe and the API description.
OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
# Endpoints counted by name in /metrics; anything else is counted as "other".
ROUTES = frozenset({"/", "/generate", "/generate_stream", "/invocations", "/info", "/health", "/metrics",
                    "/v1/models", "/v1/completions", "/v1/chat/completions"})


def build_app(registry: Registry, options: ServeOptions) -> FastAPI:
    """The ASGI app serving ``registry``'s models under ``options``' limits."""
    metrics = Metrics(registry)
    app = FastAPI(title="infuse", version=__version__,
                  description="Base models and their adapters behind TGI- and OpenAI-compatible routes.")
    app.state.service = Service(registry, options, metrics)
    app.include_router(tgi.router)
    app.include_router(openai_api.router)
    app.add_api_route("/health", health, methods=["GET"], tags=["ops"])
    app.add_api_route("/info", info, methods=["GET"], tags=["ops"])
    app.add_api_route("/metrics", prometheus, methods=["GET"], tags=["ops"], response_class=PlainTextResponse)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_middleware(Guard, api_key=options.api_key, max_body_bytes=options.max_body_bytes, metrics=metrics)
    return app


async def health(request: Request) -> dict:
    """Liveness and load: running and waiting requests per engine."""
    service: Service = request.app.state.service
    engines = {e.name: {"running": e.load[0], "waiting": e.load[1]} for e in service.registry.engines}
    return {"status": "ok", "models": list(service.registry.models), "engines": engines}


async def info(request: Request) -> dict:
    """What TGI's /info reports, for clients that ask before they send."""
    service: Service = request.app.state.service
    default = service.registry.default
    return {"model_id": default.name, "models": {m.name: {"base": m.base, "adapter": m.adapter_path,
                                                          "context_length": m.context_length}
                                                 for m in service.registry.models.values()},
            "max_input_tokens": service.input_limit(default),
            "max_new_tokens": service.options.max_new_tokens, "version": __version__, "router": "infuse"}


async def prometheus(request: Request) -> PlainTextResponse:
    """Counters and gauges in the Prometheus text format."""
    text = request.app.state.service.metrics.render()
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


# ---------------------------------------------------------------- errors


def error_response(path: str, status: int, message: str, kind: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error shape under /v1, TGI's elsewhere. A request the server cannot take as it is
    is a 400 invalid_request_error in OpenAI's API (what its clients raise BadRequestError for) and
    a 422 validation error in TGI's."""
    invalid = kind in ("validation", "invalid_request_error")
    if path.startswith("/v1/"):
        status, kind = (400, "invalid_request_error") if invalid and status == 422 else (status, kind)
        body: dict = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    else:
        body = {"error": message, "error_type": "validation" if invalid else kind}
    return JSONResponse(body, status_code=status, headers=headers)


async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return error_response(request.url.path, error.status, error.message, error.kind, error.headers)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return error_response(request.url.path, 422, readable(error.errors()), "validation")


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    return error_response(request.url.path, error.status_code, str(error.detail), "http", error.headers)


def readable(errors: list[dict]) -> str:
    """pydantic's error list as one sentence: ``parameters.top_p: Input should be ...; ...``."""
    parts = []
    for error in errors:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        text = f"{where}: {error.get('msg')}" if where else str(error.get("msg"))
        if text not in parts:
            parts.append(text)
    return "Invalid request: " + "; ".join(parts) + "."


# ---------------------------------------------------------------- guard


class Guard:
    """ASGI middleware in front of every route: the bearer token, the body size limit, and the
    request counters. The body is read here, up to the limit, and replayed to the app."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int, metrics: Metrics):
        self.app, self.api_key, self.max_body_bytes, self.metrics = app, api_key, max_body_bytes, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, started, status = scope["path"], time.perf_counter(), [500]

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is None:
                body = await _read_body(receive, self.max_body_bytes)
                if body is None:
                    refusal = self._too_large(path)
            if refusal is not None:
                await refusal(scope, receive, counted_send)
                return
            await self.app(scope, _replay(body, receive), counted_send)
        finally:
            endpoint = path if path in ROUTES else "other"
            self.metrics.record_request(endpoint, status[0], time.perf_counter() - started)

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        path = scope["path"]
        if self.api_key and path not in OPEN_PATHS and not self._authorized(scope):
            return error_response(path, 401, "Missing or wrong API key: send the header "
                                             "'Authorization: Bearer <key>'.", "authentication_error",
                                  {"WWW-Authenticate": "Bearer"})
        length = dict(scope["headers"]).get(b"content-length")
        if length and length.isdigit() and int(length) > self.max_body_bytes:
            return self._too_large(path)
        return None

    def _too_large(self, path: str) -> JSONResponse:
        return error_response(path, 413, f"The request body is larger than {self.max_body_bytes} bytes "
                                         "(--max-body-bytes).", "payload_too_large")

    def _authorized(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                  self.api_key.encode())


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None once it grows past ``limit`` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return None
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands out the body read by the guard, then passes on (disconnect notices)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


