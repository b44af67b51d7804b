"""The sampler: one token id from a row of logits, as docs/spec/sampling.md defines it.

Each step of the spec is one function below, named after its parameter; `pipeline` lists,
for each profile, which of them run and in what order, as `Stage` records, and
`Sampler.sample` runs that list. The parameters and their ranges are in params.py.
Logits are float64 from step 2 on; a token removed by a filter has logit -inf.

Profiles (spec "Profiles"; evidence in docs/spec/sampling.md §2-§11):
    reference  penalties (repetition over prompt + generated, frequency/presence over
               generated) -> temperature -> top_k (ties kept) -> top_p -> min_p -> draw
    hf         transformers' processors in generate()'s order: repetition -> temperature ->
               top_k -> top_p (ascending cumulative sum <= 1 - p) -> min_p; transformers has
               no frequency or presence penalty, so those are rejected
    vllm       vLLM V1: 0 < T < 0.01 clamped to 0.01; penalties -> temperature -> min_p ->
               top_k -> top_p (ascending cumulative sum, as hf); greedy with n = 2 rejected
    llama.cpp  llama.cpp's default chain: penalties over the last 64 tokens, prompt included
               -> top_k keeping exactly k -> top_p -> min_p -> temperature last
Every profile draws with the reference draw (step 10): no engine's RNG is reproducible
outside it (spec §10), so profiles reproduce the surviving set and the probabilities, not seeds.
"""
import secrets
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from ..nn.ops import log_softmax, softmax
from .params import SamplingParams, SamplingParamsError
from .trace import SamplingTrace, trace_of

LLAMA_CPP_PENALTY_WINDOW = 64   # llama.cpp's default penalty_last_n
VLLM_MIN_TEMPERATURE = 0.01     # vLLM's _MAX_TEMP: smaller temperatures are raised to it


# Step 3
def apply_repetition_penalty(logits: np.ndarray, seen_ids: np.ndarray, penalty: float) -> np.ndarray:
    """z_j > 0 ? z_j / r : z_j * r for every distinct id j in prompt ∪ generated (CTRL, Keskar
    et al. 2019, as HF/TGI/vLLM apply it)."""
    if penalty == 1.0 or seen_ids.size == 0:
        return logits
    out = logits.copy()
    z = out[seen_ids]
    out[seen_ids] = np.where(z > 0, z / penalty, z * penalty)
    return out


# Step 4
def apply_frequency_presence_penalties(logits: np.ndarray, generated_counts: np.ndarray,
                                       frequency: float, presence: float) -> np.ndarray:
    """z_j -= frequency * count_j + presence * [count_j > 0], counts over generated ids only
    (OpenAI's definition).  generated_counts (vocab,) int."""
    if frequency == 0.0 and presence == 0.0:
        return logits
    return logits - frequency * generated_counts - presence * (generated_counts > 0)


# Step 5
def greedy(logits: np.ndarray) -> int:
    """argmax, the lowest id among equal maxima."""
    return int(np.argmax(logits))


# Step 6
def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """z / T, no clamping. A T so small that the largest z / T overflows float64 (T below about
    1e-300) gives the limit T -> 0+ instead of NaN: the largest logits 0, every other -inf."""
    if temperature == 1.0:
        return logits
    with np.errstate(over="ignore"):
        scaled = logits / temperature
    if np.isfinite(scaled.max()):
        return scaled        # an id whose z / T alone overflowed to -inf has probability 0 either way
    return np.where(logits == logits.max(), 0.0, -np.inf)


# Step 7
def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep every id whose logit is >= the k-th largest (ties with the k-th survive)."""
    if not 0 < k < logits.size:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits >= kth, logits, -np.inf)


# Step 8
def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus (Holtzman et al. 2019): order by probability descending, then id ascending;
    keep an id iff the probability mass strictly before it is < p (so at least one survives)."""
    if p >= 1.0:
        return logits
    probs = softmax(logits)
    order = np.lexsort((np.arange(logits.size), -probs))   # (vocab,) ids, most probable first
    mass_before = np.cumsum(probs[order]) - probs[order]
    keep = np.zeros(logits.size, dtype=bool)
    keep[order[mass_before < p]] = True
    return np.where(keep, logits, -np.inf)


# Step 9
def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Keep p_j >= min_p * max_j p_j (Nguyen et al. 2024), probabilities after temperature."""
    if min_p <= 0.0:
        return logits
    probs = softmax(logits)
    return np.where(probs >= min_p * probs.max(), logits, -np.inf)


# Step 7, llama.cpp profile
def top_k_exactly(logits: np.ndarray, k: int) -> np.ndarray:
    """llama.cpp's top_k: keep exactly the k largest logits. Among ties at the k-th, the
    lowest ids (llama.cpp leaves that choice to std::partial_sort)."""
    if not 0 < k < logits.size:
        return logits
    keep = np.lexsort((np.arange(logits.size), -logits))[:k]   # (k,) ids, largest logit first
    out = np.full_like(logits, -np.inf)
    out[keep] = logits[keep]
    return out


# Step 8, hf and vllm profiles
def top_p_filter_ascending(logits: np.ndarray, p: float) -> np.ndarray:
    """transformers' TopPLogitsWarper and vLLM's apply_top_k_top_p: sort ascending (stable),
    cumulative probability, remove the ids whose cumulative sum is <= 1 - p, keep the last.
    The same set as top_p_filter up to the rounding of 1 - p; ties go to the higher id."""
    if p >= 1.0:
        return logits
    order = np.argsort(logits, kind="stable")                  # (vocab,) ids, least probable first
    remove = np.cumsum(softmax(logits[order])) <= 1 - p
    remove[-1] = False
    out = logits.copy()
    out[order[remove]] = -np.inf
    return out


# Step 6, vllm profile
def vllm_temperature(temperature: float) -> float:
    """vLLM raises 0 < T < 0.01 to 0.01 (SamplingParams.__post_init__); T = 0 stays greedy."""
    return VLLM_MIN_TEMPERATURE if 0 < temperature < VLLM_MIN_TEMPERATURE else temperature


# Step 10
def draw(logits: np.ndarray, u: float) -> int:
    """Inverse CDF in ascending id order: the first id whose cumulative probability exceeds
    u in [0, 1); the last survivor if rounding leaves none."""
    cdf = np.cumsum(softmax(logits))
    chosen = int(np.searchsorted(cdf, u, side="right"))
    if chosen >= logits.size or logits[chosen] == -np.inf:
        chosen = int(np.flatnonzero(logits > -np.inf)[-1])
    return chosen


@dataclass(frozen=True)
class Stage:
    """One step of a profile's pipeline. `active` is False when its parameter is at the
    neutral value, which makes `apply` an exact no-op (the trace records it as inactive and
    its table and chart leave it out)."""
    name: str                                   # "temperature", "top_k", ...: the name in the trace
    setting: str                                # e.g. "temperature=0.7"
    active: bool
    apply: Callable[[np.ndarray], np.ndarray]   # logits (vocab,) float64 -> logits, -inf for removed ids


def pipeline(params: SamplingParams, history: "Sampler") -> tuple[list[Stage], list[Stage]]:
    """Spec steps 3-9 for params.profile, in order, as (penalties, filters). Penalties run
    before the greedy argmax too; filters only when sampling."""
    p = params
    penalized = p.repetition_penalty != 1 or p.frequency_penalty != 0 or p.presence_penalty != 0
    repetition = Stage("repetition_penalty", f"repetition_penalty={p.repetition_penalty:g}",
                       p.repetition_penalty != 1,
                       lambda z: apply_repetition_penalty(z, history.seen_ids(), p.repetition_penalty))
    frequency_presence = Stage(
        "frequency/presence_penalty", f"frequency={p.frequency_penalty:g} presence={p.presence_penalty:g}",
        p.frequency_penalty != 0 or p.presence_penalty != 0,
        lambda z: apply_frequency_presence_penalties(z, history.generated_counts, p.frequency_penalty,
                                                     p.presence_penalty))
    temperature = Stage("temperature", f"temperature={p.temperature:g}", p.temperature != 1,
                        lambda z: apply_temperature(z, p.temperature))
    top_k = Stage("top_k", f"top_k={p.top_k}", p.top_k > 0, lambda z: top_k_filter(z, p.top_k))
    top_p = Stage("top_p", f"top_p={p.top_p:g}", p.top_p < 1, lambda z: top_p_filter(z, p.top_p))
    min_p = Stage("min_p", f"min_p={p.min_p:g}", p.min_p > 0, lambda z: min_p_filter(z, p.min_p))
    top_p_ascending = Stage("top_p", top_p.setting, top_p.active, lambda z: top_p_filter_ascending(z, p.top_p))
    if p.profile == "hf":
        return [repetition], [temperature, top_k, top_p_ascending, min_p]
    if p.profile == "vllm":
        clamped = vllm_temperature(p.temperature)
        shown = temperature.setting + (f" (vLLM: {clamped:g})" if clamped != p.temperature else "")
        vllm = Stage("temperature", shown, p.temperature != 1, lambda z: apply_temperature(z, clamped))
        return [repetition, frequency_presence], [vllm, min_p, top_k, top_p_ascending]
    if p.profile == "llama.cpp":
        window = np.asarray(history.token_ids[-LLAMA_CPP_PENALTY_WINDOW:], dtype=np.int64)
        window_penalties = Stage(
            f"penalties (last {LLAMA_CPP_PENALTY_WINDOW} tokens)",
            f"r={p.repetition_penalty:g} f={p.frequency_penalty:g} p={p.presence_penalty:g}", penalized,
            lambda z: apply_frequency_presence_penalties(
                apply_repetition_penalty(z, np.unique(window), p.repetition_penalty),
                np.bincount(window, minlength=z.size), p.frequency_penalty, p.presence_penalty))
        top_k_exact = Stage("top_k", top_k.setting, top_k.active, lambda z: top_k_exactly(z, p.top_k))
        return [window_penalties], [top_k_exact, top_p, min_p, temperature]
    return [repetition, frequency_presence], [temperature, top_k, top_p, min_p]


@dataclass(frozen=True)
class Sample:
    token_id: int
    logprob: float                             # under the final distribution
    top_logprobs: tuple[tuple[int, float], ...]  # up to params.top_logprobs best (id, logprob), same distribution,
                                               # only ids the filters kept
    trace: SamplingTrace | None = None


class Sampler:
    """The sampler of one response (choice `choice` of n): its own RNG, made once, and the
    ids seen so far (prompt, then each token passed to `accept`). With trace, each Sample
    carries the audit trace; with compare_profile too, that trace's `compared` is the same
    step under that profile: the same logits, history and draw u (explain's side by side)."""

    def __init__(self, params: SamplingParams, prompt_ids, vocab_size: int, choice: int = 0,
                 trace: bool = False, compare_profile: str | None = None):
        self.params = params
        self.choice = choice
        self.trace = trace
        self.compared = None if compare_profile is None else compared_params(params, compare_profile)
        # A seed is reported even when none was given, so that any run can be replayed.
        self.seed = None if params.greedy else (params.seed if params.seed is not None else secrets.randbits(63))
        self.rng = None if params.greedy else np.random.Generator(np.random.PCG64(self.seed + choice))
        self.token_ids = [int(i) for i in prompt_ids]
        self.seen = np.zeros(vocab_size, dtype=bool)
        self.seen[np.asarray(self.token_ids, dtype=np.int64)] = True
        self.generated_counts = np.zeros(vocab_size, dtype=np.int64)

    def seen_ids(self) -> np.ndarray:
        return np.flatnonzero(self.seen)

    def accept(self, token: int) -> None:
        """Record a generated token for the penalties of later steps."""
        self.token_ids.append(token)
        self.seen[token] = True
        self.generated_counts[token] += 1

    def stages(self, params: SamplingParams, logits: np.ndarray) -> list:
        """Steps 2-9: [(None, the float64 logits), (stage, logits after it), ...]; penalties
        always (steps 3-4), the filters only when sampling (steps 6-9)."""
        penalties, filters = pipeline(params, self)
        steps = [(None, logits.astype(np.float64))]                     # step 2
        for stage in penalties + ([] if params.greedy else filters):
            steps.append((stage, stage.apply(steps[-1][1])))
        return steps

    def sample(self, logits: np.ndarray) -> Sample:
        """Steps 2-10 on one row of logits (vocab,); records the chosen token."""
        steps = self.stages(self.params, logits)
        z = steps[-1][1]
        uniform = None if self.params.greedy else self.rng.random()
        token = choose(z, uniform)                                       # step 5 or 10
        trace = None
        if self.trace:
            trace = trace_of(self.params.profile, self.seed, self.choice, steps, uniform, token)
        if self.trace and self.compared is not None:       # before accept: the same history
            other = self.stages(self.compared, logits)
            trace = replace(trace, compared=trace_of(self.compared.profile, self.seed, self.choice, other, uniform,
                                                     choose(other[-1][1], uniform)))
        self.accept(token)
        logprobs = log_softmax(z)
        # Only tokens the filters kept: a removed one has probability 0 (a -inf that JSON cannot
        # carry), so fewer than top_logprobs come back when fewer survive, as llama.cpp's do.
        best = np.argsort(-logprobs, kind="stable")[:self.params.top_logprobs] if self.params.top_logprobs else []
        best = [i for i in best if np.isfinite(logprobs[i])]
        return Sample(token, float(logprobs[token]), tuple((int(i), float(logprobs[i])) for i in best), trace)


def choose(logits: np.ndarray, uniform: float | None) -> int:
    """Greedy (step 5) when there is no draw, else the inverse-CDF draw (step 10)."""
    return greedy(logits) if uniform is None else draw(logits, uniform)


def compared_params(params: SamplingParams, profile: str) -> SamplingParams:
    """params under another profile, for a side-by-side trace; what that profile refuses is
    an error naming compare_profile."""
    try:
        return replace(params, profile=profile)
    except SamplingParamsError as err:
        raise SamplingParamsError(f"compare_profile: {err}", "compare_profile") from err
