"""The HTTP server: the provider's native API and the OpenAI-compatible API (docs/spec/api.md).

`create_app(settings, model)` assembles the FastAPI app: the shared state, the API-key check,
the error handlers and the routes of native.py and openai.py; nothing lives at module level.
Each request is validated (pydantic, then SamplingParams and the chat format), turned into a
Generation, and run by the Engine off the event loop; streamed and non-streamed responses
read the same events (docs/spec/sampling.md step 13).
"""
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from . import native, openai
from .errors import add_error_handlers, error_response
from .middleware import BodyLimit, ServerErrors
from .state import ServerSettings, ServerState


def create_app(settings: ServerSettings, model) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        yield
        server.engine.close()

    app = FastAPI(title="llama-ref", description="Native and OpenAI-compatible APIs of a reference engine",
                  lifespan=lifespan)
    app.state.server = server = ServerState(settings, model)
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
        return {"status": "ok", "model": settings.served_model_name, "generated_tokens": server.engine.generated_tokens,
                "requests_in_flight": server.engine.in_flight, "requests_waiting": len(server.engine.waiting),
                "running_sequences": server.engine.running_sequences, "server_errors": server.server_errors}

    app.include_router(native.router)
    app.include_router(openai.router)
    return app
