"""SamplingParams, and the one declaration of every sampling parameter's rule.

`RULES` holds each parameter's neutral default, its range and its meaning once. SamplingParams
validates against it; the server's request schemas (server/schemas.py) and the CLI's flags
(cli.py) are made from it, narrowing a range where an API publishes a narrower one (OpenAI's
temperature ≤ 2) but never widening it. A rule's range covers both the native and the
OpenAI-compatible APIs' ranges (docs/spec/api.md), and the Python API accepts all of it.
"""
import json
from dataclasses import dataclass, fields

from ..errors import LlamaRefError
from .json_schema import check_schema

MAX_STOP_STRINGS = 16
# Longer than any stop sequence in use, and short enough that holding back a possible match
# while streaming stays cheap: a 1 MB stop string was accepted and searched at every token.
MAX_STOP_LENGTH = 1000
PROFILES = ("reference", "hf", "vllm", "llama.cpp")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")


class SamplingParamsError(LlamaRefError, ValueError):
    """A sampling parameter is outside its documented range."""


@dataclass(frozen=True)
class Rule:
    """A number's range, [low, high] (low excluded when low_open); None allowed when optional."""
    name: str
    kind: type                      # int or float
    default: int | float | None
    low: int | float
    high: int | float
    help: str
    low_open: bool = False
    optional: bool = False

    def check(self, value) -> None:
        if value is None and self.optional:
            return
        integer = self.kind is int
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or value != value:
            raise SamplingParamsError(f"{self.name} must be {'an integer' if integer else 'a number'}, got {value!r}",
                                      self.name)
        if (value <= self.low if self.low_open else value < self.low) or value > self.high:
            raise SamplingParamsError(f"{self.name} must be in {self.range()}, got {value}", self.name)

    def range(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low}, {self.high}]"


RULES = {rule.name: rule for rule in (
    Rule("temperature", float, 1.0, 0, 100, "divides the logits; 0 means greedy"),
    Rule("top_p", float, 1.0, 0, 1, "keep the most likely tokens until their mass reaches top_p", low_open=True),
    Rule("top_k", int, 0, 0, 99_999, "keep the k most likely tokens (ties with the k-th too); 0 = off"),
    Rule("min_p", float, 0.0, 0, 1, "drop tokens below min_p times the most likely token's probability"),
    Rule("repetition_penalty", float, 1.0, 0.01, 5, "divides positive, multiplies negative logits of seen tokens; "
                                                    "1 = off"),
    Rule("presence_penalty", float, 0.0, -2, 2, "subtracted once from the logit of every generated token"),
    Rule("frequency_penalty", float, 0.0, -2, 2, "subtracted from a token's logit per time it was generated"),
    Rule("max_new_tokens", int, None, 0, 10**9, "tokens to generate at most; None: up to the context", optional=True),
    Rule("n", int, 1, 1, 2, "responses to the same prompt; response i draws with seed + i"),
    Rule("seed", int, None, 0, 2**63 - 1, "seeds the draw; None: one drawn from the OS and reported", optional=True),
    Rule("top_logprobs", int, 0, 0, 20, "the most likely tokens reported with each generated one"),
)}


@dataclass(frozen=True)
class SamplingParams:
    """Every parameter of both provider APIs, with neutral defaults (each default is an exact
    no-op). Defaults and ranges: RULES; the server narrows the ranges per route."""
    temperature: float = RULES["temperature"].default     # 0 means greedy
    top_p: float = RULES["top_p"].default
    top_k: int = RULES["top_k"].default                    # 0 = off
    min_p: float = RULES["min_p"].default
    repetition_penalty: float = RULES["repetition_penalty"].default   # 1 = off
    presence_penalty: float = RULES["presence_penalty"].default
    frequency_penalty: float = RULES["frequency_penalty"].default
    stop: tuple[str, ...] = ()                             # at most MAX_STOP_STRINGS, none empty
    max_new_tokens: int | None = RULES["max_new_tokens"].default   # None: up to the context
    n: int = RULES["n"].default
    seed: int | None = RULES["seed"].default               # None: drawn from the OS and reported
    logprobs: bool = False
    top_logprobs: int = RULES["top_logprobs"].default
    profile: str = "reference"
    response_format: str = "text"     # "text" | "json_object" | "json_schema" (constrained.py)
    json_schema: str | None = None    # with "json_schema": the schema, as JSON text (a dict is accepted)
    ignore_eos: bool = False          # never sample end-of-sequence (benchmarks: an exact output length)

    def __post_init__(self):
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        for rule in RULES.values():
            rule.check(getattr(self, rule.name))
        check_stop(self.stop)
        check_choice("profile", self.profile, PROFILES)
        check_choice("response_format", self.response_format, RESPONSE_FORMATS)
        check_json_schema(self)
        check_profile(self)
        if self.ignore_eos and self.response_format != "text":
            raise SamplingParamsError("ignore_eos: JSON mode ends a response with end-of-sequence, so the two "
                                      "cannot be combined", "ignore_eos")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def check_stop(stop: tuple) -> None:
    if len(stop) > MAX_STOP_STRINGS:
        raise SamplingParamsError(f"stop: at most {MAX_STOP_STRINGS} strings, got {len(stop)}", "stop")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise SamplingParamsError(f"stop: every stop string must be a non-empty string, got {s!r}", "stop")
        if len(s) > MAX_STOP_LENGTH:
            raise SamplingParamsError(f"stop: a stop string has at most {MAX_STOP_LENGTH} characters, got {len(s)}",
                                      "stop")


def check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise SamplingParamsError(f"{name} must be one of {', '.join(choices)}; got {value!r}", name)


def check_json_schema(params: SamplingParams) -> None:
    """json_schema goes with response_format "json_schema" only, and must be a schema the
    grammar engine enforces (json_schema.check_schema); kept as JSON text."""
    if (params.response_format == "json_schema") != (params.json_schema is not None):
        raise SamplingParamsError("json_schema: given exactly when response_format is 'json_schema'", "json_schema")
    if params.json_schema is None:
        return
    schema = params.json_schema
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as err:
            raise SamplingParamsError(f"json_schema: not valid JSON ({err})", "json_schema") from None
    check_schema(schema, "json_schema")
    object.__setattr__(params, "json_schema", json.dumps(schema, ensure_ascii=False))


def check_profile(params: SamplingParams) -> None:
    """What a profile's engine refuses, this profile refuses too."""
    if params.profile == "hf" and (params.frequency_penalty or params.presence_penalty):
        raise SamplingParamsError("frequency_penalty, presence_penalty: the hf profile must leave them at 0 "
                                  "(transformers has no such processor)",
                                  "frequency_penalty" if params.frequency_penalty else "presence_penalty")
    if params.profile == "vllm" and params.greedy and params.n > 1:
        raise SamplingParamsError("n: the vllm profile rejects n > 1 with temperature 0, as vLLM does", "n")


FIELDS = tuple(f.name for f in fields(SamplingParams))


def sampling_params(values, **overrides) -> SamplingParams:
    """SamplingParams from anything that names its parameters as SamplingParams does: a request
    body, the CLI's parsed flags (an object's attributes or a dict's keys). Names it lacks keep
    their defaults, names that are not fields are ignored; `overrides` (a route's own names for
    a field, such as OpenAI's max_tokens) win."""
    given = values if isinstance(values, dict) else vars(values)
    chosen = {name: given[name] for name in FIELDS if name in given and name not in overrides}
    return SamplingParams(**chosen, **overrides)
