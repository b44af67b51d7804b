"""The sampler: one token id from a row of logits, as spec/sampling.md defines it.

Each step of the spec is one function below, named after its parameter, and `Sampler.sample`
composes them in the spec's order in one visible place. Logits are float64 from step 2 on;
a token removed by a filter has logit -inf. Only the `reference` profile is implemented
(the `hf`, `vllm` and `llama.cpp` profiles of the spec are not yet).

Where the peers differ (sampling-research.md §1-§11): repetition penalty over prompt and
generated ids as HF/TGI/vLLM (llama.cpp: last 64 tokens); frequency/presence over generated
ids only, as OpenAI and vLLM; top_k keeps ties with the k-th logit (llama.cpp keeps exactly
k); top_p keeps an id while the mass strictly before it is below p (Meta keeps one more);
min_p after top_p on post-temperature probabilities (vLLM V1 applies it before top_k/top_p,
llama.cpp before temperature); the draw is a documented inverse-CDF walk, not any engine's RNG.
"""
import secrets
from dataclasses import dataclass

import numpy as np

from .errors import LlamaRefError
from .model import softmax

MAX_STOP_STRINGS = 16


class SamplingParamsError(LlamaRefError, ValueError):
    """A sampling parameter is outside its documented range."""


@dataclass(frozen=True)
class SamplingParams:
    """Every parameter of both provider APIs, with neutral defaults (each default is an exact
    no-op). Ranges are the union of the native and OpenAI-compatible APIs' ranges; the server
    narrows them per route."""
    temperature: float = 1.0          # 0 means greedy
    top_p: float = 1.0                # (0, 1]
    top_k: int = 0                    # 0 = off
    min_p: float = 0.0                # [0, 1]
    repetition_penalty: float = 1.0   # [0.01, 5]; 1 = off
    presence_penalty: float = 0.0     # [-2, 2]
    frequency_penalty: float = 0.0    # [-2, 2]
    stop: tuple[str, ...] = ()        # at most 16, none empty
    max_new_tokens: int | None = None  # None: up to the context
    n: int = 1                        # 1 or 2
    seed: int | None = None           # None: drawn from the OS and reported
    logprobs: bool = False
    top_logprobs: int = 0             # [0, 20]
    profile: str = "reference"

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        for rule in _RULES:
            rule(self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _number(name, low, high, low_open=False):
    def check(params):
        value = getattr(params, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise SamplingParamsError(f"{name} must be a number, got {value!r}")
        if (value <= low if low_open else value < low) or value > high:
            bracket = "(" if low_open else "["
            raise SamplingParamsError(f"{name} must be in {bracket}{low}, {high}], got {value}")
    return check


def _integer(name, low, high, optional=False):
    def check(params):
        value = getattr(params, name)
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise SamplingParamsError(f"{name} must be an integer, got {value!r}")
        if not low <= value <= high:
            raise SamplingParamsError(f"{name} must be in [{low}, {high}], got {value}")
    return check


def _stop(params):
    if len(params.stop) > MAX_STOP_STRINGS:
        raise SamplingParamsError(f"stop: at most {MAX_STOP_STRINGS} strings, got {len(params.stop)}")
    for s in params.stop:
        if not isinstance(s, str) or not s:
            raise SamplingParamsError(f"stop: every stop string must be a non-empty string, got {s!r}")


def _profile(params):
    if params.profile != "reference":
        raise SamplingParamsError(f"profile must be 'reference' (the only one implemented), got {params.profile!r}")


_RULES = (
    _number("temperature", 0, 100), _number("top_p", 0, 1, low_open=True), _integer("top_k", 0, 99_999),
    _number("min_p", 0, 1), _number("repetition_penalty", 0.01, 5), _number("presence_penalty", -2, 2),
    _number("frequency_penalty", -2, 2), _stop, _integer("max_new_tokens", 0, 10**9, optional=True),
    _integer("n", 1, 2), _integer("seed", 0, 2**63 - 1, optional=True), _integer("top_logprobs", 0, 20),
    _profile,
)


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
    """z / T, no clamping."""
    return logits if temperature == 1.0 else logits / temperature


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


# Step 10
def draw(logits: np.ndarray, u: float) -> int:
    """Inverse CDF in ascending id order: the first id whose cumulative probability exceeds
    u in [0, 1); the last survivor if rounding leaves none."""
    cdf = np.cumsum(softmax(logits))
    chosen = int(np.searchsorted(cdf, u, side="right"))
    if chosen >= logits.size or logits[chosen] == -np.inf:
        chosen = int(np.flatnonzero(logits > -np.inf)[-1])
    return chosen


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    with np.errstate(divide="ignore"):
        return shifted - np.log(np.exp(shifted).sum())


class Sampler:
    """The sampler of one response (choice `choice` of n): its own RNG, made once, and the
    ids seen so far."""

    def __init__(self, params: SamplingParams, prompt_ids, vocab_size: int, choice: int = 0):
        self.params = params
        # A seed is reported even when none was given, so that any run can be replayed.
        self.seed = None if params.greedy else (params.seed if params.seed is not None else secrets.randbits(63))
        self.rng = None if params.greedy else np.random.Generator(np.random.PCG64(self.seed + choice))
        self.seen = np.zeros(vocab_size, dtype=bool)
        self.seen[np.asarray(list(prompt_ids), dtype=np.int64)] = True
        self.generated_counts = np.zeros(vocab_size, dtype=np.int64)

    def sample(self, logits: np.ndarray) -> tuple[int, float]:
        """(token id, its log-probability under the final distribution); records the token."""
        p = self.params
        z = logits.astype(np.float64)                                                   # step 2
        z = apply_repetition_penalty(z, np.flatnonzero(self.seen), p.repetition_penalty)  # step 3
        z = apply_frequency_presence_penalties(z, self.generated_counts, p.frequency_penalty,
                                               p.presence_penalty)                      # step 4
        if p.greedy:
            token = greedy(z)                                                           # step 5
        else:
            z = apply_temperature(z, p.temperature)                                     # step 6
            z = top_k_filter(z, p.top_k)                                                # step 7
            z = top_p_filter(z, p.top_p)                                                # step 8
            z = min_p_filter(z, p.min_p)                                                # step 9
            token = draw(z, self.rng.random())                                          # step 10
        self.seen[token] = True
        self.generated_counts[token] += 1
        return token, float(log_softmax(z)[token])
