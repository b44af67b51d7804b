"""What the routes share: the settings, the served models and the engine that runs each
one's generations.

`create_app` makes one `ServerState` and keeps it in `app.state.server`; a route asks for it
with `Depends(server_state)`. Nothing lives at module level.
"""
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import Request

from ..api import load_model
from ..errors import LlamaRefError
from .engine import GB, Busy, Engine
from .errors import APIError
from .metrics import Metrics

RESERVED_MEMORY = 2 * GB    # left to the OS, the Python heap and the activations


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: str = "default"                       # the name of a single model given to create_app
    aliases: dict[str, str] = field(default_factory=dict)   # alias -> served model name
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()                       # browser origins allowed to call; none by default
    price_per_mtoken: float = 0.0                            # dollars per million tokens, for estimated_cost
    max_batch: int = 8                                       # sequences decoded together
    max_queue: int = 8                                       # requests waiting for a place in the batch
    max_body_bytes: int = 2_000_000                          # larger request bodies get 413
    kv_cache_gb: float | None = None                         # None: the memory left after the weights, less 2 GB;
                                                             # shared equally by the served models
    prefix_cache_mb: float = 2048                            # kept prompt prefixes, inside kv_cache_gb
    pooling: str = "mean"                                    # embeddings: "mean" or "last" (llama_ref/embedding.py)
    normalize: bool = True                                   # embeddings: L2-normalised


def served_models(entries: list[str], served_model_name: str) -> dict[str, str]:
    """{served name: path} from --model values: NAME=PATH, or a bare PATH served as
    --served-model-name."""
    paths = {}
    for entry in entries or ["default"]:
        name, sep, path = entry.partition("=")
        name, path = (name, path) if sep else (served_model_name, entry)
        if not name or not path:
            raise LlamaRefError(f"--model {entry!r}: expected PATH or NAME=PATH")
        if name in paths:
            raise LlamaRefError(f"--model {entry!r}: the name {name!r} is served twice")
        paths[name] = path
    return paths


def load_served(paths: dict[str, str]) -> dict:
    """{served name: Model}, loaded on a passing thread. The kernels of a server run on its
    scheduler threads (engine.py), and libgomp gives each thread that starts parallel loops a
    pool of workers of its own; once there are more workers than cores, they sleep after each
    loop instead of spinning, and waking them costs more than a small loop: 70 µs a parallel
    loop instead of 2, an 8-sequence SmolLM2 step 157 ms instead of 53. Loading
    runs such loops; on a thread that then ends, its pool ends with it."""
    with ThreadPoolExecutor(1) as loader:
        models = loader.submit(lambda: {name: load_model(path) for name, path in paths.items()}).result()
    for name, model in models.items():
        if model.tokenizer is None:
            raise LlamaRefError(f"--model {paths[name]}: serving needs a tokenizer (tokenizer.model or tokenizer.json)")
    return models


def physical_memory() -> int:
    """Bytes of memory this process may use: the machine's, or its cgroup's limit if lower."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/sys/fs/cgroup/memory.max") as limit:
            text = limit.read().strip()
        return min(total, int(text)) if text.isdigit() else total
    except OSError:
        return total


def kv_cache_bytes(settings: ServerSettings, models) -> int:
    """The KV budget of all models together: as set, else what fits beside their weights
    leaving RESERVED_MEMORY (at least 1 GB)."""
    if settings.kv_cache_gb is not None:
        return int(settings.kv_cache_gb * GB)
    return max(GB, physical_memory() - sum(model.stored_bytes for model in models) - RESERVED_MEMORY)


class ServerState:
    def __init__(self, settings: ServerSettings, models: dict):
        self.settings = settings
        self.models = models                # served name -> Model
        unknown = set(settings.aliases.values()) - set(models)
        if unknown:
            raise ValueError(f"aliases: {', '.join(sorted(unknown))} is not a served model ({', '.join(models)})")
        share = kv_cache_bytes(settings, models.values()) // len(models)
        self.engines = {name: Engine(model, settings.max_batch, settings.max_queue, share,
                                     int(settings.prefix_cache_mb * (1 << 20))) for name, model in models.items()}
        self.names = {*models, *settings.aliases}
        self.metrics = Metrics(self.engines)
        self.webhooks: set = set()          # running deliveries, kept referenced until they finish
        self.server_errors = 0              # requests that failed on our side (middleware.ServerErrors)

    def check_model(self, name: str) -> str:
        """The served model's name for a name a request asked for; 404 for any other."""
        if name not in self.names:
            raise APIError(404, f"The model '{name}' does not exist; this server has: {', '.join(sorted(self.names))}",
                           "model", "model_not_found")
        return self.settings.aliases.get(name, name)

    def model(self, name: str):
        """The Model a request asked for by name or alias; 404 for any other."""
        return self.models[self.check_model(name)]

    def usage(self, result) -> dict:
        total = result.total_tokens
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                "total_tokens": total, "estimated_cost": total * self.settings.price_per_mtoken / 1e6}

    def admitted(self, work):
        """The events of the work (a Generation or an Embedding), run by its model's engine; a
        503 when the queue is full (and a 400, engine.TooLarge, when its worst case can never
        fit in the KV budget)."""
        engine = next(engine for engine in self.engines.values() if engine.batch.model is work.model)
        try:
            ticket = engine.admit(work)
        except Busy as err:
            raise APIError(503, f"the server is busy: {err}; retry shortly", None, "overloaded", "server_error",
                           {"Retry-After": "1"}) from None
        self.metrics.admitted(work.prompt_tokens)
        return self.metrics.timed(engine.events(ticket))

    @property
    def ready(self) -> bool:
        """Every model loaded (they are, once the app exists) and each would take a request now."""
        return all(engine.accepting for engine in self.engines.values())


def server_state(request: Request) -> ServerState:
    return request.app.state.server


def request_id(prefix: str = "") -> str:
    return prefix + secrets.token_urlsafe(18)
