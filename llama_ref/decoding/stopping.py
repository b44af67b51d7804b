"""Stop strings, finish reasons and the response text stream (docs/spec/sampling.md steps 12-15).

`ResponseText` takes the text each token adds (from the incremental detokenizer) and gives
back the part of the response that is safe to send now: text that could still turn into a
stop string is held back, and once a stop string matches, the response is cut before it
and nothing after it is ever sent. Concatenating what it returns gives the final text,
byte for byte, streamed or not (S6).

Where the peers differ (docs/spec/sampling.md §12, §14): the match that ends earliest wins,
ties by list order (vLLM V1; vLLM V0 takes list order, llama.cpp the earliest start); the
stop text is stripped (vLLM, llama.cpp, OpenAI; TGI keeps it and only sees a stop at the very
end of the text); the hold-back is the longest suffix that is a prefix of a stop string
(llama.cpp; vLLM holds a fixed max(len(stop)) - 1 characters); EOS and stop strings win over
length on the same token (vLLM, llama.cpp; TGI reports length).
"""
from dataclasses import dataclass

# Native (TGI) finish reasons; the OpenAI routes report "stop" for the first two.
EOS = "eos_token"
STOP_SEQUENCE = "stop_sequence"
LENGTH = "length"
TOOL_CALLS = "tool_calls"     # the answer is tool calls, ended by end-of-sequence (decoding/tools.py)


def find_stop(text: str, stops: tuple[str, ...], new_chars: int) -> int | None:
    """Step 12(b): where to cut `text` for the stop string whose first occurrence ends
    earliest, ties by list order; only matches that end in the last `new_chars` characters
    are new (earlier ones were found when their text arrived). None if no stop matches."""
    best_end, cut = None, None
    for stop in stops:
        start = text.find(stop, max(0, len(text) - new_chars - len(stop) + 1))
        if start >= 0 and (best_end is None or start + len(stop) < best_end):
            best_end, cut = start + len(stop), start
    return cut


def stop_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """Step 13: the length of the longest suffix of `text` that is a prefix of a stop string
    (and so might still become one); that much is held back while streaming."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


@dataclass
class ResponseText:
    """The generated text of one response and how much of it has been sent."""
    stops: tuple[str, ...]
    text: str = ""       # everything the detokenizer produced (cut at a stop once matched)
    sent: int = 0        # characters of `text` already returned
    stopped: bool = False

    def add(self, piece: str) -> str:
        """Append a token's text; return what can be sent now ("" while held back)."""
        self.text += piece
        cut = find_stop(self.text, self.stops, len(piece))
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            return self.finish("")
        safe = len(self.text) - stop_prefix_length(self.text, self.stops)
        delta, self.sent = self.text[self.sent:safe], safe
        return delta

    def finish(self, tail: str) -> str:
        """At the end of the response: `tail` (the detokenizer's flush, step 14) is added and
        searched like any text, then everything not yet sent is returned."""
        if tail and not self.stopped:
            self.text += tail
            cut = find_stop(self.text, self.stops, len(tail))
            if cut is not None:
                self.text, self.stopped = self.text[:cut], True
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta
