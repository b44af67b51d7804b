"""The sampler: one token id from a row of logits, as spec/sampling.md defines it.

Each step of the spec is one function below, named after its parameter; `pipeline` lists,
for each profile, which of them run and in what order, and `Sampler.sample` runs that list.
Logits are float64 from step 2 on; a token removed by a filter has logit -inf.

Profiles (spec "Profiles"; evidence in sampling-research.md §1-§11):
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
outside it (§10), so profiles reproduce the surviving set and the probabilities, not seeds.
"""
import secrets
from dataclasses import asdict, dataclass

import numpy as np

from .errors import LlamaRefError
from .model import softmax

MAX_STOP_STRINGS = 16
PROFILES = ("reference", "hf", "vllm", "llama.cpp")
LLAMA_CPP_PENALTY_WINDOW = 64   # llama.cpp's default penalty_last_n
VLLM_MIN_TEMPERATURE = 0.01     # vLLM's _MAX_TEMP: smaller temperatures are raised to it
TRACE_CANDIDATES = 10           # ids shown per stage in the audit trace


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
    response_format: str = "text"     # "text" | "json_object" (constrained decoding, constrained.py)

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


def _response_format(params):
    if params.response_format not in ("text", "json_object"):
        raise SamplingParamsError(f"response_format must be 'text' or 'json_object', got {params.response_format!r}")


def _profile(params):
    if params.profile not in PROFILES:
        raise SamplingParamsError(f"profile must be one of {', '.join(PROFILES)}; got {params.profile!r}")
    if params.profile == "hf" and (params.frequency_penalty or params.presence_penalty):
        raise SamplingParamsError("frequency_penalty, presence_penalty: the hf profile must leave them at 0 "
                                  "(transformers has no such processor)")
    if params.profile == "vllm" and params.greedy and params.n > 1:
        raise SamplingParamsError("n: the vllm profile rejects n > 1 with temperature 0, as vLLM does")


_RULES = (
    _number("temperature", 0, 100), _number("top_p", 0, 1, low_open=True), _integer("top_k", 0, 99_999),
    _number("min_p", 0, 1), _number("repetition_penalty", 0.01, 5), _number("presence_penalty", -2, 2),
    _number("frequency_penalty", -2, 2), _stop, _integer("max_new_tokens", 0, 10**9, optional=True),
    _integer("n", 1, 2), _integer("seed", 0, 2**63 - 1, optional=True), _integer("top_logprobs", 0, 20),
    _profile, _response_format,
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


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    with np.errstate(divide="ignore"):
        return shifted - np.log(np.exp(shifted).sum())


def pipeline(params: SamplingParams, history: "Sampler") -> tuple[list, list]:
    """Spec steps 3-9 for params.profile, in order, as (penalties, filters): lists of
    (stage name, logits -> logits). Penalties run before the greedy argmax too; filters only
    when sampling."""
    p = params
    repetition = ("repetition_penalty", lambda z: apply_repetition_penalty(z, history.seen_ids(), p.repetition_penalty))
    frequency_presence = ("frequency/presence_penalty", lambda z: apply_frequency_presence_penalties(
        z, history.generated_counts, p.frequency_penalty, p.presence_penalty))
    temperature = ("temperature", lambda z: apply_temperature(z, p.temperature))
    top_k = ("top_k", lambda z: top_k_filter(z, p.top_k))
    top_p = ("top_p", lambda z: top_p_filter(z, p.top_p))
    min_p = ("min_p", lambda z: min_p_filter(z, p.min_p))
    top_p_ascending = ("top_p", lambda z: top_p_filter_ascending(z, p.top_p))
    if p.profile == "hf":
        return [repetition], [temperature, top_k, top_p_ascending, min_p]
    if p.profile == "vllm":
        clamped = ("temperature", lambda z: apply_temperature(z, vllm_temperature(p.temperature)))
        return [repetition, frequency_presence], [clamped, min_p, top_k, top_p_ascending]
    if p.profile == "llama.cpp":
        window = np.asarray(history.token_ids[-LLAMA_CPP_PENALTY_WINDOW:], dtype=np.int64)
        window_penalties = ("penalties (last 64 tokens)", lambda z: apply_frequency_presence_penalties(
            apply_repetition_penalty(z, np.unique(window), p.repetition_penalty),
            np.bincount(window, minlength=z.size), p.frequency_penalty, p.presence_penalty))
        return [window_penalties], [("top_k", lambda z: top_k_exactly(z, p.top_k)), top_p, min_p, temperature]
    return [repetition, frequency_presence], [temperature, top_k, top_p, min_p]


@dataclass(frozen=True)
class Sample:
    token_id: int
    logprob: float                             # under the final distribution
    top_logprobs: tuple[tuple[int, float], ...]  # params.top_logprobs best (id, logprob), same distribution
    trace: "SamplingTrace | None" = None


@dataclass(frozen=True)
class StageRecord:
    stage: str                      # "logits" for the input, then each stage's name
    setting: str                    # e.g. "temperature=0.7"
    active: bool                    # False when the parameter is neutral (an exact no-op)
    survivors: int                  # ids with a finite logit after this stage
    logits: tuple[float, ...]       # of SamplingTrace.candidates, after this stage
    probs: tuple[float, ...]        # softmax after this stage, same ids


@dataclass(frozen=True)
class SamplingTrace:
    """What each stage did to the distribution of one step (spec "The audit trace")."""
    profile: str
    seed: int | None
    choice: int
    candidates: tuple[int, ...]     # the ids followed through the stages
    stages: tuple[StageRecord, ...]
    uniform: float | None           # the draw u (None when greedy)
    token_id: int

    def to_dict(self) -> dict:
        """Plain JSON-serialisable data (-inf logits become None)."""
        data = asdict(self)
        for stage in data["stages"]:
            stage["logits"] = [v if np.isfinite(v) else None for v in stage["logits"]]
        return data


def _stage_active(name: str, params: SamplingParams) -> bool:
    """False when the stage's parameter is at its neutral value (the stage is an exact no-op)."""
    return {
        "logits": True,
        "repetition_penalty": params.repetition_penalty != 1,
        "frequency/presence_penalty": params.frequency_penalty != 0 or params.presence_penalty != 0,
        "penalties (last 64 tokens)": params.repetition_penalty != 1 or params.frequency_penalty != 0
        or params.presence_penalty != 0,
        "temperature": params.temperature != 1, "top_k": params.top_k > 0, "top_p": params.top_p < 1,
        "min_p": params.min_p > 0,
    }[name]


def _stage_setting(name: str, params: SamplingParams) -> str:
    settings = {
        "repetition_penalty": f"repetition_penalty={params.repetition_penalty:g}",
        "frequency/presence_penalty": f"frequency={params.frequency_penalty:g} presence={params.presence_penalty:g}",
        "penalties (last 64 tokens)": f"r={params.repetition_penalty:g} f={params.frequency_penalty:g} "
                                      f"p={params.presence_penalty:g}",
        "temperature": f"temperature={params.temperature:g}" + (
            f" (vLLM: {vllm_temperature(params.temperature):g})" if params.profile == "vllm"
            and vllm_temperature(params.temperature) != params.temperature else ""),
        "top_k": f"top_k={params.top_k}", "top_p": f"top_p={params.top_p:g}", "min_p": f"min_p={params.min_p:g}",
    }
    return settings.get(name, name)


def _trace(params, seed, choice, stages, uniform, token) -> SamplingTrace:
    """Follow the raw top ids, the final top ids and the chosen id through every stage."""
    first, last = stages[0][1], stages[-1][1]
    finals = np.argsort(-last, kind="stable")[:TRACE_CANDIDATES]
    ranked = list(np.argsort(-first, kind="stable")[:TRACE_CANDIDATES]) + list(finals[np.isfinite(last[finals])]) + [token]
    final_probs = softmax(last)
    ids = sorted(dict.fromkeys(int(i) for i in ranked), key=lambda i: (-final_probs[i], -first[i], i))
    records = tuple(StageRecord(name, _stage_setting(name, params), _stage_active(name, params),
                                int(np.isfinite(z).sum()),
                                tuple(float(v) for v in z[ids]), tuple(float(v) for v in softmax(z)[ids]))
                    for name, z in stages)
    return SamplingTrace(params.profile, seed, choice, tuple(ids), records, uniform, token)


class Sampler:
    """The sampler of one response (choice `choice` of n): its own RNG, made once, and the
    ids seen so far (prompt, then each token passed to `accept`)."""

    def __init__(self, params: SamplingParams, prompt_ids, vocab_size: int, choice: int = 0,
                 trace: bool = False):
        self.params = params
        self.choice = choice
        self.trace = trace
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

    def sample(self, logits: np.ndarray) -> Sample:
        """Steps 2-10 on one row of logits (vocab,); records the chosen token."""
        z = logits.astype(np.float64)                                   # step 2
        stages = [("logits", z)]
        penalties, filters = pipeline(self.params, self)
        for name, stage in penalties:                                   # steps 3-4
            z = stage(z)
            stages.append((name, z))
        uniform = None
        if self.params.greedy:
            token = greedy(z)                                           # step 5
        else:
            for name, stage in filters:                                 # steps 6-9
                z = stage(z)
                stages.append((name, z))
            uniform = self.rng.random()
            token = draw(z, uniform)                                    # step 10
        self.accept(token)
        logprobs = log_softmax(z)
        best = np.argsort(-logprobs, kind="stable")[:self.params.top_logprobs] if self.params.top_logprobs else []
        return Sample(token, float(logprobs[token]), tuple((int(i), float(logprobs[i])) for i in best),
                      _trace(self.params, self.seed, self.choice, stages, uniform, token) if self.trace else None)
