"""The provider's native API: `POST /v1/inference/{model}` (docs/spec/api.md §1).

The raw `input` is the prompt (no template); streaming sends TGI-shaped token events; with a
`webhook` the reply is immediate and the finished body is POSTed to the caller's URL.
"""
import asyncio
import json
import logging
import time

import httpx
from fastapi import APIRouter, Depends
from sse_starlette.sse import EventSourceResponse

from ..decoding.chat import encode_native_input
from ..decoding.generation import Generation
from ..decoding.params import sampling_params
from .errors import APIError, ending_with_error
from .responses import NativeResponse, NativeStreamEvent, declared
from .schemas import NativeRequest, response_format_params
from .state import ServerState, request_id, server_state

log = logging.getLogger("llama_ref.server")
router = APIRouter()
WEBHOOK_RETRIES = 3


@router.post("/v1/inference/{model_name:path}", responses=declared(NativeResponse, NativeStreamEvent, native=True))
async def native(model_name: str, body: NativeRequest, server: ServerState = Depends(server_state)):
    model = server.model(model_name)
    if body.stream and body.num_responses > 1:
        raise APIError(400, "num_responses: must be 1 when stream is true", "num_responses")
    params = sampling_params(body, n=body.num_responses, **response_format_params(body.response_format))
    generation = Generation(model, encode_native_input(model.tokenizer, body.input), params)
    events, started, rid = server.admitted(generation), time.perf_counter(), request_id()
    if body.stream:
        return EventSourceResponse(ending_with_error(native_stream(generation, events), native=True), sep="\n")
    if body.webhook:
        finished = native_body(server, generation, events, started, rid)
        server.webhooks.add(asyncio.create_task(deliver(server, body.webhook, finished)))
        return {"request_id": rid, "inference_status": {"status": "queued"}}
    return await native_body(server, generation, events, started, rid)


async def native_body(server: ServerState, generation, events, started: float, rid: str) -> dict:
    async for _ in events:
        pass
    result = generation.result()
    return {"request_id": rid,
            "inference_status": {"status": "succeeded", "runtime_ms": int((time.perf_counter() - started) * 1000),
                                 "cost": server.usage(result)["estimated_cost"],
                                 "tokens_generated": result.completion_tokens, "tokens_input": result.prompt_tokens},
            "results": [{"generated_text": choice.text} for choice in result.choices],
            "num_tokens": result.completion_tokens, "num_input_tokens": result.prompt_tokens}


async def native_stream(generation, events):
    """One TGI token event per generated token; the last carries the text and the details.
    Built from the events alone: the worker thread may still be inside the generation when
    the last event arrives, so its result() must not be asked for here."""
    text, count = [], 0
    async for event in events:
        text.append(event.delta)
        count += 1
        last = event.finish_reason is not None
        token = {"id": event.token_id, "text": event.text, "logprob": event.logprob, "special": event.special}
        details = {"finish_reason": event.finish_reason, "generated_tokens": count,
                   "input_tokens": len(generation.prompt_ids), "seed": generation.seed} if last else None
        yield json.dumps({"token": token, "generated_text": "".join(text) if last else None, "details": details},
                         ensure_ascii=False)


async def deliver(server: ServerState, url: str, body) -> None:
    """POST the finished response to the caller's URL; a failure is retried WEBHOOK_RETRIES
    times, 1, 2, 4 s apart, then given up and logged. It runs as its own task: a slow or dead
    target holds nothing else up."""
    try:
        payload = await body
        async with httpx.AsyncClient(timeout=30) as http:
            for attempt in range(WEBHOOK_RETRIES + 1):
                if attempt:
                    await asyncio.sleep(2 ** (attempt - 1))
                try:
                    (await http.post(url, json=payload)).raise_for_status()
                    return
                except httpx.HTTPError as err:
                    log.warning("webhook %s: attempt %d failed: %s", url, attempt + 1, err)
        log.error("webhook %s: given up after %d attempts", url, WEBHOOK_RETRIES + 1)
    except Exception:
        log.exception("webhook %s: the generation failed", url)
    finally:
        server.webhooks.discard(asyncio.current_task())
