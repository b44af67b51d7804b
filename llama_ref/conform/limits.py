"""Checks 8-10: seeds and n, limits and validation, JSON mode."""
import json

from .client import DIALECTS
from .kit import CHATS, PROMPTS, Kit, check
from .report import Result

# (field, value) outside each parameter's range on the OpenAI routes (api.md §2)
OUT_OF_RANGE = (("temperature", -0.5), ("temperature", 2.5), ("top_p", 1.5), ("top_p", -0.1), ("top_k", -5),
                ("min_p", 1.5), ("presence_penalty", 2.5), ("frequency_penalty", -2.5), ("repetition_penalty", 0.0),
                ("n", 0), ("max_tokens", -1), ("seed", -1), ("top_logprobs", 21))


def names_field(exchange, name: str) -> bool:
    error = (exchange.body or {}).get("error")
    text = json.dumps(error) if error is not None else exchange.raw
    return name in text


def judge_rejection(result: Result, label: str, exchange, name: str, accepted: str) -> None:
    """A 4xx naming the field passes; a 200 (the value clamped or ignored) is a divergence,
    `accepted` saying what that means; a 5xx or a hang fails."""
    if 400 <= exchange.status < 500 and names_field(exchange, name):
        result.note(f"{label}: {exchange.status}, naming {name}")
    elif 400 <= exchange.status < 500:
        result.flag("diverges", f"{label}: {exchange.status} without naming {name}: {exchange.excerpt(160)}")
    elif exchange.status == 200:
        result.flag("diverges", f"{label}: 200, {accepted}")
    else:
        result.flag("fail", f"{label}: {exchange.status} {exchange.excerpt(160)}")


@check("seeds", "sampling.md step 10 (the draw, seed + i), decisions N1-N3; step 15 (usage)")
def check_seeds(kit: Kit, result: Result) -> None:
    """The same seed gives the same text; n = 2 returns choices 0 and 1 whose token counts add
    up to usage.completion_tokens; response 0 of n = 2 is the n = 1 response (decision N1)."""
    sampling = {"temperature": 1.0, "seed": kit.seed}
    first, again = (kit.target.chat(CHATS[0], sampling, max_tokens=16) for _ in range(2))
    if first.status != 200 or again.status != 200:
        result.flag("fail", f"seeded chat: {first.status}, {again.status} {again.excerpt()}")
        return
    texts = [e.choice()["message"]["content"] for e in (first, again)]
    if texts[0] != texts[1]:
        result.flag("fail", f"seed {kit.seed} twice gave {texts[0][:40]!r} and {texts[1][:40]!r}")
    else:
        result.note(f"seed {kit.seed} twice: the same text {texts[0][:40]!r}")
    pair = kit.target.chat(CHATS[0], sampling, max_tokens=8, n=2, logprobs=True)
    if pair.status != 200:
        if pair.status >= 500:
            result.flag("fail", f"n = 2: {pair.status} {pair.excerpt(120)}")
        else:
            result.skip(f"n = 2 is refused: {pair.status} {pair.excerpt(120)}")
        return
    choices = pair.body["choices"]
    if sorted(c["index"] for c in choices) != [0, 1]:
        result.flag("fail", f"n = 2: choice indices {[c['index'] for c in choices]}")
        return
    counts = [len((c.get("logprobs") or {}).get("content") or []) for c in choices]
    usage = pair.body["usage"]
    if all(counts) and usage["completion_tokens"] != sum(counts):
        result.flag("fail", f"n = 2: usage.completion_tokens {usage['completion_tokens']}, the choices hold "
                            f"{counts} tokens")
    if usage["prompt_tokens"] != first.body["usage"]["prompt_tokens"]:
        result.flag("fail", f"n = 2: prompt_tokens {usage['prompt_tokens']}, n = 1: {first.body['usage']['prompt_tokens']}")
    one = kit.target.chat(CHATS[0], sampling, max_tokens=8)
    if one.status == 200 and one.choice()["message"]["content"] != next(
            c for c in choices if c["index"] == 0)["message"]["content"]:
        result.flag("diverges", "n = 2: response 0 is not the n = 1 response of the same seed (decision N1: "
                                "response i draws with seed + i)")
    else:
        result.note(f"n = 2: choices 0 and 1, {counts} tokens, usage {usage['completion_tokens']}; response 0 = n = 1")


@check("limits", "sampling.md step 0 (ranges), step 12(c) and decisions (max_tokens 0); api.md §1-§3 (errors)")
def check_limits(kit: Kit, result: Result) -> None:
    """max_tokens 0 gives no token and finish "length"; max_tokens 1 one token; a prompt past
    the context and every out-of-range parameter get a 4xx naming the field (a 200 is a
    divergence: the value was clamped or ignored; a 5xx fails)."""
    prompt = PROMPTS[0]
    zero = kit.target.complete(prompt, {"temperature": 0.0}, max_tokens=0)
    if zero.status == 200:
        choice = zero.choice()
        if choice["text"] or choice["finish_reason"] != "length" or zero.body["usage"]["completion_tokens"]:
            result.flag("fail", f"max_tokens 0: {zero.excerpt(200)}; the spec: no token, finish length")
        else:
            result.note("max_tokens 0: no token, finish length")
    else:
        judge_rejection(result, "max_tokens 0", zero, "max_tokens", "")
    one = kit.target.complete(prompt, {"temperature": 1.0, "seed": kit.seed}, max_tokens=1)
    if one.status != 200 or one.body["usage"]["completion_tokens"] != 1:
        result.flag("fail", f"max_tokens 1: {one.status} {one.excerpt(200)}")
    else:
        result.note("max_tokens 1: one token")
    context = kit.oracle.context_length()
    words = context + 16
    too_long = "hello " * words
    while len(kit.oracle.completion_ids(too_long)) <= context:
        words *= 2
        too_long = "hello " * words
    over = kit.target.complete(too_long, {"temperature": 0.0}, max_tokens=1)
    judge_rejection(result, f"a prompt of {len(kit.oracle.completion_ids(too_long))} tokens (context {context})",
                    over, "prompt", "the prompt was truncated or the context exceeded")
    for name, value in OUT_OF_RANGE:
        route_field = name in ("n", "max_tokens", "top_logprobs")
        extra = {"max_tokens": 2, "logprobs": name == "top_logprobs", **({name: value} if route_field else {})}
        exchange = kit.target.chat(CHATS[0], {"seed": kit.seed, **({} if route_field else {name: value})}, **extra)
        sent = DIALECTS[kit.target.dialect].get(name, name)   # the name the server was sent
        judge_rejection(result, f"{sent} {value}", exchange, sent, f"{sent} {value} was clamped or ignored")


@check("json_mode", "api.md §2 (response_format json_object); sampling.md (constrained decoding)")
def check_json_mode(kit: Kit, result: Result) -> None:
    """response_format {"type": "json_object"}: the content parses as a JSON object, greedy and sampled."""
    messages = [{"role": "user", "content": "Describe a cat as a JSON object with a name and an age."}]
    for sampling in ({"temperature": 0.0}, {"temperature": 1.0, "seed": kit.seed}):
        exchange = kit.target.chat(messages, sampling, max_tokens=64, response_format={"type": "json_object"})
        if 400 <= exchange.status < 500:
            result.skip(f"response_format json_object refused: {exchange.excerpt(160)}")
            return
        if exchange.status != 200:
            result.flag("fail", f"{sampling}: {exchange.status} {exchange.excerpt(160)}")
            continue
        content = exchange.choice()["message"]["content"]
        try:
            parsed = json.loads(content)
        except ValueError as err:
            result.flag("fail", f"{sampling}: not JSON ({err}): {content[:120]!r}")
            continue
        if isinstance(parsed, dict):
            result.note(f"{sampling}: a JSON object {content[:80]!r}")
        else:
            result.flag("fail", f"{sampling}: JSON, but a {type(parsed).__name__}, not an object: {content[:80]!r}")
