"""Request bodies, one pydantic model per endpoint: every parameter once, with its default,
bounds and meaning (docs/spec/api.md). Unknown fields are rejected, not ignored.

A sampling parameter's range comes from its rule in decoding/params.py (`sampling_field`),
narrowed where an API publishes a narrower one, so no bound is written twice.
"""
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..decoding.params import MAX_STOP_STRINGS, RULES
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


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object"] = "text"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    name: str | None = None
    tool_call_id: str | None = None


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
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None


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
