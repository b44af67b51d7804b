"""What the routes share: the settings, the model and the engine that runs its generations.

`create_app` makes one `ServerState` and keeps it in `app.state.server`; a route asks for it
with `Depends(server_state)`. Nothing lives at module level.
"""
import secrets
from dataclasses import dataclass, field

from fastapi import Request

from ..decoding.generation import Generation
from .engine import Busy, Engine
from .errors import APIError


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: str = "default"
    aliases: dict[str, str] = field(default_factory=dict)   # alias -> served model name
    api_key: str | None = None
    price_per_mtoken: float = 0.0                            # dollars per million tokens, for estimated_cost
    max_queue: int = 8                                       # requests running or waiting
    max_body_bytes: int = 2_000_000                          # larger request bodies get 413


class ServerState:
    def __init__(self, settings: ServerSettings, model):
        self.settings = settings
        self.model = model
        self.engine = Engine(settings.max_queue)
        self.names = {settings.served_model_name, *settings.aliases}
        self.webhooks: set = set()          # running deliveries, kept referenced until they finish
        self.server_errors = 0              # requests that failed on our side (middleware.ServerErrors)

    def check_model(self, name: str) -> str:
        """The served model's name for a name a request asked for; 404 for any other."""
        if name not in self.names:
            raise APIError(404, f"The model '{name}' does not exist; this server has: {', '.join(sorted(self.names))}",
                           "model", "model_not_found")
        return self.settings.served_model_name

    def usage(self, result) -> dict:
        total = result.total_tokens
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                "total_tokens": total, "estimated_cost": total * self.settings.price_per_mtoken / 1e6}

    def admitted(self, generation: Generation):
        """The generation's events, run by the engine; a 503 when its queue is full."""
        try:
            self.engine.admit()
        except Busy as err:
            raise APIError(503, f"the server is busy: {err}; retry shortly", None, "overloaded", "server_error",
                           {"Retry-After": "1"}) from None
        return self.engine.events(generation)


def server_state(request: Request) -> ServerState:
    return request.app.state.server


def request_id(prefix: str = "") -> str:
    return prefix + secrets.token_urlsafe(18)
