"""Response bodies, declared for the OpenAPI schema (`/openapi.json`): every status a route
can answer with and the shape of each, streams included, so that a client generated from
the schema, and the fuzzer that checks the server against it (tests/test_fuzz.py), know
every answer. The routes build plain dicts; these models describe them and are not used to
filter what goes out."""
from typing import Literal

from pydantic import BaseModel, TypeAdapter


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    """Every error of the OpenAI routes."""
    error: OpenAIErrorDetail


class NativeError(BaseModel):
    """Every error of the native route (TGI's shape)."""
    error: str
    error_type: Literal["validation", "overloaded", "internal"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated_cost: float


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class FunctionCall(BaseModel):
    name: str
    arguments: str                  # a JSON object, as text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None             # None when the answer is only tool calls
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str


class ToolCallDelta(BaseModel):
    """A call's first delta has id, type and function.name (arguments ""); later ones a fragment of the arguments."""
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length", "tool_calls"] | None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion; the stream ends with `data: [DONE]`."""
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class TextCompletion(BaseModel):
    """A completion, whole; streamed, each `data:` event has this shape without `usage` (or with
    only `usage` and no choices, last, when asked), then `data: [DONE]`."""
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str    # a string: base64 of little-endian float32


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"]
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class NativeStatus(BaseModel):
    status: Literal["succeeded", "queued"]
    runtime_ms: int | None = None
    cost: float | None = None
    tokens_generated: int | None = None
    tokens_input: int | None = None


class GeneratedText(BaseModel):
    generated_text: str


class NativeResponse(BaseModel):
    """The whole answer; with a webhook, only `request_id` and the status `queued`."""
    request_id: str
    inference_status: NativeStatus
    results: list[GeneratedText] | None = None
    num_tokens: int | None = None
    num_input_tokens: int | None = None


class NativeToken(BaseModel):
    id: int
    text: str
    logprob: float
    special: bool


class NativeDetails(BaseModel):
    finish_reason: Literal["eos_token", "stop_sequence", "length"]
    generated_tokens: int
    input_tokens: int
    seed: int | None


class NativeStreamEvent(BaseModel):
    """One `data:` event of the native stream (TGI's shape): the last has the text and details."""
    token: NativeToken
    generated_text: str | None
    details: NativeDetails | None


class Health(BaseModel):
    status: Literal["ok"]
    models: list[str]
    server_errors: int
    generated_tokens: int
    requests_in_flight: int
    requests_waiting: int
    running_sequences: int


class Ready(BaseModel):
    status: Literal["ready", "busy"]


class TraceStage(BaseModel):
    stage: str
    setting: str
    active: bool
    survivors: int
    logits: list[float | None]      # of the trace's candidates; None: removed (-inf)
    probs: list[float]


class StepTrace(BaseModel):
    """decoding/trace.py SamplingTrace, with display labels."""
    profile: str
    seed: int | None
    choice: int
    candidates: list[int]
    labels: list[str]               # the candidates as a person reads them ("␣Paris", "<0xE2>")
    stages: list[TraceStage]
    uniform: float | None
    token_id: int
    interval: list[float] | None    # [low, high): u falls in it (the chosen id's share, ids ascending)
    chosen: str
    compared: "StepTrace | None"


class ExplainStep(BaseModel):
    token_id: int
    token: str
    delta: str
    trace: StepTrace


class Explanation(BaseModel):
    model: str
    profile: str
    compare_profile: str | None
    seed: int | None
    prompt_tokens: int
    prompt: str | None
    text: str
    finish_reason: Literal["eos_token", "stop_sequence", "length"]
    steps: list[ExplainStep]


ERRORS = {400: "a value breaks a rule (the message and `param` name the field)",
          401: "the API key is missing or wrong (--api-key)", 404: "no such model",
          413: "the body is over --max-body-bytes", 503: "the queue is full; retry after Retry-After",
          500: "a bug of ours"}


def declared(ok: type[BaseModel], stream: type[BaseModel] | None = None, native: bool = False) -> dict:
    """FastAPI `responses` for a route: `ok` on 200 (or, when `stream` is given and the request
    asks for it, server-sent events whose data are `stream` objects), and every error status in
    the API's error shape."""
    error = NativeError if native else OpenAIError
    responses = {status: {"model": error, "description": text} for status, text in ERRORS.items()}
    responses[200] = {"model": ok, "description": "the answer"}
    if stream is not None:
        responses[200]["description"] = f"the answer, or with `stream: true` server-sent events of {stream.__name__}"
        responses[200]["content"] = {"text/event-stream": {"schema": event_schema(stream, error, done=not native)}}
    return responses


def event_schema(stream: type[BaseModel], error: type[BaseModel], done: bool) -> dict:
    """One server-sent event (the Open API 3.1 reading of a stream's `schema`): its `data` is a
    `stream` object as JSON, or the error body that ends a stream broken off, or `[DONE]`."""
    data = TypeAdapter(stream | error).json_schema()          # the models under "$defs", referenced from the root
    defs = data.pop("$defs", {})
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": data}
    return {"type": "object", "$defs": defs, "required": ["data"],
            "properties": {"event": {"type": "string"},
                           "data": {"anyOf": [{"const": "[DONE]"}, json_data]} if done else json_data}}
