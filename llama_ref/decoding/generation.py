"""The generation loop: prefill, decode, sample, detokenize, stop (docs/spec/sampling.md).

`Generation` is both the stream and the result: iterating it yields one `TokenEvent` per
generated token, and `result()` folds those same events into a `Completion`, so a streamed
and a non-streamed request run the same code and get the same text. With n = 2 the prompt
is prefilled once, its cache copied, and the two responses decode side by side; response i
samples with seed + i, so response 0 equals the n = 1 run with the same seed (N1).

A Generation does not run the model itself: it says which chunks it needs next (`chunks`)
and takes their logits (`take`). A decoding.batch.Batch runs those chunks, alone when the
generation is iterated, or together with other requests' in the server.
"""
import json
from dataclasses import dataclass

import numpy as np

from ..errors import ContextLengthError
from ..tokenizer import IncrementalDetokenizer
from ..nn.transformer import Chunk
from .batch import Batch
from .constrained import GrammarConstraint, OutputGrammar, json_object_grammar, json_schema_grammar
from .params import SamplingParams, SamplingParamsError
from .sampling import Sampler
from .stopping import EOS, LENGTH, STOP_SEQUENCE, TOOL_CALLS, ResponseText
from .tools import CallStream, ToolCall, ToolCallDelta, ToolUse
from .trace import SamplingTrace


@dataclass(frozen=True)
class TokenEvent:
    index: int                                   # which response, 0 .. n - 1
    token_id: int
    text: str                                    # what this token decodes to (step 11); a special token's piece, e.g. "</s>"
    special: bool
    logprob: float                               # under the final sampling distribution
    top_logprobs: tuple[tuple[int, float], ...]  # params.top_logprobs most likely (id, logprob)
    delta: str                                   # what it adds to the response text: stop strings cut, held back while they might match, flushed at the end
    finish_reason: str | None                    # on the last event of a response: "eos_token", "stop_sequence", "length" or "tool_calls"
    trace: SamplingTrace | None = None           # with generate(..., trace=True)
    tool_calls: tuple[ToolCallDelta, ...] = ()   # with tools: what this token adds to the calls (delta is then "")


@dataclass(frozen=True)
class Choice:
    index: int
    text: str                       # the concatenated deltas
    finish_reason: str
    tokens: tuple[TokenEvent, ...]  # one per generated token, EOS included
    seed: int | None                # the seed of response 0 (response i drew with seed + i); None when greedy
    tool_calls: tuple[ToolCall, ...] = ()   # with tools, when the answer is calls (text is then "")


@dataclass(frozen=True)
class Completion:
    prompt_ids: tuple[int, ...]
    choices: tuple[Choice, ...]

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        """Generated tokens of every choice, EOS included (step 15)."""
        return sum(len(choice.tokens) for choice in self.choices)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Response:
    """One of the n responses: its sampler, detokenizer and text, advanced a token at a time."""

    def __init__(self, index: int, model, prompt_ids: list[int], params: SamplingParams, max_new_tokens: int,
                 trace: bool, output: OutputGrammar | None, tools: ToolUse | None, compare_profile: str | None):
        self.index = index
        self.tokenizer = model.tokenizer
        self.eos_ids = set(model.config.eos_token_ids) | ({self.tokenizer.eos_id} if self.tokenizer else set())
        self.sampler = Sampler(params, prompt_ids, model.config.vocab_size, choice=index, trace=trace,
                               compare_profile=compare_profile)
        self.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids) if self.tokenizer else None
        self.text = ResponseText(params.stop)
        self.max_new_tokens = max_new_tokens
        self.constraint = None if output is None else \
            GrammarConstraint(self.tokenizer, model.config.vocab_size, self.eos_ids, output)
        self.calls = None if tools is None else CallStream(tools)
        self.ignore_eos = params.ignore_eos
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None

    def step(self, logits) -> TokenEvent:
        """Steps 2-15 for one row of logits (vocab,)."""
        if self.ignore_eos:               # the end-of-sequence ids are not candidates (spec: ignore_eos)
            logits = logits.copy()
            logits[list(self.eos_ids)] = -np.inf
        if self.constraint is not None:   # only tokens the grammar allows (JSON, a schema, tool calls)
            logits = self.constraint.apply(logits, self.max_new_tokens - len(self.token_ids))
        sample = self.sampler.sample(logits)
        token = sample.token_id
        if self.constraint is not None and token not in self.eos_ids:
            self.constraint.accept(token)
        self.token_ids.append(token)
        special = self.tokenizer is not None and self.tokenizer.is_special(token)
        piece = self.detokenizer.add(token) if self.detokenizer else ""
        if token in self.eos_ids:                                   # step 12(a)
            self.finish_reason = TOOL_CALLS if self.calls is not None and self.calls.branch == "calls" else EOS
            content, calls = self.route(self.flush())
            delta = self.text.finish(content)
        else:
            content, calls = self.route(piece)
            delta = self.text.add(content)                          # step 12(b), 13
            if self.text.stopped:
                self.finish_reason = STOP_SEQUENCE
            elif len(self.token_ids) == self.max_new_tokens:       # step 12(c)
                content, more = self.route(self.flush())
                delta += self.text.finish(content)                  # step 14
                calls += more
                self.finish_reason = STOP_SEQUENCE if self.text.stopped else LENGTH
        return TokenEvent(self.index, token, self.tokenizer.id_to_piece(token) if special else piece, special,
                          sample.logprob, sample.top_logprobs, delta, self.finish_reason, sample.trace, tuple(calls))

    def route(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """With tools, text goes to the calls or stays content (tools.CallStream); else it is content."""
        return (text, []) if self.calls is None else self.calls.add(text)

    def flush(self) -> str:
        return self.detokenizer.flush() if self.detokenizer else ""


class Generation:
    """Iterate for the events; `result()` for the folded completion (it runs whatever the
    iteration has not)."""

    def __init__(self, model, prompt_ids, params: SamplingParams, trace: bool = False, tools: ToolUse | None = None,
                 compare_profile: str | None = None):
        self.model = model
        self.params = params
        self.compare_profile = compare_profile if trace else None
        self.prompt_ids = [int(i) for i in prompt_ids]
        if not self.prompt_ids:
            raise ContextLengthError("prompt: at least one token is needed", "prompt")
        if params.stop and model.tokenizer is None:
            raise SamplingParamsError("stop: stop strings need the model's tokenizer, and this model has none", "stop")
        if params.response_format != "text" and model.tokenizer is None:
            raise SamplingParamsError("response_format: JSON mode needs the model's tokenizer, and this model has none",
                                      "response_format")
        if tools is not None and (params.response_format != "text" or params.ignore_eos):
            field = "response_format" if params.response_format != "text" else "ignore_eos"
            raise SamplingParamsError(f"{field}: cannot be combined with tools (a tool call is its own format and "
                                      "ends with end-of-sequence)", field)
        room = model.config.context_length - len(self.prompt_ids)
        if room < 0:
            raise ContextLengthError(f"prompt: {len(self.prompt_ids)} tokens do not fit in the model's context of "
                                     f"{model.config.context_length} tokens", "prompt")
        # Past the context the response ends with "length", as when max_new_tokens is reached.
        self.max_new_tokens = room if params.max_new_tokens is None else min(params.max_new_tokens, room)
        output = output_grammar(params, tools)
        self.responses = [Response(i, model, self.prompt_ids, params, self.max_new_tokens, trace, output, tools,
                                   self.compare_profile) for i in range(params.n)]
        self.events: list[TokenEvent] = []
        self.caches: list = []          # response i's KV cache (one, the prompt's, until it is prefilled)
        self.prefilled = 0              # prompt positions held by the cache
        self._prefill_stop = 0          # where the prompt chunk being run ends
        self.cancelled = False
        self._stepping: list[Response] = []

    @property
    def seed(self) -> int | None:
        return self.responses[0].sampler.seed

    @property
    def cache_length(self) -> int:
        """Positions a response's cache needs: the prompt and every token but the last."""
        return len(self.prompt_ids) + self.max_new_tokens

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def sequences(self) -> int:
        """Places it takes in a batch (the server's --max-batch): one per response."""
        return self.params.n

    @property
    def kv_positions(self) -> int:
        """KV positions its caches hold at worst, and the field and reason to name when they
        cannot fit (server/engine.py)."""
        return self.params.n * self.cache_length

    kv_field = "max_tokens"

    @property
    def kv_reason(self) -> str:
        return (f"the prompt ({len(self.prompt_ids)} tokens) and up to {self.max_new_tokens} new tokens, "
                f"for {self.params.n} choice(s),")

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt_ids)

    @property
    def done(self) -> bool:
        return self.cancelled or self.max_new_tokens == 0 or all(r.finish_reason for r in self.responses)

    def reuse(self, cache, positions: int) -> None:
        """Start from a cache whose first `positions` (fewer than the prompt's) already hold
        the prompt's keys and values (decoding/prefix.py)."""
        self.caches, self.prefilled = [cache], positions

    def chunks(self, chunk_size: int | None) -> list[Chunk]:
        """What the next forward pass must run for this generation: the prompt's next
        chunk_size tokens (all of them when None) while prefilling, else the last token of
        every response still going."""
        if self.done:
            return []
        if not self.caches:
            self.caches = [self.model.new_cache(self.cache_length)]
        prompt = self.prompt_ids
        if self.prefilling:
            self._prefill_stop = len(prompt) if chunk_size is None else min(len(prompt), self.prefilled + chunk_size)
            return [Chunk(np.asarray(prompt[self.prefilled:self._prefill_stop], dtype=np.int64), self.prefilled,
                          self.caches[0], "last")]
        self._stepping = [r for r in self.responses if r.finish_reason is None]
        return [Chunk(np.asarray(r.token_ids[-1:], dtype=np.int64), len(prompt) + len(r.token_ids) - 1,
                      self.caches[r.index], "last") for r in self._stepping]

    def take(self, logits: list[np.ndarray]) -> list[TokenEvent]:
        """The logits (1, vocab) of the last row of each chunk just run (chunks()). Returns
        the tokens they produced (none while the prompt is still being prefilled)."""
        if self.prefilling:
            self.prefilled = self._prefill_stop
            if self.prefilling:
                return []
            self.caches += [self.caches[0].copy() for _ in self.responses[1:]]
            self._stepping = list(self.responses)
            logits = [logits[0][-1:]] * len(self.responses)
        events = [response.step(rows[-1]) for response, rows in zip(self._stepping, logits)]
        self.events.extend(events)
        return events

    def __iter__(self):
        batch = Batch(self.model)
        batch.add(self)
        while not self.done:
            yield from batch.step().get(self, [])

    def result(self) -> Completion:
        for _ in self:
            pass
        choices = []
        for response in self.responses:
            tokens = tuple(e for e in self.events if e.index == response.index)
            choices.append(Choice(response.index, "".join(e.delta for e in tokens), response.finish_reason or LENGTH,
                                  tokens, self.seed, response.calls.calls() if response.calls else ()))
        return Completion(tuple(self.prompt_ids), tuple(choices))


def output_grammar(params: SamplingParams, tools: ToolUse | None) -> OutputGrammar | None:
    """The grammar an answer must follow: the tool-call form, a JSON object, a schema, or none."""
    if tools is not None:
        return OutputGrammar(tools.grammar(), tools.closing, "tools", end_when_complete=False,
                             growth=tools.completer.growth())
    if params.response_format == "json_object":
        return json_object_grammar()
    if params.response_format == "json_schema":
        return json_schema_grammar(json.loads(params.json_schema))
    return None
