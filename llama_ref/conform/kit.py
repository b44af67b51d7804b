"""The kit: the target, the oracle, the settings every check shares, and the list of checks.

A check is a function `(kit, result)` that fills in its Result, registered with `@check(name, spec)`;
its docstring says what it sends and what the spec (docs/spec/) requires. `run` calls the
chosen ones in order; a check that raises (the server went away, a body lacks a field the
API requires) fails with the error as its evidence.
"""
from dataclasses import dataclass

from tqdm import tqdm

from .client import Target
from .oracle import Oracle
from .report import Result

# Prompts the checks share: plain text, code, a list, and one long enough (> 64 tokens) to
# tell a penalty window from the whole prompt.
PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "Monday, Tuesday, Wednesday,",
           "Notes: the the the cat sat on the mat. " * 8 + "Summary: the")
CHATS = (
    [{"role": "user", "content": "Hello! How are you?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And 3 + 3? 🙂"}],
    [{"role": "user", "content": "日本の首都はどこですか？"}],
)


@dataclass
class Kit:
    target: Target
    oracle: Oracle
    samples: int = 200          # requests per sampling setting
    tie_margin: float = 0.05    # nats: a greedy divergence where the oracle's top two are closer is a near-tie
    logprob_tolerance: float = 0.05   # nats between the server's and the oracle's log-probabilities
    alpha: float = 1e-4         # false-alarm rate of each statistical test
    seed: int = 1234            # first seed of the sampled requests
    draws_per_request: int = 2  # n of the sampling requests; 1 once the server refuses n = 2
    arithmetic: float | None = None   # nats: the server's log-probabilities against the oracle's (measured
                                      # by the greedy check, which runs before any check that needs it)


CHECKS: dict = {}
NEEDS: dict = {}    # check -> the checks that must run before it (they measure what it reads)


def check(name: str, spec: str, needs: tuple[str, ...] = ()):
    def register(function):
        CHECKS[name] = (function, spec)
        NEEDS[name] = needs
        return function
    return register


def run(kit: Kit, names=None, progress: bool = True) -> list[Result]:
    names = list(names or CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise ValueError(f"checks: unknown {', '.join(unknown)}; known: {', '.join(CHECKS)}")
    asked = set(names) | {need for name in names for need in NEEDS[name]}
    names = [name for name in CHECKS if name in asked]      # the registry's order: a need runs first
    results = []
    bar = tqdm(names, disable=not progress, unit="check")
    for name in bar:
        function, spec = CHECKS[name]
        bar.set_postfix_str(f"{name}, {kit.target.requests} requests")
        result = Result(name, spec)
        try:
            function(kit, result)
        except Exception as err:   # the server broke off, or answered without a required field
            result.flag("fail", f"the check could not finish: {type(err).__name__}: {err}")
        if not result.summary:
            result.summary = summarize(result)
        results.append(result)
    return results


def summarize(result: Result) -> str:
    findings = [line for line in result.evidence if line.startswith("**") and not line.startswith("**pass")]
    return findings[0].split(": ", 1)[1][:160] if findings else "as the spec says"
