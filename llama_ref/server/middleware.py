"""Three layers around the whole app, written as plain ASGI so that they see every request,
streamed or not, and every failure, before or after a response has started.

- `BodyLimit`: a request body larger than `max_body_bytes` gets a 413 at once, before any of
  it is parsed (TGI's `--payload-limit` does the same, 2,000,000 bytes by default). Without
  it, a 64 MB body kept the server parsing past a minute.
- `ServerErrors`: counts requests that failed on the server's side (a 5xx other than the
  deliberate 503 of a full queue, or an exception, also one raised after a stream started),
  so that tests and /health see a failure that the logs would not show.
- `RequestLog`: gives each request an id (the `X-Request-Id` header), and when its response
  has ended (a stream's last byte included) counts it in /metrics and writes its access-log line.
"""
import json
import secrets
import time

from starlette.datastructures import Headers

from .errors import error_body, is_native
from .metrics import RequestRecord, current_request, log_request


class BodyLimit:
    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self.refuse(scope, send, f"{declared} bytes were declared")
        # Read the body here, at most max_body_bytes of it, and hand the app a replay; later
        # receive() calls (a client leaving a stream) go to the real connection.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":       # the client left while sending
                return await self.app(scope, replay(message, receive), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                return await self.refuse(scope, send, "more than that was sent")
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, replay(body, receive), send)

    async def refuse(self, scope, send, what: str):
        message = f"request body: at most {self.max_body_bytes} bytes are accepted (--max-body-bytes); {what}"
        payload = json.dumps(error_body(is_native(scope["path"]), 413, message, None, "payload_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def replay(first: dict, receive):
    """A receive() that gives `first` (the message already read), then defers to `receive`."""
    queue = [first]

    async def replayed():
        return queue.pop() if queue else await receive()
    return replayed


class ServerErrors:
    def __init__(self, app, state):
        self.app = app
        self.state = state      # has an int `server_errors`

    async def __call__(self, scope, receive, send):
        async def watched_send(message):
            if message["type"] == "http.response.start" and message["status"] >= 500 and message["status"] != 503:
                self.state.server_errors += 1
            await send(message)
        try:
            await self.app(scope, receive, watched_send)
        except Exception:
            self.state.server_errors += 1
            raise


class RequestLog:
    def __init__(self, app, metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        record = RequestRecord(secrets.token_hex(8), scope["method"], "unmatched")
        token, start = current_request.set(record), time.perf_counter()

        async def logged_send(message):
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", record.request_id.encode())]}
            await send(message)
        try:
            await self.app(scope, receive, logged_send)
        except Exception:
            record.status = record.status or 500
            raise
        finally:
            current_request.reset(token)
            # the router wrote the matched route into the scope: a bounded set of labels
            route = scope.get("route")
            record.route = getattr(route, "path", "unmatched")
            record.duration_ms = round((time.perf_counter() - start) * 1000, 3)
            self.metrics.finished(record)
            log_request(record)
