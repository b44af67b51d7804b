"""Checks 6-7: stop strings, and the framing of streamed responses."""
import json

from .kit import CHATS, PROMPTS, Kit, check
from .report import Result

STOP_TOKENS = 24
MIN_TEXT = 8       # characters a greedy text needs to hold stop strings worth testing
STREAM_TOKENS = 48
GREEDY = {"temperature": 0.0}
MERGED_USAGE = "include_usage: the usage rides on the finish chunk instead of a last chunk with choices []"


def stop_cases(text: str, pieces: list[str]) -> list[tuple[str, list[str]]]:
    """(what, stop strings) found in a greedy text, from its tokens' pieces when known:
    across a token boundary, inside one token, several stops, a stop in the first token."""
    cases = []
    for i in range(1, len(pieces) - 1):
        if len(pieces[i].strip()) >= 2 and len(pieces[i + 1].strip()) >= 2:
            cases.append(("across a token boundary", [pieces[i][-2:] + pieces[i + 1][:2]]))
            break
    for i in range(1, len(pieces)):
        if len(pieces[i].strip()) >= 4:
            cases.append(("inside one token", [pieces[i].strip()[1:-1]]))
            break
    late, early = text[len(text) * 2 // 3:][:3], text[len(text) // 3:][:3]
    if late.strip() and early.strip():
        cases.append(("two stops, the later-listed one matching first", [late, early]))
    if pieces and pieces[0].strip():
        cases.append(("a stop in the first token", [pieces[0].strip()[:2]]))
    return [(what, stops) for what, stops in cases if all(s and s in text for s in stops)]


def cut(text: str, stops: list[str]) -> tuple[str, str]:
    """(text cut before the stop that ends first (ties: list order), that text with the stop kept)."""
    ends = [(text.find(s) + len(s), i) for i, s in enumerate(stops) if s in text]
    end, i = min(ends)
    return text[:end - len(stops[i])], text[:end]


def streamed_text(exchange, chat: bool) -> str:
    chunks = [e for e in exchange.events if isinstance(e, dict)]
    if chat:
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    return "".join(c["choices"][0].get("text") or "" for c in chunks if c.get("choices"))


def finish_of(exchange) -> str | None:
    reasons = [c["choices"][0].get("finish_reason") for c in exchange.events
               if isinstance(c, dict) and c.get("choices")]
    return next((r for r in reasons if r), None)


@check("stop", "sampling.md step 12(b) (stop strings), step 13 (streaming hold-back); §12")
def check_stop(kit: Kit, result: Result) -> None:
    """Stop strings taken from the server's own greedy text: across a token boundary, inside a
    token, two at once, in the first token. The text is cut before the stop that ends first,
    finish_reason is "stop"; streamed, the deltas add up to the same text, so no part of a stop
    string that matched ever went out."""
    oracle_responses = [kit.oracle.greedy(kit.oracle.completion_ids(p), STOP_TOKENS) for p in PROMPTS]
    tried = 0
    for prompt, expected in zip(PROMPTS, oracle_responses):
        plain = kit.target.complete(prompt, GREEDY, max_tokens=STOP_TOKENS)
        if plain.status != 200:
            result.flag("fail", f"{plain.status} {plain.excerpt()}")
            return
        text = plain.choice()["text"]
        if len(text.strip()) < MIN_TEXT:
            continue
        tried += 1
        known = expected["text"] == text
        pieces = expected["deltas"] if known else [text[i:i + 3] for i in range(0, len(text), 3)]
        if not known:
            result.note(f"{prompt!r}: the greedy text differs from the oracle's; token boundaries are guessed")
        for what, stops in stop_cases(text, pieces):
            expected, kept = cut(text, stops)
            label = f"{what}: prompt {prompt[:30]!r}, stop {stops!r}"
            whole = kit.target.complete(prompt, GREEDY, max_tokens=STOP_TOKENS, stop=stops)
            streamed = kit.target.complete(prompt, GREEDY, max_tokens=STOP_TOKENS, stop=stops, stream=True)
            if whole.status != 200 or streamed.status != 200:
                result.flag("fail", f"{label}: {whole.status} {whole.excerpt()}, streamed {streamed.status}")
                continue
            got, finish = whole.choice()["text"], whole.choice()["finish_reason"]
            deltas = streamed_text(streamed, chat=False)
            if got == kept and got != expected:
                result.flag("diverges", f"{label}: text {got!r} keeps the stop string", "TGI (keeps the stop text, §12)")
            elif got != expected or finish != "stop":
                result.flag("fail", f"{label}: text {got!r}, finish {finish!r}; the spec: {expected!r}, 'stop'")
            elif deltas != expected:
                result.flag("fail", f"{label}: the streamed deltas add up to {deltas!r}, not {expected!r}")
            elif finish_of(streamed) != "stop":
                result.flag("fail", f"{label}: streamed finish_reason {finish_of(streamed)!r}")
            else:
                result.note(f"{label}: {expected!r}, finish stop, streamed alike")
        if tried == 2:
            return
    if not tried:
        result.skip(f"no prompt's greedy text has {MIN_TEXT} characters to put stop strings in")


@check("streaming", "sampling.md step 13 (streaming), step 14 (end inside a character); api.md §2 (chunks)")
def check_streaming(kit: Kit, result: Result) -> None:
    """Streamed chat and text completions: only SSE `data:` lines, each JSON, one final
    `[DONE]`; the role first, one finish_reason after the content, the usage chunk (choices [])
    when asked, equal to the non-streamed usage; no special token as content; no broken
    character in a delta; the deltas add up to the non-streamed text."""
    specials = kit.oracle.special_pieces()
    ended_special = 0
    cases = [(True, m) for m in (CHATS[0], CHATS[3])] + [(False, PROMPTS[2])]
    for chat, prompt in cases:
        send = kit.target.chat if chat else kit.target.complete
        whole = send(prompt, GREEDY, max_tokens=STREAM_TOKENS)
        streamed = send(prompt, GREEDY, max_tokens=STREAM_TOKENS, stream=True, stream_options={"include_usage": True})
        label = f"{'chat' if chat else 'completion'} {str(prompt)[:40]!r}"
        if whole.status != 200 or streamed.status != 200:
            result.flag("fail", f"{label}: {whole.status} / streamed {streamed.status} {streamed.excerpt()}")
            continue
        text = whole.choice()["message"]["content"] if chat else whole.choice()["text"]
        ended_special += whole.choice()["finish_reason"] == "stop"
        ids = kit.oracle.chat_ids(prompt) if chat else kit.oracle.completion_ids(prompt)
        oracle_text = kit.oracle.greedy(ids, STREAM_TOKENS)["text"]
        problems = stream_problems(streamed, chat, text, whole.body.get("usage"), specials, oracle_text)
        for problem in problems:
            if problem == MERGED_USAGE:
                result.flag("diverges", f"{label}: {problem}", "llama.cpp's llama-server (/v1/completions)")
            else:
                result.flag("fail", f"{label}: {problem}")
        if not problems:
            result.note(f"{label}: {len(streamed.events)} events, framing and text as the spec says")
    if not ended_special:
        result.note("no response ended on the model's EOS: special tokens as content were not exercised")


def stream_problems(streamed, chat: bool, text: str, usage: dict | None, specials: list[str],
                    oracle_text: str) -> list[str]:
    """What is wrong with a streamed response, given the same request's non-streamed text and
    usage, and the oracle's text (which shows what special-looking text the model really wrote)."""
    problems = [f"not SSE framing: {line[:80]!r}" for line in streamed.framing[:3]]
    events = streamed.events
    problems += [f"a data payload is not JSON: {e['unparsable'][:80]!r}" for e in events
                 if isinstance(e, dict) and "unparsable" in e][:3]
    if not events or events[-1] != "[DONE]" or events.count("[DONE]") != 1:
        problems.append(f"the stream does not end with exactly one [DONE] (last: {str(events[-1:])[:80]})")
    chunks = [e for e in events if isinstance(e, dict) and "unparsable" not in e]
    if chat and chunks and (chunks[0].get("choices") or [{}])[0].get("delta", {}).get("role") != "assistant":
        problems.append(f"the first chunk does not carry the role: {json.dumps(chunks[0])[:120]}")
    finishes = [i for i, c in enumerate(chunks) if c.get("choices") and c["choices"][0].get("finish_reason")]
    content = [i for i, c in enumerate(chunks) if c.get("choices") and
               ((c["choices"][0].get("delta") or {}).get("content") if chat else c["choices"][0].get("text"))]
    if len(finishes) != 1 or (content and content[-1] > finishes[0]):
        problems.append(f"finish_reason appears {len(finishes)} times, or content follows it")
    usage_chunks = [c for c in chunks if c.get("usage")]
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    if not usage_chunks or any(usage_chunks[-1]["usage"].get(k) != (usage or {}).get(k) for k in counts):
        problems.append(f"include_usage: expected a chunk with the usage {usage}; got "
                        f"{json.dumps(usage_chunks[-1])[:160] if usage_chunks else 'none'}")
    elif usage_chunks[-1].get("choices") != []:
        problems.append(MERGED_USAGE)
    deltas = [((c["choices"][0].get("delta") or {}).get("content") if chat else c["choices"][0].get("text")) or ""
              for c in chunks if c.get("choices")]
    joined = "".join(deltas)
    leaked = [p for p in specials if p in joined and p not in oracle_text]
    if leaked:
        problems.append(f"special tokens streamed as content: {leaked}")
    if "\ufffd" in joined and "\ufffd" not in text:
        problems.append("a delta holds U+FFFD (a character split across chunks) where the whole text has none")
    if joined != text:
        problems.append(f"the deltas add up to {joined[:80]!r}, the non-streamed text is {text[:80]!r}")
    return problems
