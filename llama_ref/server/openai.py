"""The OpenAI-compatible API (docs/spec/api.md §2): chat completions, completions, embeddings
and the model list, under /v1 and /v1/openai. Streamed and whole responses read the same events."""
import base64
import json
import time
from dataclasses import dataclass

from fastapi import APIRouter, Depends
from pydantic import BaseModel
from sse_starlette.sse import EventSourceResponse

from ..decoding.params import SamplingParams, sampling_params
from .errors import APIError, ending_with_error
from .responses import (ChatCompletion, ChatCompletionChunk, EmbeddingList, ModelList, TextCompletion,
                        declared)
from .schemas import ChatRequest, CompletionRequest, EmbeddingRequest, OpenAIRequest, response_format_params
from .state import ServerState, request_id, server_state

router = APIRouter()
OPENAI_FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length", "tool_calls": "tool_calls"}


@router.get("/v1/models", responses=declared(ModelList))
@router.get("/v1/openai/models", responses=declared(ModelList))
async def models(server: ServerState = Depends(server_state)):
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "llama-ref"}
                                       for name in sorted(server.names)]}


@router.post("/v1/chat/completions", responses=declared(ChatCompletion, ChatCompletionChunk))
@router.post("/v1/openai/chat/completions", responses=declared(ChatCompletion, ChatCompletionChunk))
async def chat(body: ChatRequest, server: ServerState = Depends(server_state)):
    model, params = server.model(body.model), openai_params(body)
    if body.tools and body.response_format.type != "text":
        raise APIError(400, "response_format: must be text with tools (a tool call is its own format)",
                       "response_format")
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
    tool_choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, BaseModel) else body.tool_choice
    generation = model.chat([m.model_dump(exclude_none=True) for m in body.messages], params, tools=tools,
                            tool_choice=tool_choice, parallel_tool_calls=body.parallel_tool_calls)
    response = ChatShape(request_id("chatcmpl-"), int(time.time()), body.model, body.logprobs, model.tokenizer,
                         named_tool=isinstance(body.tool_choice, BaseModel))
    return await openai_response(server, body, generation, response, "chat.completion")


@router.post("/v1/completions", responses=declared(TextCompletion, TextCompletion))
@router.post("/v1/openai/completions", responses=declared(TextCompletion, TextCompletion))
async def completions(body: CompletionRequest, server: ServerState = Depends(server_state)):
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise APIError(400, "prompt: exactly one prompt per request", "prompt")
    model = server.model(body.model)
    params = openai_params(body, logprobs=body.logprobs is not None, top_logprobs=body.logprobs or 0)
    generation = model.generate(prompts[0], params)
    response = CompletionShape(request_id("cmpl-"), int(time.time()), body.model, body.logprobs is not None,
                               model.tokenizer, echo=prompts[0] if body.echo else "")
    return await openai_response(server, body, generation, response, "text_completion")


@router.post("/v1/embeddings", responses=declared(EmbeddingList))
@router.post("/v1/openai/embeddings", responses=declared(EmbeddingList))
async def embeddings(body: EmbeddingRequest, server: ServerState = Depends(server_state)):
    embedding = server.model(body.model).embedding(body.input, server.settings.pooling, server.settings.normalize,
                                                   body.dimensions)
    async for _ in server.admitted(embedding):
        pass
    vectors = embedding.result()                                           # (inputs, dimensions) float32
    data = [{"object": "embedding", "index": i, "embedding": encode_vector(vector, body.encoding_format)}
            for i, vector in enumerate(vectors)]
    return {"object": "list", "data": data, "model": body.model,
            "usage": {"prompt_tokens": embedding.prompt_tokens, "total_tokens": embedding.prompt_tokens}}


def encode_vector(vector, encoding_format: str):
    """A list of floats, or base64 of the little-endian float32 bytes (what the openai client decodes)."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def openai_params(body: OpenAIRequest, **overrides) -> SamplingParams:
    if body.stream and body.n > 1:
        raise APIError(400, "n: must be 1 when stream is true", "n")
    return sampling_params(body, max_new_tokens=body.max_tokens, **response_format_params(body.response_format),
                           **overrides)


async def openai_response(server: ServerState, body: OpenAIRequest, generation, response, kind: str):
    """The SSE stream, or the whole body, of a chat or text completion."""
    events = server.admitted(generation)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventSourceResponse(ending_with_error(openai_stream(server, generation, events, response, include_usage),
                                                     native=False), sep="\n")
    async for _ in events:
        pass
    result = generation.result()
    return {**response.header(kind), "choices": [response.choice(c) for c in result.choices],
            "usage": server.usage(result)}


async def openai_stream(server: ServerState, generation, events, response, include_usage: bool):
    head = response.header(response.chunk_object)
    yield json.dumps({**head, "choices": [response.first_delta()]}, ensure_ascii=False)
    finished = False
    async for event in events:
        if event.delta or event.tool_calls or response.logprobs:
            yield json.dumps({**head, "choices": [response.delta(event)]}, ensure_ascii=False)
        if event.finish_reason is not None:
            finished = True
            yield json.dumps({**head, "choices": [response.finish(event.index, event.finish_reason)]},
                             ensure_ascii=False)
    if not finished:   # max_tokens = 0: no token, finish "length"
        yield json.dumps({**head, "choices": [response.finish(0, "length")]}, ensure_ascii=False)
    if include_usage:
        yield json.dumps({**head, "choices": [], "usage": server.usage(generation.result())}, ensure_ascii=False)
    yield "[DONE]"


def token_logprob(tokenizer, token_id: int, logprob: float) -> dict:
    """`bytes` are the token's own bytes, so a character split across tokens joins up again
    (decoding one token alone would give U+FFFD); `token` shows bytes that are not whole UTF-8
    as \\xNN escapes. A control token (EOS) has its piece as `token` and no bytes (null)."""
    if tokenizer.is_special(token_id):
        return {"token": tokenizer.id_to_piece(token_id), "logprob": logprob, "bytes": None}
    raw = tokenizer.token_bytes(token_id)
    return {"token": raw.decode("utf-8", errors="backslashreplace"), "logprob": logprob, "bytes": list(raw)}


@dataclass
class ChatShape:
    """The pieces of chat.completion(.chunk) bodies."""
    id: str
    created: int
    model: str
    logprobs: bool
    tokenizer: object
    named_tool: bool = False        # tool_choice named a function: its call finishes with "stop", as OpenAI's does
    chunk_object: str = "chat.completion.chunk"

    def finish_reason(self, reason: str) -> str:
        return "stop" if reason == "tool_calls" and self.named_tool else OPENAI_FINISH[reason]

    def header(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def logprob_content(self, events) -> dict | None:
        if not self.logprobs:
            return None
        return {"content": [{**token_logprob(self.tokenizer, e.token_id, e.logprob),
                             "top_logprobs": [token_logprob(self.tokenizer, i, lp) for i, lp in e.top_logprobs]}
                            for e in events]}

    def choice(self, choice) -> dict:
        message = {"role": "assistant", "content": choice.text}
        if choice.tool_calls:
            message = {"role": "assistant", "content": choice.text or None, "tool_calls": [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in choice.tool_calls]}
        return {"index": choice.index, "message": message, "logprobs": self.logprob_content(choice.tokens),
                "finish_reason": self.finish_reason(choice.finish_reason)}

    def first_delta(self) -> dict:
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def delta(self, event) -> dict:
        delta = {"content": event.delta}
        if event.tool_calls:
            delta = {"tool_calls": [{"index": d.index, "id": d.id, "type": "function",
                                     "function": {"name": d.name, "arguments": d.arguments}} if d.id else
                                    {"index": d.index, "function": {"arguments": d.arguments}}
                                    for d in event.tool_calls]}
        return {"index": event.index, "delta": delta, "logprobs": self.logprob_content([event]), "finish_reason": None}

    def finish(self, index: int, finish_reason: str) -> dict:
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": self.finish_reason(finish_reason)}


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
