"""Check 4: sampled tokens follow the distribution the parameters define.

For each setting, `kit.samples` seeded requests of one token each. The oracle gives, for the
reference and for each profile, the ids a token may be drawn from and their probabilities.
Hard check: no sample outside the allowed support. Statistical check: the counts against
the expected probabilities, chi-square, rejecting at p < kit.alpha. A sample is known by its
text and finish_reason (what every server returns), so ids with the same text share a bin.

Settings are chosen from the oracle's distribution at the prompt: the support has 2-12 ids
(inside the head any server reports), and each parameter sits as far as the model allows from
the values where the support would change, so that a server's other arithmetic (fp16, int8)
does not move a boundary. The combinations are chosen where the reference and a profile
disagree, which is what tells them apart.
"""
import json
from collections import Counter
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom, chisquare

from .client import token_logprobs
from .kit import PROMPTS, Kit, check
from .report import Result
from .vectors import VectorsError

# Candidates for the sampled prompt: the one whose likeliest token is least likely is used,
# so that the draws spread over several ids.
SAMPLING_PROMPTS = ("My favourite fruit is", "She opened the door and saw a", PROMPTS[2], "The weather today is")
OTHER_PROFILES = ("hf", "vllm", "llama.cpp")
SUPPORT = (2, 12)        # allowed support sizes of a chosen setting
MIN_MARGIN = 0.05        # nats from a boundary wanted for a setting (the widest-margin one when none has it)
FULL_SUPPORT = 1000      # beyond this many ids a distribution is binned by its likeliest ids
FRINGE_SHARE = 0.05      # of the draws, at most this many may fall just past an alternative's support


@dataclass(frozen=True)
class Setting:
    name: str
    sampling: dict        # the parameters sent (the others neutral)
    margin: float         # nats between the chosen value and the nearest value that changes the support


def top_k_settings(kit, ids, head, temperature=1.0):
    ls = kit.oracle.head(ids, 1.0, SUPPORT[1] + 1, head)
    return [Setting("top_k", {"temperature": temperature, "top_k": k}, ls[k - 1] - ls[k])
            for k in range(SUPPORT[0], SUPPORT[1] + 1)]


def top_p_settings(kit, ids, head, temperature=1.0):
    """p between the cumulative masses of the j-th and (j+1)-th likeliest ids: keeps j ids."""
    cumulative = np.cumsum(np.exp(kit.oracle.head(ids, temperature, SUPPORT[1] + 1, head)))
    out = []
    for j in range(SUPPORT[0], SUPPORT[1] + 1):
        low, high = np.log(cumulative[j - 2]), np.log(cumulative[j - 1])
        if high >= 0:     # the mass reached 1: no room for a boundary
            break
        out.append(Setting("top_p", {"temperature": temperature, "top_p": float(np.exp((low + high) / 2))},
                           float((high - low) / 2)))
    return out


def min_p_settings(kit, ids, head, temperature=1.0):
    """min_p between the j-th and (j+1)-th ids' probability ratios to the likeliest: keeps j."""
    ls = kit.oracle.head(ids, temperature, SUPPORT[1] + 1, head)
    return [Setting("min_p", {"temperature": temperature, "min_p": float(np.exp((ls[j] + ls[j - 1]) / 2 - ls[0]))},
                    (ls[j - 1] - ls[j]) / 2) for j in range(SUPPORT[0], SUPPORT[1] + 1)]


def support(kit, ids, head, sampling, profile="reference") -> tuple[int, frozenset]:
    """(how many ids may be drawn, the likeliest of them: all when there are at most HEAD)."""
    dist = kit.oracle.distribution(ids, sampling, profile, head)
    return dist["support"], frozenset(dist["ids"])


def best(kit, ids, head, settings, differ_from: str | None = None) -> Setting | None:
    """Among the settings whose reference support has an allowed size (and differs from
    profile `differ_from`'s, when given): the largest support at least MIN_MARGIN from a
    boundary, else the widest margin."""
    fitting = []
    for setting in settings:
        ours = support(kit, ids, head, setting.sampling)
        if not SUPPORT[0] <= ours[0] <= SUPPORT[1]:
            continue
        if differ_from and support(kit, ids, head, setting.sampling, differ_from) == ours:
            continue
        fitting.append((ours[0], setting))
    safe = [(size, s) for size, s in fitting if s.margin >= MIN_MARGIN]
    if safe:
        return max(safe, key=lambda pair: pair[0])[1]
    return max((s for _, s in fitting), key=lambda s: s.margin, default=None)


def sampling_prompt(kit: Kit) -> tuple[str, list]:
    """(prompt, ids) of the candidate whose likeliest next token is least likely."""
    ids = {p: kit.oracle.completion_ids(p) for p in SAMPLING_PROMPTS}
    prompt = min(SAMPLING_PROMPTS, key=lambda p: kit.oracle.head(ids[p], 1.0, 1)[0])
    return prompt, ids[prompt]


def settings(kit: Kit, ids: list, head) -> list[tuple[str, Setting | None]]:
    """(what it probes, the setting) for each case; None when the model offers no such case."""
    cases = [("temperature alone (full support, binned)", Setting("temperature", {"temperature": 0.7}, np.inf)),
             ("top_k", best(kit, ids, head, top_k_settings(kit, ids, head))),
             ("top_p", best(kit, ids, head, top_p_settings(kit, ids, head))),
             ("min_p", best(kit, ids, head, min_p_settings(kit, ids, head))),
             ("temperature before top_k: top_k with temperature 2",
              best(kit, ids, head, top_k_settings(kit, ids, head, 2.0))),
             ("temperature before top_p (llama.cpp divides last)",
              best(kit, ids, head, top_p_settings(kit, ids, head, 0.5), differ_from="llama.cpp")),
             ("temperature before min_p (llama.cpp divides last)",
              best(kit, ids, head, min_p_settings(kit, ids, head, 2.0), differ_from="llama.cpp"))]
    top_p = cases[2][1]
    if top_p is not None:
        # vLLM V1 applies min_p before top_p: a min_p that cuts inside the top_p set changes it
        with_min_p = [Setting("top_p+min_p", {**top_p.sampling, "min_p": s.sampling["min_p"]}, s.margin)
                      for s in min_p_settings(kit, ids, head)]
        cases.append(("min_p after top_p (vLLM V1 applies it first)",
                      best(kit, ids, head, with_min_p, differ_from="vllm")))
    return cases


def expected_bins(kit, ids, dist: dict, samples: int) -> tuple[dict, float]:
    """({(text, finish_reason): probability}, the probability of every other outcome): a
    support wider than FULL_SUPPORT keeps the ids expected at least once in `samples` draws."""
    chosen = [(i, p) for i, p in zip(dist["ids"], dist["probs"]) if dist["support"] <= FULL_SUPPORT or p * samples >= 1]
    bins: dict = {}
    for (text, finish), (_, p) in zip(kit.oracle.one_token_texts(ids, [i for i, _ in chosen]), chosen):
        bins[(text, finish)] = bins.get((text, finish), 0.0) + p
    return bins, max(0.0, 1.0 - sum(bins.values()))


def fit(kit, expected: tuple[dict, float], bounded: bool, counts: Counter, fringe=frozenset()) -> tuple[bool, str]:
    """Whether the observed counts fit the expected bins: (fits, the numbers). Draws of the
    `fringe` (the ids just past an alternative's support, where the setting's margin was not
    chosen for it and the server's arithmetic can move the boundary) are set aside, up to
    FRINGE_SHARE of them."""
    bins, other = expected
    aside = {k: c for k, c in counts.items() if k in fringe and k not in bins}
    if aside and sum(aside.values()) <= FRINGE_SHARE * sum(counts.values()):
        counts = Counter({k: c for k, c in counts.items() if k not in aside})
    else:
        aside = {}
    note = f" ({sum(aside.values())} draws just past its support set aside)" if aside else ""
    samples = sum(counts.values())
    outside = {k: c for k, c in counts.items() if k not in bins}
    if bounded and outside:
        shown = ", ".join(f"{k[0]!r}×{c}" for k, c in list(outside.items())[:5])
        return False, f"{sum(outside.values())} of {samples} draws outside the {len(bins)} allowed texts ({shown})"
    # a text drawn far more often than its probability allows: an exact binomial tail, which
    # holds where chi-square's approximation does not (expected counts below 5)
    excess = [(key, count, float(binom.sf(count - 1, samples, bins[key]))) for key, count in counts.items()
              if key in bins and count > bins[key] * samples]
    worst = min(excess, key=lambda e: e[2], default=None)
    if worst and worst[2] < kit.alpha / len(bins):
        return False, (f"{worst[0][0]!r} drawn {worst[1]} times where {bins[worst[0]] * samples:.2g} were expected "
                       f"(binomial tail {worst[2]:.2g})")
    observed, expected_counts, rest_observed, rest_expected = [], [], sum(outside.values()), other
    for key, p in bins.items():
        if p * samples >= 5:
            observed.append(counts.get(key, 0))
            expected_counts.append(p * samples)
        else:
            rest_observed += counts.get(key, 0)
            rest_expected += p
    if rest_expected * samples > 1e-9:
        observed.append(rest_observed)
        expected_counts.append(rest_expected * samples)
    if len(observed) < 2:
        return True, f"one bin holds all {samples} draws{note}"
    expected_counts = np.asarray(expected_counts) * samples / sum(expected_counts)
    p_value = float(chisquare(observed, expected_counts).pvalue)
    return p_value >= kit.alpha, f"chi-square over {len(observed)} bins, p = {p_value:.3g}{note}"


def server_head(kit: Kit, result: Result, prompt: str, ids: list) -> list | None:
    """The server's own raw log-probabilities of its likeliest next tokens ([[id, logprob]]),
    when it reports them: the expected distributions start from these rather than the
    oracle's, so that the server's arithmetic (8-bit activations, fp16) does not count
    against its sampling. None, and the oracle's, when it reports none."""
    for count in (20, 5):
        exchange = kit.target.complete(prompt, {"temperature": 1.0}, max_tokens=1, logprobs=count)
        if exchange.status == 200:
            break
    parsed = token_logprobs(exchange.choice()) if exchange.status == 200 else None
    if not parsed or not parsed[1] or not parsed[1][0]["top"]:
        result.note("expected distributions from the oracle's log-probabilities: the server reports none")
        return None
    top = parsed[1][0]["top"]
    unnamed = [text for text, token, _ in top if token is None]
    named = dict(zip(unnamed, kit.oracle.token_ids(unnamed)))
    head = [[token if token is not None else named[text], logprob] for text, token, logprob in top
            if token is not None or named[text] is not None]
    try:
        oracle = dict(map(tuple, kit.oracle.top_logprobs(ids, len(head))))
        kit.oracle.head(ids, 1.0, 1, head)
    except VectorsError:
        result.note("expected distributions from the oracle's log-probabilities: the vectors hold none for this "
                    "server's own")
        return None
    differences = [abs(logprob - oracle[token]) for token, logprob in head if token in oracle]
    result.note(f"expected distributions from the server's own log-probabilities of its {len(head)} likeliest "
                f"tokens (up to {max(differences, default=0):.2e} nats from the oracle's), the oracle's beyond")
    return head


def sample(kit: Kit, prompt: str, sampling: dict) -> Counter:
    """kit.samples one-token draws, two per request (n = 2, seeds two apart, since llama-ref's
    response i draws with seed + i) unless the server refuses n = 2."""
    counts: Counter = Counter()
    seed = kit.seed
    while sum(counts.values()) < kit.samples:
        exchange = kit.target.complete(prompt, {**sampling, "seed": seed}, max_tokens=1, n=kit.draws_per_request)
        if exchange.status != 200 and kit.draws_per_request > 1:
            kit.draws_per_request = 1
            continue
        if exchange.status != 200:
            raise RuntimeError(f"{sampling} answered {exchange.status}: {exchange.excerpt()}")
        for choice in exchange.body["choices"][:kit.samples - sum(counts.values())]:
            counts[(choice["text"], choice["finish_reason"])] += 1
        seed += 2
    return counts


def candidates(kit: Kit, ids: list, head, sampling: dict) -> list[tuple[str, str | None, tuple, bool, frozenset]]:
    """(semantics, the verdict a fit gives, expected bins, bounded support, fringe texts) for
    the reference, each profile and the parameter being ignored, all computed before any draw.
    The reference has no fringe: its setting was chosen away from its boundaries."""
    unfiltered = kit.oracle.distribution(ids, {"temperature": sampling["temperature"]}, "reference", head)
    out = []
    for name, verdict, dist in (
            [("reference", None, kit.oracle.distribution(ids, sampling, "reference", head))] +
            [(f"profile {p}", "diverges", kit.oracle.distribution(ids, sampling, p, head)) for p in OTHER_PROFILES] +
            [("the parameter accepted but ignored", "fail", unfiltered)]):
        bounded = dist["support"] <= FULL_SUPPORT
        past = [i for i in unfiltered["ids"] if i not in set(dist["ids"])][:max(3, dist["support"] // 10)]
        fringe = frozenset(map(tuple, kit.oracle.one_token_texts(ids, past))) if bounded and name != "reference" \
            else frozenset()
        out.append((name, verdict, expected_bins(kit, ids, dist, kit.samples), bounded, fringe))
    return out


@check("sampling", "sampling.md steps 6-10 (temperature, top_k, top_p, min_p, the draw); §2-§5 for the profiles")
def check_sampling(kit: Kit, result: Result) -> None:
    """For temperature, top_k, top_p, min_p and combinations whose order matters: no draw
    outside the allowed ids, and the frequencies fit the expected probabilities. A setting that
    fails the reference is tried against each profile (a documented engine's semantics) and
    against the parameter being ignored."""
    prompt, ids = sampling_prompt(kit)
    head = server_head(kit, result, prompt, ids)
    result.note(f"prompt {prompt!r}, {kit.samples} one-token draws per setting ({kit.draws_per_request} per "
                f"request), seeds {kit.seed}.., each test rejecting at p < {kit.alpha:g}")
    for what, setting in settings(kit, ids, head):
        if setting is None:
            result.note(f"{what}: no setting of this model's distribution at the prompt tells it apart; not probed")
            continue
        semantics = candidates(kit, ids, head, setting.sampling)
        counts = sample(kit, prompt, setting.sampling)
        shown = ", ".join(f"{k[0]!r}×{c}" for k, c in counts.most_common(6))
        line = f"{what} {setting.sampling} (margin {setting.margin:.3g} nats): observed {shown}"
        fits, detail = fit(kit, semantics[0][2], semantics[0][3], counts)
        if fits:
            result.note(f"{line}; reference: {detail}")
            continue
        verdict = ("fail", f"{line}; reference: {detail}", None)
        for name, kind, expected, bounded, fringe in semantics[1:]:
            matches, why = fit(kit, expected, bounded, counts, fringe)
            if matches:
                verdict = (kind, f"{line}; reference: {detail}; fits {name}: {why}", name)
                break
        result.flag(*verdict)
        if verdict[0] != "diverges":
            result.note(f"all draws of that setting: {json.dumps({k[0]: c for k, c in counts.items()}, ensure_ascii=False)}")
    probe_top_p_boundary(kit, result, prompt, ids)


def probe_top_p_boundary(kit: Kit, result: Result, prompt: str, ids: list) -> None:
    """top_p exactly equal to the mass before the (j+1)-th id: the spec keeps j ids (mass before
    < p), Meta's reference j + 1 (<= p, §4). Decisive only when the server's probabilities are
    the oracle's to the last bit, so this runs only then."""
    kept = SUPPORT[0]
    p = kit.oracle.top_p_boundary(ids, kept)
    ours = [logprob for _, logprob in kit.oracle.top_logprobs(ids, 5)]
    exchange = kit.target.complete(prompt, {"temperature": 1.0}, max_tokens=1, logprobs=5)
    parsed = token_logprobs(exchange.choice()) if exchange.status == 200 else None
    top = [logprob for _, _, logprob in parsed[1][0]["top"]] if parsed and parsed[1] else None
    if p is None:
        result.note(f"top_p at a boundary: ids {kept} and {kept + 1} (by probability) tie; not probed")
        return
    if not top:
        result.note("top_p at a boundary: the server reports no top log-probabilities; not probed")
        return
    if sorted(top, reverse=True) != ours[:len(top)]:
        result.note("top_p at a boundary: the server's log-probabilities are not the oracle's bit for bit; not probed")
        return
    sampling = {"temperature": 1.0, "top_p": p}
    expected = expected_bins(kit, ids, kit.oracle.distribution(ids, sampling), kit.samples)
    fits, detail = fit(kit, expected, True, sample(kit, prompt, sampling))
    line = f"top_p {p!r}, exactly the mass before id {kept + 1} (by probability): the spec keeps {kept} ids; {detail}"
    if fits:
        result.note(line)
    else:
        result.flag("diverges", line + f"; id {kept + 1} was drawn: top_p keeps an id whose preceding mass "
                                       "equals p", "Meta's Llama-2 reference (§4, mass before <= p)")
