"""Replicas on Ray Serve behind one endpoint (docs/scale-out.md); the optional extra `[ray]`.

Two deployments:
- `Replica`, one process each: it loads the models itself and runs the very app of
  `llama-ref serve` (server/app.py `create_app`), called in-process as an ASGI app, so every
  route, stream and error is unchanged. Its health check is the scheduler threads' liveness.
- `Ingress`, Ray's HTTP entry: it reads a request, keys it by the start of its conversation
  (`affinity_key`), and hands it to the replica `PrefixAffinityRouter` picks for that key, so
  the turns of one chat land where their prefix is cached (server/engine.py). It streams the
  replica's answer back and turns a replica that dies mid-request into a clean error: a JSON
  503 before the answer started, a final error event once a stream has.

Start it with `llama-ref serve --ray` (serve_on_ray) or `serve run deploy/ray-serve.yaml`
(app_builder).
"""
import asyncio
import hashlib
import json
import signal
import threading

import numba
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import FIFOMixin, RequestRouter

from ..server import ServerSettings, create_app
from ..server.errors import error_body, is_native
from ..server.state import load_served, served_models

REPLICA_HEADER = "x-llama-ref-replica"      # which replica answered (its Ray replica id)
AFFINITY_CHARS = 512                        # of a raw prompt, the part that names its conversation
HOP_BY_HOP = {b"content-length", b"transfer-encoding", b"connection"}
# Ray's proxy sets its own x-request-id; the replica's, which its access log shows, keeps another name.
RENAMED = {b"x-request-id": b"x-llama-ref-request-id"}


def affinity_key(body: bytes) -> str:
    """What names a request's conversation: the model and the chat's first two messages (the
    system prompt and the first user turn), or the first AFFINITY_CHARS of a raw prompt. Later
    turns resend the same start, so they get the same key; "" for anything else (no affinity)."""
    try:
        request = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(request, dict):
        return ""
    start = request.get("messages", [])[:2] if isinstance(request.get("messages"), list) else \
        str(request.get("prompt") or request.get("input") or "")[:AFFINITY_CHARS]
    return json.dumps([request.get("model"), start], sort_keys=True) if start else ""


async def next_message(messages: asyncio.Queue, app: asyncio.Task):
    """The app's next ASGI message, or None once the app has returned without another (its
    exception, if it raised)."""
    get = asyncio.ensure_future(messages.get())
    await asyncio.wait({get, app}, return_when=asyncio.FIRST_COMPLETED)
    if get.done():
        return get.result()
    get.cancel()
    app.result()
    return None


async def relayed(chunks, streaming: bool, native: bool):
    """The replica's chunks; if it dies mid-stream, a last event carrying the error, as our
    server ends a stream that breaks off (server/errors.py ending_with_error)."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as err:
        if streaming:
            message = f"the replica serving this stream failed ({type(err).__name__}); the answer is incomplete"
            body = error_body(native, 503, message, None, "replica_failed", "server_error")
            yield f"data: {json.dumps(body)}\n\n".encode()


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """Rendezvous hashing of the request's affinity key over the running replicas: the highest
    hash of (key, replica id) is preferred, the rest are the fallback (Ray takes the shortest
    queue within a rank). A replica that goes away moves only its own conversations."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        key = pending_request.args[0] if pending_request is not None and pending_request.args else ""
        if not key or len(candidate_replicas) < 2:
            return [candidate_replicas]
        ranked = sorted(candidate_replicas, reverse=True,
                        key=lambda r: hashlib.sha256(f"{key}\0{r.replica_id.unique_id}".encode()).digest())
        return [ranked[:1], ranked[1:]]


@serve.deployment(health_check_period_s=5, health_check_timeout_s=30)
class Replica:
    def __init__(self, settings: ServerSettings, paths: dict[str, str], threads: int):
        models = load_served(paths)
        numba.set_num_threads(threads)      # this replica's share of the node's cores, for its schedulers
        self.app = create_app(settings, models)
        self.engines = self.app.state.server.engines
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    def check_health(self) -> None:
        """Ray restarts a replica whose check raises. A full queue is not a failure (that is
        /ready's 503, and the autoscaler's signal): only a scheduler thread that has died is."""
        dead = [name for name, engine in self.engines.items() if not engine.alive]
        if dead:
            raise RuntimeError(f"the scheduler of {', '.join(dead)} has stopped")

    async def handle(self, key: str, request: dict):
        """The app's answer to one HTTP request: first {"status", "headers"}, then the body's
        chunks as the app sends them. key: only for the router. When the caller goes away this
        generator is cancelled and the app sees the client disconnect."""
        messages: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        body = [{"type": "http.request", "body": request["body"], "more_body": False}]

        async def receive():
            if body:
                return body.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http",
                 "method": request["method"], "path": request["path"], "raw_path": request["path"].encode(),
                 "query_string": request["query_string"], "root_path": "", "headers": request["headers"],
                 "client": request["client"], "server": ("ray-serve", 0)}
        app = asyncio.create_task(self.app(scope, receive, messages.put))
        try:
            while True:
                message = await next_message(messages, app)
                if message is None:
                    return
                if message["type"] == "http.response.start":
                    headers = [(RENAMED.get(k.lower(), k).decode("latin-1"), v.decode("latin-1"))
                               for k, v in message["headers"] if k.lower() not in HOP_BY_HOP]
                    yield {"status": message["status"], "headers": headers + [(REPLICA_HEADER, self.replica_id)]}
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body"):
                        return
        finally:
            gone.set()
            await asyncio.wait({app}, timeout=30)


ingress_app = FastAPI(title="llama-ref on Ray Serve", openapi_url=None, docs_url=None, redoc_url=None)


@serve.deployment(max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress(ingress_app)
class Ingress:
    def __init__(self, replica):
        self.replica = replica.options(method_name="handle", stream=True)

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "OPTIONS"], include_in_schema=False)
    async def forward(self, path: str, request: Request):
        body = await request.body()
        native = is_native(request.url.path)
        client = request.client or ("", 0)
        chunks = self.replica.remote(affinity_key(body), {
            "method": request.method, "path": request.url.path, "query_string": request.url.query.encode(),
            "headers": request.headers.raw, "body": body, "client": (client[0], client[1])})
        try:
            head = await chunks.__anext__()
        except Exception as err:            # the replica died or was unreachable before answering
            return JSONResponse(error_body(native, 503, f"the replica serving this request failed "
                                           f"({type(err).__name__}); retry", None, "replica_failed", "server_error"),
                                status_code=503, headers={"Retry-After": "1"})
        streaming = dict(head["headers"]).get("content-type", "").startswith("text/event-stream")
        return StreamingResponse(relayed(chunks, streaming, native), status_code=head["status"],
                                 headers=dict(head["headers"]))


def build_app(settings: ServerSettings, paths: dict[str, str], replicas: int | None = None,
              autoscale: tuple[int, int] | None = None, cpus_per_replica: float = 1.0):
    """The Ray Serve application: fixed `replicas`, or `autoscale` = (min, max) on the number of
    requests each replica has in flight (target: its --max-batch)."""
    scaling = {"num_replicas": replicas or 1} if autoscale is None else {"autoscaling_config": {
        "min_replicas": autoscale[0], "max_replicas": autoscale[1], "target_ongoing_requests": settings.max_batch}}
    replica = Replica.options(
        **scaling, ray_actor_options={"num_cpus": cpus_per_replica},
        # beyond what the engine runs and queues, the engine itself answers 503
        max_ongoing_requests=settings.max_batch + settings.max_queue + 1,
        request_router_config=RequestRouterConfig(request_router_class=f"{__name__}:PrefixAffinityRouter"),
    ).bind(settings, paths, max(1, int(cpus_per_replica)))
    return Ingress.bind(replica)


def app_builder(args: dict):
    """For `serve run`: args "model" (NAME=PATH[,NAME=PATH...] or a path; default: "default"),
    "replicas" or "autoscale" ("MIN:MAX"), "cpus_per_replica", and any ServerSettings field."""
    paths = served_models(str(args.get("model", "default")).split(","), "default")
    known = set(ServerSettings.__dataclass_fields__)
    settings = ServerSettings(**{k: v for k, v in args.items() if k in known})
    autoscale = tuple(int(n) for n in str(args["autoscale"]).split(":")) if "autoscale" in args else None
    return build_app(settings, paths, int(args.get("replicas", 1)), autoscale, float(args.get("cpus_per_replica", 1)))


def serve_on_ray(application, host: str, port: int, address: str | None) -> None:
    """Run the application on Ray (a new local cluster, or the one at `address`) until SIGINT
    or SIGTERM, then shut Serve down."""
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application, name="llama-ref", route_prefix="/")
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
