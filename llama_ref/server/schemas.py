"""Request bodies, one pydantic model per endpoint: every parameter once, with its default,
bounds and meaning (docs/spec/api.md). Unknown fields are rejected, not ignored.

A sampling parameter's range comes from its rule in decoding/params.py (`sampling_field`),
narrowed where an API publishes a narrower one, so no bound is written twice.
"""
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..decoding.json_schema import SchemaError, check_schema
from ..decoding.params import MAX_STOP_STRINGS, PROFILES, RULES
from ..embedding import MAX_DIMENSIONS, MIN_DIMENSIONS


def sampling_field(name: str, default=..., *, low=None, high=None, description: str | None = None):
    """The pydantic Field of sampling parameter `name`: its rule's default and range, or this
    API's narrower range (never a wider one)."""
    rule = RULES[name]
    low = rule.low if low is None else low
    high = rule.high if high is None else high
    if low < rule.low or high > rule.high:
        raise ValueError(f"{name}: [{low}, {high}] is wider than its rule {rule.range()}")
    lower = {"gt": low} if rule.low_open and low == rule.low else {"ge": low}
    return Field(rule.default if default is ... else default, **lower, le=high, description=description or rule.help)


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict | bool = Field(True, alias="schema", description="a JSON Schema (Draft 2020-12) the answer must "
                                 "validate against; keywords the grammar engine cannot enforce are refused")
    strict: bool | None = Field(None, description="accepted; the schema is always enforced")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JSONSchemaFormat | None = Field(None, description="with type json_schema")


def response_format_params(response_format: ResponseFormat) -> dict:
    """SamplingParams' response_format and json_schema for a request's response_format; an
    invalid or unenforceable schema is a 400 naming its path under response_format.json_schema.schema."""
    if response_format.type != "json_schema":
        if response_format.json_schema is not None:
            raise SchemaError("response_format.json_schema: given only with type json_schema",
                              "response_format.json_schema")
        return {"response_format": response_format.type}
    if response_format.json_schema is None:
        raise SchemaError("response_format.json_schema: required with type json_schema", "response_format.json_schema")
    schema = response_format.json_schema.schema_
    check_schema(schema, "response_format.json_schema.schema")
    return {"response_format": "json_schema", "json_schema": schema}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = Field(description="only 'text' parts are supported")
    text: str | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str = Field(description="a JSON object, as text")


class AssistantToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = Field(description="a string or a list of text parts; None only for "
                                                    "an assistant message with tool_calls")
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str | None = None
    parameters: dict | None = Field(None, description="a JSON Schema of type object; none: no arguments")
    strict: bool | None = None


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class Sampling(BaseModel):
    """The sampling fields both APIs share (docs/spec/sampling.md says what each does)."""
    model_config = ConfigDict(extra="forbid")
    top_p: float = sampling_field("top_p")
    top_k: int = sampling_field("top_k", high=999)
    min_p: float = sampling_field("min_p")
    repetition_penalty: float = sampling_field("repetition_penalty")
    presence_penalty: float = sampling_field("presence_penalty")
    frequency_penalty: float = sampling_field("frequency_penalty")
    stop: str | list[str] = Field(default_factory=list, description=f"at most {MAX_STOP_STRINGS} stop strings")
    seed: int | None = sampling_field("seed")
    response_format: ResponseFormat = Field(default_factory=ResponseFormat)
    ignore_eos: bool = Field(False, description="never end on end-of-sequence (an extension, as vLLM's and "
                             "llama.cpp's): the response runs to max_tokens, a stop string or the context")


class NativeRequest(Sampling):
    """POST /v1/inference/{model}"""
    input: str = Field(description="the raw prompt; no template is applied")
    max_new_tokens: int | None = sampling_field("max_new_tokens", 512, low=1, high=100_000)
    temperature: float = sampling_field("temperature", 0.7)
    top_p: float = sampling_field("top_p", 0.9)
    top_k: int = sampling_field("top_k")
    num_responses: int = sampling_field("n")
    stream: bool = False
    webhook: str | None = Field(None, pattern=r"^https?://", description="POST the final response body here; reply at once")


class OpenAIRequest(Sampling):
    model: str
    temperature: float = sampling_field("temperature", high=2)
    max_tokens: int | None = sampling_field("max_new_tokens", 512, high=1_000_000)
    n: int = sampling_field("n")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class ChatRequest(OpenAIRequest):
    """POST /v1/openai/chat/completions"""
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int = sampling_field("top_logprobs")
    tools: list[ToolDefinition] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="default: auto with tools, none without")
    parallel_tool_calls: bool = Field(True, description="false: at most one call per answer")


class CompletionRequest(OpenAIRequest):
    """POST /v1/openai/completions"""
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = sampling_field("top_logprobs", None, high=5,
                                          description="return this many top log-probabilities per token")


class EmbeddingRequest(BaseModel):
    """POST /v1/openai/embeddings"""
    model_config = ConfigDict(extra="forbid")
    model: str
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="a text, a list of texts, a list of token ids, or a list of id lists; at most 2048 inputs")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: each vector's little-endian float32 bytes, as the openai client asks by default")
    dimensions: int | None = Field(None, ge=MIN_DIMENSIONS, le=MAX_DIMENSIONS, description="fewer than the model's hidden size cuts "
                                   "the vector (normalised again), more pads it with zeros")
    user: str | None = None


MAX_EXPLAIN_TOKENS = 256   # every step's trace comes back in one body


class ExplainRequest(Sampling):
    """POST /v1/explain: one traced response, every step (an extension, docs/spec/api.md §6)"""
    model: str
    prompt: str | None = Field(None, description="a raw prompt, no template applied; give this or messages")
    messages: list[Message] | None = Field(None, min_length=1, description="a chat, in the model's chat format")
    max_tokens: int = sampling_field("max_new_tokens", 16, low=1, high=MAX_EXPLAIN_TOKENS)
    temperature: float = sampling_field("temperature", high=2)
    profile: Literal[PROFILES] = Field("reference", description="whose sampling pipeline (docs/spec/sampling.md)")
    compare_profile: Literal[PROFILES] | None = Field(None, description="also trace each step under this profile, "
                                                      "on the same logits and draw")
