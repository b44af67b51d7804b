"""The HTTP server: the provider's native API and the OpenAI-compatible API (docs/spec/api.md).

`create_app(settings, models)` assembles the FastAPI app: the shared state, the API-key
check, the error handlers and the routes of native.py and openai.py; nothing lives at module
level. Each request is validated (pydantic, then SamplingParams and the chat format), turned
into a Generation of the model it names, and run by that model's Engine off the event loop; streamed and non-streamed responses
read the same events (docs/spec/sampling.md step 13).
"""
import hmac
from collections.abc import Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import native, openai, playground
from .errors import add_error_handlers, error_response
from .middleware import BodyLimit, RequestLog, ServerErrors
from .responses import Health, Ready
from .state import ServerSettings, ServerState


def create_app(settings: ServerSettings, models) -> FastAPI:
    """models: {served name: Model}, or one Model served as settings.served_model_name."""
    @asynccontextmanager
    async def lifespan(app):
        yield
        for engine in server.engines.values():
            engine.close()

    app = FastAPI(title="llama-ref", description="Native and OpenAI-compatible APIs of a reference engine",
                  lifespan=lifespan)
    models = models if isinstance(models, Mapping) else {settings.served_model_name: models}
    app.state.server = server = ServerState(settings, dict(models))
    add_error_handlers(app)

    expected = f"Bearer {settings.api_key}".encode()

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        # compare_digest: the time taken does not tell how much of a guessed key was right
        if settings.api_key and request.url.path.startswith("/v1"):
            if not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
                return error_response(request, 401, "missing or wrong API key (Authorization: Bearer ...)", None,
                                      "invalid_api_key", "authentication_error")
        return await call_next(request)

    app.add_middleware(ServerErrors, state=server)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, max_body_bytes=settings.max_body_bytes)   # before anything reads the body
    app.add_middleware(RequestLog, metrics=server.metrics)                   # outermost: sees every answer

    @app.get("/health", responses={200: {"model": Health}})
    async def health():
        engines = server.engines.values()
        return {"status": "ok", "models": sorted(server.models), "server_errors": server.server_errors,
                "generated_tokens": sum(engine.generated_tokens for engine in engines),
                "requests_in_flight": sum(engine.in_flight for engine in engines),
                "requests_waiting": sum(len(engine.waiting) for engine in engines),
                "running_sequences": sum(engine.running_sequences for engine in engines)}

    @app.get("/ready", responses={200: {"model": Ready}, 503: {"model": Ready, "description": "a queue is full"}})
    async def ready():
        """For orchestrators: 200 while the models are loaded and no queue is full, else 503."""
        return JSONResponse({"status": "ready" if server.ready else "busy"}, 200 if server.ready else 503)

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}})
    async def metrics():
        return PlainTextResponse(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(native.router)
    app.include_router(openai.router)
    app.include_router(playground.router)
    return app
