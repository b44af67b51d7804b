"""The HTTP server: the provider's native API and the OpenAI-compatible API (spec/api.md).

`create_app(settings, model)` builds the FastAPI app; nothing lives at module level. Each
request is validated (pydantic, then SamplingParams and the chat format), turned into a
Generation, and run by the Engine off the event loop; streamed and non-streamed responses
read the same events (spec/sampling.md step 13).
"""
import asyncio
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from ..chat import encode_native_input
from ..errors import ContextLengthError, LlamaRefError
from ..generation import Generation
from ..sampling import SamplingParams
from .engine import Busy, Engine
from .schemas import ChatRequest, CompletionRequest, NativeRequest, OpenAIRequest, Sampling

log = logging.getLogger("llama_ref.server")
OPENAI_FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}


@dataclass(frozen=True)
class ServerSettings:
    model_path: str = "default"
    served_model_name: str = "default"
    aliases: dict[str, str] = field(default_factory=dict)   # alias -> served model name
    api_key: str | None = None
    price_per_mtoken: float = 0.0                            # dollars per million tokens, for estimated_cost
    max_queue: int = 8                                       # requests running or waiting


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers


def request_id(prefix: str = "") -> str:
    return prefix + secrets.token_urlsafe(18)


def sampling_params(body: Sampling, temperature: float, max_new_tokens: int | None, n: int, **extra) -> SamplingParams:
    stops = [body.stop] if isinstance(body.stop, str) else body.stop
    return SamplingParams(temperature=temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                          repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                          frequency_penalty=body.frequency_penalty, stop=tuple(stops), seed=body.seed,
                          max_new_tokens=max_new_tokens, n=n, response_format=body.response_format.type, **extra)


def create_app(settings: ServerSettings, model) -> FastAPI:
    app = FastAPI(title="llama-ref", description="Native and OpenAI-compatible APIs of a reference engine")
    engine = Engine(model, settings.max_queue)
    app.state.engine = engine
    names = {settings.served_model_name, *settings.aliases}

    def check_model(name: str) -> str:
        if name not in names:
            raise APIError(404, f"The model '{name}' does not exist; this server has: {', '.join(sorted(names))}",
                           "model", "model_not_found")
        return settings.served_model_name

    def usage(generation_result) -> dict:
        total = generation_result.total_tokens
        return {"prompt_tokens": generation_result.prompt_tokens, "completion_tokens": generation_result.completion_tokens,
                "total_tokens": total, "estimated_cost": total * settings.price_per_mtoken / 1e6}

    def admitted(generation: Generation):
        try:
            engine.admit()
        except Busy as err:
            raise APIError(503, f"the server is busy: {err}; retry shortly", None, "overloaded", "server_error",
                           {"Retry-After": "1"}) from None
        return engine.events(generation)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return error_response(request, err.status, err.message, err.param, err.code, err.kind, err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"] if part != "body") or "body"
        return error_response(request, 400, f"{where}: {first['msg']}", where, "invalid_value")

    @app.exception_handler(LlamaRefError)
    async def engine_error(request: Request, err: LlamaRefError):
        message = str(err)
        param = re.match(r"[A-Za-z_]*", message).group() or None   # every engine error starts with its field
        code = "context_length_exceeded" if isinstance(err, ContextLengthError) else "invalid_value"
        return error_response(request, 400, message, param, code)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if settings.api_key and request.url.path.startswith("/v1"):
            if request.headers.get("authorization") != f"Bearer {settings.api_key}":
                return error_response(request, 401, "missing or wrong API key (Authorization: Bearer ...)", None,
                                      "invalid_api_key", "authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.served_model_name, "generated_tokens": engine.generated_tokens}

    @app.get("/v1/models")
    @app.get("/v1/openai/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "llama-ref"}
                                           for name in sorted(names)]}

    @app.post("/v1/inference/{model_name:path}")
    async def native(model_name: str, body: NativeRequest):
        check_model(model_name)
        if body.stream and body.num_responses > 1:
            raise APIError(400, "num_responses: must be 1 when stream is true", "num_responses")
        params = sampling_params(body, body.temperature, body.max_new_tokens, body.num_responses)
        generation = Generation(model, encode_native_input(model.tokenizer, body.input), params)
        events, started, rid = admitted(generation), time.perf_counter(), request_id()
        if body.stream:
            return EventSourceResponse(native_stream(generation, events), sep="\n")
        if body.webhook:
            webhooks.add(asyncio.create_task(deliver(body.webhook, native_body(generation, events, started, rid))))
            return {"request_id": rid, "inference_status": {"status": "queued"}}
        return await native_body(generation, events, started, rid)

    webhooks: set = set()   # running deliveries (kept referenced until they finish)

    async def deliver(url: str, body) -> None:
        """POST the finished response to the caller's URL: three tries, failures logged."""
        try:
            payload = await body
            async with httpx.AsyncClient(timeout=30) as http:
                for attempt in range(3):
                    try:
                        (await http.post(url, json=payload)).raise_for_status()
                        return
                    except httpx.HTTPError as err:
                        log.warning("webhook %s: attempt %d failed: %s", url, attempt + 1, err)
                        await asyncio.sleep(2 ** attempt)
        except Exception:
            log.exception("webhook %s: the generation failed", url)
        finally:
            webhooks.discard(asyncio.current_task())

    async def native_body(generation, events, started, rid) -> dict:
        async for _ in events:
            pass
        result = generation.result()
        return {"request_id": rid,
                "inference_status": {"status": "succeeded", "runtime_ms": int((time.perf_counter() - started) * 1000),
                                     "cost": usage(result)["estimated_cost"],
                                     "tokens_generated": result.completion_tokens, "tokens_input": result.prompt_tokens},
                "results": [{"generated_text": choice.text} for choice in result.choices],
                "num_tokens": result.completion_tokens, "num_input_tokens": result.prompt_tokens}

    async def native_stream(generation, events):
        async for event in events:
            last = event.finish_reason is not None
            token = {"id": event.token_id, "text": event.text, "logprob": event.logprob, "special": event.special}
            details = None
            if last:
                result = generation.result()
                details = {"finish_reason": event.finish_reason, "generated_tokens": result.completion_tokens,
                           "input_tokens": result.prompt_tokens, "seed": generation.seed}
            yield json.dumps({"token": token, "generated_text": result.choices[0].text if last else None,
                              "details": details}, ensure_ascii=False)

    def openai_params(body: OpenAIRequest, **extra) -> SamplingParams:
        check_model(body.model)
        if body.stream and body.n > 1:
            raise APIError(400, "n: must be 1 when stream is true", "n")
        return sampling_params(body, body.temperature, body.max_tokens, body.n, **extra)

    @app.post("/v1/chat/completions")
    @app.post("/v1/openai/chat/completions")
    async def chat(body: ChatRequest):
        if body.tools:
            raise APIError(400, "tools: tool calls are not supported yet", "tools")
        params = openai_params(body, top_logprobs=body.top_logprobs)
        generation = model.chat([m.model_dump(include={"role", "content"}) for m in body.messages], params)
        response = ChatShape(request_id("chatcmpl-"), int(time.time()), body.model, body.logprobs, model.tokenizer)
        return await openai_response(body, generation, response, "chat.completion")

    @app.post("/v1/completions")
    @app.post("/v1/openai/completions")
    async def completions(body: CompletionRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise APIError(400, "prompt: exactly one prompt per request", "prompt")
        params = openai_params(body, top_logprobs=body.logprobs or 0)
        generation = model.generate(prompts[0], params)
        response = CompletionShape(request_id("cmpl-"), int(time.time()), body.model, body.logprobs is not None,
                                   model.tokenizer, echo=prompts[0] if body.echo else "")
        return await openai_response(body, generation, response, "text_completion")

    async def openai_response(body: OpenAIRequest, generation, response, kind: str):
        """The SSE stream, or the whole body, of a chat or text completion."""
        events = admitted(generation)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventSourceResponse(openai_stream(generation, events, response, include_usage), sep="\n")
        async for _ in events:
            pass
        result = generation.result()
        return {**response.header(kind), "choices": [response.choice(c) for c in result.choices],
                "usage": usage(result)}

    async def openai_stream(generation, events, response, include_usage):
        head = response.header(response.chunk_object)
        yield json.dumps({**head, "choices": [response.first_delta()]}, ensure_ascii=False)
        finished = False
        async for event in events:
            if event.delta or response.logprobs:
                yield json.dumps({**head, "choices": [response.delta(event)]}, ensure_ascii=False)
            if event.finish_reason is not None:
                finished = True
                yield json.dumps({**head, "choices": [response.finish(event.index, event.finish_reason)]},
                                 ensure_ascii=False)
        if not finished:   # max_tokens = 0: no token, finish "length"
            yield json.dumps({**head, "choices": [response.finish(0, "length")]}, ensure_ascii=False)
        if include_usage:
            yield json.dumps({**head, "choices": [], "usage": usage(generation.result())}, ensure_ascii=False)
        yield "[DONE]"

    return app


def error_response(request: Request, status: int, message: str, param, code, kind="invalid_request_error",
                   headers=None) -> JSONResponse:
    """OpenAI's error shape, and TGI's for the native route."""
    if request.url.path.startswith("/v1/inference"):
        body = {"error": message, "error_type": "validation" if status < 500 else "overloaded"}
    else:
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def token_logprob(tokenizer, token_id: int, logprob: float) -> dict:
    text = tokenizer.decode([token_id]) if tokenizer else ""
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


@dataclass
class ChatShape:
    """The pieces of chat.completion(.chunk) bodies."""
    id: str
    created: int
    model: str
    logprobs: bool
    tokenizer: object
    chunk_object: str = "chat.completion.chunk"

    def header(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def logprob_content(self, events) -> dict | None:
        if not self.logprobs:
            return None
        return {"content": [{**token_logprob(self.tokenizer, e.token_id, e.logprob),
                             "top_logprobs": [token_logprob(self.tokenizer, i, lp) for i, lp in e.top_logprobs]}
                            for e in events]}

    def choice(self, choice) -> dict:
        return {"index": choice.index, "message": {"role": "assistant", "content": choice.text},
                "logprobs": self.logprob_content(choice.tokens), "finish_reason": OPENAI_FINISH[choice.finish_reason]}

    def first_delta(self) -> dict:
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def delta(self, event) -> dict:
        return {"index": event.index, "delta": {"content": event.delta}, "logprobs": self.logprob_content([event]),
                "finish_reason": None}

    def finish(self, index: int, finish_reason: str) -> dict:
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": OPENAI_FINISH[finish_reason]}


@dataclass
class CompletionShape(ChatShape):
    """text_completion bodies: `text` instead of a message; the prompt first when echoing."""
    echo: str = ""
    chunk_object: str = "text_completion"

    def logprob_content(self, events) -> dict | None:
        if not self.logprobs:
            return None
        tokens = [token_logprob(self.tokenizer, e.token_id, e.logprob) for e in events]
        return {"tokens": [t["token"] for t in tokens], "token_logprobs": [t["logprob"] for t in tokens],
                "top_logprobs": [{token_logprob(self.tokenizer, i, lp)["token"]: lp for i, lp in e.top_logprobs}
                                 for e in events]}

    def choice(self, choice) -> dict:
        return {"index": choice.index, "text": self.echo + choice.text, "logprobs": self.logprob_content(choice.tokens),
                "finish_reason": OPENAI_FINISH[choice.finish_reason]}

    def first_delta(self) -> dict:
        return {"index": 0, "text": self.echo, "logprobs": None, "finish_reason": None}

    def delta(self, event) -> dict:
        return {"index": event.index, "text": event.delta, "logprobs": self.logprob_content([event]),
                "finish_reason": None}

    def finish(self, index: int, finish_reason: str) -> dict:
        return {"index": index, "text": "", "logprobs": None, "finish_reason": OPENAI_FINISH[finish_reason]}
