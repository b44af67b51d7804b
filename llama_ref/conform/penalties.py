"""Check 5: what the repetition, presence and frequency penalties really do.

Greedy decoding with one penalty at a time, on a prompt and value the oracle picks so that
the reference's continuation differs from every alternative semantics' continuation: the
server's text then says which one it implements. The alternatives are the profiles (a
documented engine's rule: llama.cpp's 64-token window counting the prompt, §6, §7) and the
usual mistakes (the penalty ignored, its sign flipped, a frequency counted once per token).
"""
from ..decoding.sampling import LLAMA_CPP_PENALTY_WINDOW
from .kit import PROMPTS, Kit, check
from .report import Result
from .tokens import compare_greedy

TOKENS = 24
VALUES = {"repetition_penalty": (1.5, 3.0, 0.7), "presence_penalty": (1.5, -1.5, 0.7),
          "frequency_penalty": (-1.0, 1.0, -2.0, 2.0, -0.5, 0.5)}
# Words early in a prompt longer than llama.cpp's window, asked for at its end: the reference
# penalises them, llama.cpp's window no longer sees them.
WINDOW_PROMPT = ("Remember four words: apple, river, violin, candle. Now a long digression about nothing in "
                 "particular, to fill the page: " + ", ".join(str(i) for i in range(40)) +
                 ". The four words to remember were")
PENALTY_PROMPTS = (WINDOW_PROMPT,) + PROMPTS[:4]


def alternatives(name: str, value: float, prompt_len: int) -> list[tuple[str, dict, str, str]]:
    """(semantics, the parameters that give it, the profile, the verdict a match gives)."""
    out = [("the penalty accepted but ignored", {}, "reference", "fail")]
    if prompt_len + TOKENS > LLAMA_CPP_PENALTY_WINDOW or name != "repetition_penalty":
        out.append(("profile llama.cpp (a 64-token window, prompt included)", {name: value}, "llama.cpp", "diverges"))
    if name != "repetition_penalty":
        out.append((f"{name} with the opposite sign", {name: -value}, "reference", "fail"))
    else:
        out.append(("repetition_penalty inverted (1 / r)", {name: 1 / value}, "reference", "fail"))
    if name == "frequency_penalty":
        out.append(("frequency_penalty counted once per distinct token (a presence penalty)",
                    {"presence_penalty": value}, "reference", "fail"))
    return out


def choose(kit: Kit, name: str):
    """(prompt, value, the reference's response, {semantics: text}) telling apart the most
    alternatives."""
    chosen, told = None, -1
    for value in VALUES[name]:
        for prompt in PENALTY_PROMPTS:
            ids = kit.oracle.completion_ids(prompt)
            reference = kit.oracle.greedy(ids, TOKENS, {name: value})
            texts = {alt: kit.oracle.greedy(ids, TOKENS, sampling, profile)["text"]
                     for alt, sampling, profile, _ in alternatives(name, value, len(ids))}
            apart = sum(t != reference["text"] for t in texts.values())
            if apart > told:
                chosen, told = (prompt, value, reference, texts), apart
            if told == len(texts):
                return chosen
    return chosen


@check("penalties", "sampling.md step 3 (repetition), step 4 (frequency, presence); §6, §7 for the profiles",
       needs=("greedy",))
def check_penalties(kit: Kit, result: Result) -> None:
    """Greedy with each penalty, on a case where the semantics give different texts; the
    server's text must be the reference's, or says which alternative it follows."""
    for name in VALUES:
        prompt, value, reference, texts = choose(kit, name)
        exchange = kit.target.complete(prompt, {"temperature": 0.0, name: value}, max_tokens=TOKENS)
        if exchange.status != 200:
            result.flag("fail", f"{name} {value}: {exchange.status} {exchange.excerpt()}")
            continue
        text = exchange.choice()["text"]
        same = [alt for alt, t in texts.items() if t == reference["text"]]
        head = f"{name} {value}, prompt {prompt[:30]!r}, {TOKENS} greedy tokens"
        if same:
            result.note(f"{head}: on this model the reference and {'; '.join(same)} give the same text")
        if text == reference["text"]:
            result.note(f"{head}: the reference's text {text[:50]!r}")
            continue
        prompt_len = len(kit.oracle.completion_ids(prompt))
        match = next(((alt, verdict) for alt, _, _, verdict in alternatives(name, value, prompt_len)
                      if texts[alt] == text and alt not in same), None)
        if match:
            result.flag(match[1], f"{head}: the server's text {text[:50]!r} is what {match[0]} gives; the "
                                  f"reference gives {reference['text'][:50]!r}",
                        match[0] if match[1] == "diverges" else None)
        else:
            compare_greedy(kit, result, head, text, reference, kit.arithmetic)
