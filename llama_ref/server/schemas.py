"""Request bodies, one pydantic model per endpoint: every parameter once, with its default,
bounds and meaning (spec/api.md). Unknown fields are rejected, not ignored."""
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOPS = 16


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
    """The sampling fields both APIs share (spec/sampling.md says what each does)."""
    model_config = ConfigDict(extra="forbid")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    top_k: int = Field(0, ge=0, lt=1000, description="keep the k most likely tokens; 0 = off")
    min_p: float = Field(0.0, ge=0, le=1, description="drop tokens below min_p times the top probability")
    repetition_penalty: float = Field(1.0, ge=0.01, le=5, description="multiplicative; 1 = off")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stop: str | list[str] = Field(default_factory=list, description=f"at most {MAX_STOPS} stop strings")
    seed: int | None = Field(None, ge=0, lt=2**63)
    response_format: ResponseFormat = Field(default_factory=ResponseFormat)


class NativeRequest(Sampling):
    """POST /v1/inference/{model}"""
    input: str = Field(description="the raw prompt; no template is applied")
    max_new_tokens: int | None = Field(512, ge=1, le=100_000, description="null: up to the context")
    temperature: float = Field(0.7, ge=0, le=100, description="0 = greedy")
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int = Field(0, ge=0, lt=100_000)
    num_responses: int = Field(1, ge=1, le=2)
    stream: bool = False
    webhook: str | None = Field(None, pattern=r"^https?://", description="POST the final response body here; reply at once")


class OpenAIRequest(Sampling):
    model: str
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy")
    max_tokens: int | None = Field(512, ge=0, le=1_000_000, description="null: up to the context")
    n: int = Field(1, ge=1, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class ChatRequest(OpenAIRequest):
    """POST /v1/openai/chat/completions"""
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20)
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None


class CompletionRequest(OpenAIRequest):
    """POST /v1/openai/completions"""
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
