"""The HTTP server: the provider's native API and the OpenAI-compatible API (docs/spec/api.md).

`create_app(settings, models)` assembles the FastAPI app: the shared state, the API-key
check, the error handlers and the routes of native.py and openai.py; nothing lives at module
level. Each request is validated (pydantic, then SamplingParams and the chat format), turned
into a Generation of the model it names, and run by that model's Engine off the event loop; streamed and non-streamed responses
read the same events (docs/spec/sampling.md step 13).
"""
from collections.abc import Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from . import native, openai
from .errors import add_error_handlers, error_response
from .middleware import BodyLimit, ServerErrors
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

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if settings.api_key and request.url.path.startswith("/v1"):
            if request.headers.get("authorization") != f"Bearer {settings.api_key}":
                return error_response(request, 401, "missing or wrong API key (Authorization: Bearer ...)", None,
                                      "invalid_api_key", "authentication_error")
        return await call_next(request)

    app.add_middleware(ServerErrors, state=server)
    app.add_middleware(BodyLimit, max_body_bytes=settings.max_body_bytes)   # outermost: before anything reads

    @app.get("/health")
    async def health():
        engines = server.engines.values()
        return {"status": "ok", "models": sorted(server.models), "server_errors": server.server_errors,
                "generated_tokens": sum(engine.generated_tokens for engine in engines),
                "requests_in_flight": sum(engine.in_flight for engine in engines),
                "requests_waiting": sum(len(engine.waiting) for engine in engines),
                "running_sequences": sum(engine.running_sequences for engine in engines)}

    app.include_router(native.router)
    app.include_router(openai.router)
    return app
