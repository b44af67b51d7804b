"""Checks 1-3: the prompt's tokens, greedy continuations and reported log-probabilities."""
import math

from .client import token_logprobs
from .kit import CHATS, PROMPTS, Kit, check
from .report import Result

GREEDY_TOKENS = 16
GREEDY = {"temperature": 0.0}


def usage_of(exchange, result: Result) -> dict | None:
    if exchange.status != 200:
        result.flag("fail", f"{exchange.route} answered {exchange.status}: {exchange.excerpt()}")
        return None
    return exchange.body.get("usage") or {}


@check("tokenization", "sampling.md step 1 (prompt ids), step 15 (usage); formats.md (chat formats)")
def check_tokenization(kit: Kit, result: Result) -> None:
    """usage.prompt_tokens of raw completions and of chat requests (1-3 turns, a system message,
    emoji, CJK) equal the oracle's prompt ids; completion and total tokens add up."""
    cases = [(p, kit.oracle.completion_ids(p), kit.target.complete(p, GREEDY, max_tokens=1)) for p in PROMPTS]
    cases += [(m, kit.oracle.chat_ids(m), kit.target.chat(m, GREEDY, max_tokens=1)) for m in CHATS]
    for prompt, ids, exchange in cases:
        usage = usage_of(exchange, result)
        if usage is None:
            continue
        label = f"{exchange.route} {str(prompt)[:60]!r}"
        if usage.get("prompt_tokens") != len(ids):
            result.flag("fail", f"{label}: prompt_tokens {usage.get('prompt_tokens')}, the oracle's prompt has "
                                f"{len(ids)} ids")
        elif usage.get("completion_tokens") != 1 or usage.get("total_tokens") != len(ids) + 1:
            result.flag("fail", f"{label}: max_tokens 1 gave usage {usage}; expected completion_tokens 1 and "
                                f"total_tokens {len(ids) + 1}")
        else:
            result.note(f"{label}: {len(ids)} prompt tokens, as the oracle")


def first_divergence(server_text: str, expected: dict) -> tuple[int, int]:
    """(character, step): where the server's text first differs from the oracle's greedy
    response `expected`, and which of the oracle's generated tokens covers that character."""
    text = expected["text"]
    char = next((i for i, (a, b) in enumerate(zip(server_text, text)) if a != b), min(len(server_text), len(text)))
    end = 0
    for step, delta in enumerate(expected["deltas"]):
        end += len(delta)
        if end > char:
            return char, step
    return char, len(expected["deltas"]) - 1


def compare_greedy(kit: Kit, result: Result, label: str, server_text: str, expected: dict,
                   arithmetic: float | None = None) -> bool:
    """True when the server's greedy text is the oracle's, or first differs at a near-tie: the
    oracle's top two within kit.tie_margin nats there (after the request's penalties).
    `arithmetic` is how far the server's own log-probabilities were from the oracle's on the
    tokens before (when it reports them): a first difference within twice that is the
    server's arithmetic (fp16, 8-bit activations), a divergence rather than a failure."""
    if server_text == expected["text"]:
        return True
    char, step = first_divergence(server_text, expected)
    gap = expected["gaps"][step] if expected["gaps"] else float("inf")
    where = (f"{label}: the server's text first differs at character {char}, the oracle's step {step} "
             f"(server {server_text[char:char + 20]!r}, oracle {expected['text'][char:char + 20]!r}); the oracle's "
             f"top two there are {gap:.4f} nats apart")
    if gap < kit.tie_margin:
        result.note(f"{where}, below the tie margin {kit.tie_margin}: a near-tie, not counted")
        return True
    if arithmetic is not None and gap <= 2 * arithmetic:
        result.flag("diverges", f"{where}; on the tokens before, the server's log-probabilities differ from the "
                                f"oracle's by up to {arithmetic:.4f} nats, so the flip is within its arithmetic",
                    "the server's own arithmetic (measured from its log-probabilities)")
        return False
    result.flag("fail", where + ("" if arithmetic is None else
                                 f"; the server's log-probabilities were within {arithmetic:.4f} nats before"))
    return False


def arithmetic_error(kit: Kit, ids: list, exchange, expected: dict) -> float | None:
    """The largest |server - oracle| log-probability over the generated tokens the two share
    (before the texts part), when the server reports log-probabilities."""
    parsed = token_logprobs(exchange.choice())
    if not parsed:
        return None
    oracle = kit.oracle.token_logprobs(ids, expected["ids"])
    char, step = first_divergence(exchange.choice()["text"], expected)
    shared = [abs(entry["logprob"] - theirs) for entry, theirs in zip(parsed[1][:step], oracle[:step])
              if entry["logprob"] is not None]
    return max(shared, default=None)


@check("greedy", "sampling.md step 5 (greedy: the argmax, lowest id among equal maxima)")
def check_greedy(kit: Kit, result: Result) -> None:
    """temperature 0 continuations of each prompt equal the oracle's token for token, or first
    differ where the oracle's top-2 log-probability gap is below the tie margin (or, for a
    server reporting log-probabilities, within twice its measured arithmetic error)."""
    cases = []
    for prompt in PROMPTS:
        ids = kit.oracle.completion_ids(prompt)
        exchange = kit.target.complete(prompt, GREEDY, max_tokens=GREEDY_TOKENS, logprobs=1)
        if usage_of(exchange, result) is not None:
            cases.append((prompt, ids, exchange, kit.oracle.greedy(ids, GREEDY_TOKENS)))
    errors = [e for e in (arithmetic_error(kit, ids, x, expected) for _, ids, x, expected in cases) if e is not None]
    kit.arithmetic = max(errors, default=None)
    if kit.arithmetic is not None:
        result.note(f"the server's log-probabilities of the tokens it shares with the oracle differ from the "
                    f"oracle's by up to {kit.arithmetic:.2e} nats")
    for prompt, ids, exchange, expected in cases:
        if compare_greedy(kit, result, repr(prompt[:40]), exchange.choice()["text"], expected, kit.arithmetic):
            result.note(f"{prompt[:40]!r}: {GREEDY_TOKENS} greedy tokens as the oracle: {expected['text'][:60]!r}")


@check("logprobs", "sampling.md step 10 (the reported logprob: the distribution the token was drawn from)")
def check_logprobs(kit: Kit, result: Result) -> None:
    """Greedy: each token's logprob equals the oracle's log-softmax within the tolerance.
    Sampled with temperature and top_k: the chosen token's logprob is the post-filter one (the
    spec), or the raw one (vLLM's default `raw_logprobs` mode), and top_logprobs hold only
    survivors."""
    prompt = PROMPTS[0]
    ids = kit.oracle.completion_ids(prompt)
    exchange = kit.target.complete(prompt, GREEDY, max_tokens=8, logprobs=5)
    if usage_of(exchange, result) is None:
        return
    parsed = token_logprobs(exchange.choice())
    if not parsed:
        result.skip(f"no logprobs in a completion asked for logprobs 5: {exchange.excerpt()}")
        return
    shape, entries = parsed
    if shape == "chat":
        result.flag("diverges", "/completions returns its logprobs in the chat shape ({content: [{token, logprob, "
                                "top_logprobs}]}), not the completions shape ({tokens, token_logprobs, top_logprobs})",
                    "llama.cpp's llama-server")
    expected = kit.oracle.greedy(ids, 8)
    if exchange.choice()["text"] != expected["text"]:
        result.note("the greedy text differs from the oracle's (see the greedy check); compared up to it")
    raw = kit.oracle.token_logprobs(ids, expected["ids"])
    theirs = [e["logprob"] for e in entries][:len(raw)]
    delta = max(abs(t - r) for t, r in zip(theirs, raw))
    line = f"greedy, {len(theirs)} tokens: max |server - oracle| logprob {delta:.2e} nats"
    if delta > kit.logprob_tolerance:   # the same tokens, other numbers: the server's arithmetic
        result.flag("diverges", line + f" > {kit.logprob_tolerance}", "the server's own arithmetic")
    else:
        result.note(line)

    sampling = {"temperature": 0.5, "top_k": 3}
    exchange = kit.target.complete(prompt, {**sampling, "seed": kit.seed}, max_tokens=1, logprobs=5)
    if usage_of(exchange, result) is None:
        return
    choice = exchange.choice()
    survivors = kit.oracle.distribution(ids, sampling)
    raw_of = dict(kit.oracle.top_logprobs(ids, 20))
    texts = {text: (token, p) for (text, _), token, p in
             zip(kit.oracle.one_token_texts(ids, survivors["ids"]), survivors["ids"], survivors["probs"])}
    if choice["text"] not in texts:
        result.flag("fail", f"temperature 0.5, top_k 3: the sampled text {choice['text']!r} is none of the "
                            f"survivors' {sorted(texts)!r}")
        return
    token, p = texts[choice["text"]]
    post, raw_logprob = math.log(p), raw_of.get(token, float("nan"))
    parsed = token_logprobs(choice)
    if not parsed:
        result.flag("fail", f"temperature 0.5, top_k 3: no logprobs, asked for 5: {exchange.excerpt()}")
        return
    reported, entries = parsed[1][0]["logprob"], len(parsed[1][0]["top"])
    line = (f"temperature 0.5, top_k 3, logprobs 5: token {choice['text']!r} reported {reported:.4f}; oracle "
            f"post-filter {post:.4f}, raw {raw_logprob:.4f}; {entries} top_logprobs entries")
    if abs(reported - post) <= kit.logprob_tolerance and entries <= survivors["support"]:
        result.note(line + f" (the post-filter distribution, {survivors['support']} survivors)")
    elif abs(reported - raw_logprob) <= kit.logprob_tolerance:
        result.flag("diverges", line + ": raw log-probabilities, before temperature and filters",
                    "vLLM (logprobs_mode raw_logprobs, its default)")
    else:
        result.flag("fail", line)
