"""Prompt prefixes kept for reuse: the KV caches of finished requests, least recently used
evicted first (docs/server.md, "Prefix reuse").

Each turn of a chat re-sends the whole conversation, and many requests share a system
prompt. A request whose prompt starts with the tokens of a kept cache copies those
positions' keys and values and prefills only the rest, as llama-server (`cache_prompt`) and
vLLM (automatic prefix caching) do.

Reuse goes by whole prefill chunks, so that it never changes an answer by a bit: a cold run
computes its prompt in chunks of `chunk` positions from 0, and a row's float32 result
depends on the chunk it was computed in (decoding/batch.py). Only positions that a kept
request computed in such whole chunks are reused, and the new request goes on from a chunk
boundary, so every position it then holds was computed exactly as a cold run computes it.
The price: up to chunk - 1 prompt positions, and a previous answer's positions (decoded a row
at a time), are computed again. The last prompt token always is, for its logits.
"""
from collections import OrderedDict

import numpy as np


def common_prefix(a, b) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    differs = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differs[0]) if differs.size else n


class PrefixCache:
    """Caches keyed by the tokens of their whole prefill chunks, within max_bytes
    (bytes_per_token a position held)."""

    def __init__(self, max_bytes: int, bytes_per_token: int, chunk: int):
        self.max_bytes = max_bytes
        self.bytes_per_token = bytes_per_token
        self.chunk = chunk
        self.entries: OrderedDict[tuple[int, ...], object] = OrderedDict()   # least recently used first
        self.reused_tokens = 0          # prompt positions not computed again, over every request
        self.hits = 0                   # requests that started from a kept prefix

    @property
    def bytes(self) -> int:
        return sum(cache.length for cache in self.entries.values()) * self.bytes_per_token

    def start(self, generation) -> int:
        """Give the generation a copy of the longest kept prefix of its prompt; returns the
        positions reused (0 when none)."""
        prompt = generation.prompt_ids
        best, reused = None, 0
        for tokens in self.entries:
            length = min(common_prefix(tokens, prompt), len(prompt) - 1) // self.chunk * self.chunk
            if length > reused:
                best, reused = tokens, length
        if best is None:
            return 0
        self.entries.move_to_end(best)
        generation.reuse(self.entries[best].copy(reused, generation.cache_length), reused)
        self.reused_tokens += reused
        self.hits += 1
        return reused

    def keep(self, prompt_ids, cache) -> None:
        """Keep a finished request's cache, which holds its prompt from position 0 (all of it,
        or as much as was prefilled before it was cancelled). Kept prefixes of it are
        dropped: it answers for them."""
        whole = min(len(prompt_ids), cache.length) // self.chunk * self.chunk
        tokens = tuple(int(t) for t in prompt_ids[:whole])
        if not tokens or cache.length * self.bytes_per_token > self.max_bytes:
            return
        for kept in [kept for kept in self.entries if tokens[:len(kept)] == kept]:
            del self.entries[kept]
        self.entries[tokens] = cache
        self.shrink(self.max_bytes)

    def shrink(self, limit: int) -> None:
        """Drop the least recently used entries until the rest hold at most `limit` bytes."""
        while self.entries and self.bytes > limit:
            self.entries.popitem(last=False)
