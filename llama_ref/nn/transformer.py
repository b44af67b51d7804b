"""The Llama forward pass in NumPy, float32 activations.

Checked against HuggingFace transformers' LlamaForCausalLM (float32, CPU): same logits
within 1e-4 relative, same greedy tokens (tests/test_model_vs_transformers.py).

One pass runs chunks of several sequences, each at its own positions with its own cache
(decoding/batch.py steps many requests at once this way).

Names follow Meta's reference model.py (wq wk wv wo, w1 w2 w3, attention_norm, ffn_norm);
formats/hf.py and formats/gguf_file.py map the checkpoints' names onto them. Invariant
throughout: row i of a chunk is the token at absolute position start_pos + i.
"""
import math
import mmap
from dataclasses import dataclass, replace
from typing import Callable, Literal, Protocol

import numpy as np

from ..config import ModelConfig
from ..errors import ContextLengthError
from ..formats.safetensors import StoredTensor
from ..kernels.attention import decode_attention
from ..kernels.rows import rms_norm_rows, rope_rows
from .linear import GGUFLinear, Linear, fuse, project
from .ops import silu, softmax
from .rope import rope_cos_sin, rope_inv_freq


@dataclass(frozen=True)
class Layer:
    attention_norm: np.ndarray  # (hidden,) float32
    wq: Linear                  # hidden -> n_heads * head_dim
    wk: Linear                  # hidden -> n_kv_heads * head_dim
    wv: Linear                  # hidden -> n_kv_heads * head_dim
    wo: Linear                  # n_heads * head_dim -> hidden
    ffn_norm: np.ndarray        # (hidden,) float32
    w1: Linear                  # gate: hidden -> intermediate
    w2: Linear                  # down: intermediate -> hidden
    w3: Linear                  # up:   hidden -> intermediate


def fuse_projections(layer: Layer) -> Layer:
    """The layer with q, k, v and gate, up each sharing one packed matrix where their
    storage allows it (linear.fuse): one kernel call for each set."""
    wq, wk, wv = fuse(layer.wq, layer.wk, layer.wv)
    w1, w3 = fuse(layer.w1, layer.w3)
    return replace(layer, wq=wq, wk=wk, wv=wv, w1=w1, w3=w3)


@dataclass(frozen=True)
class Weights:
    tok_embeddings: StoredTensor | GGUFLinear  # (vocab, hidden) as stored; rows widened on lookup
    layers: tuple[Layer, ...]
    norm: np.ndarray              # (hidden,) float32
    output: Linear                # hidden -> vocab (the embedding matrix when tied)


def lazy_zeros(shape: tuple[int, ...]) -> np.ndarray:
    """float32 zeros whose memory the kernel supplies one 4 KB page at a time, as positions
    are first written. Not np.zeros: NumPy asks for transparent huge pages on large arrays,
    and then the first write into each head's 2 MB of a 13B cache (4096 positions x 128)
    zeroes and keeps all 2 MB of it: a 16-token prompt made the whole 6.7 GB cache resident
    and took 2-4 s longer than in a reused cache."""
    count = math.prod(shape)
    memory = mmap.mmap(-1, max(1, count) * 4)                 # anonymous: zero-filled, lazily
    memory.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(memory, dtype=np.float32, count=count).reshape(shape)


class KVCache:
    """Keys and values of every layer for one sequence, written in place.

    k, v: (n_layers, n_kv_heads, max_seq_len, head_dim) float32, mapped lazily (lazy_zeros),
    so a long max_seq_len costs memory only as positions are filled.
    """

    def __init__(self, config: ModelConfig, max_seq_len: int):
        shape = (config.num_hidden_layers, config.num_key_value_heads, max_seq_len, config.head_dim)
        self.k = lazy_zeros(shape)
        self.v = lazy_zeros(shape)
        self.max_seq_len = max_seq_len
        self.length = 0  # positions 0 .. length-1 hold valid keys and values

    def update(self, layer: int, start_pos: int, k: np.ndarray, v: np.ndarray):
        """Store k, v (n, n_kv_heads, head_dim) at positions start_pos..start_pos+n-1 and
        return the layer's keys and values, (n_kv_heads, max_seq_len, head_dim) each, of which
        positions 0 .. start_pos + n - 1 now hold the sequence's."""
        end = start_pos + k.shape[0]
        self.k[layer, :, start_pos:end] = k.transpose(1, 0, 2)
        self.v[layer, :, start_pos:end] = v.transpose(1, 0, 2)
        return self.k[layer], self.v[layer]

    def copy(self, positions: int | None = None, max_seq_len: int | None = None) -> "KVCache":
        """A second cache holding the first `positions` positions of this one (default: all
        it holds), with room for max_seq_len (default: the same). n = 2 choices share the
        prompt's prefill this way, and a request reuses a cached prompt prefix."""
        positions = self.length if positions is None else positions
        twin = KVCache.__new__(KVCache)
        shape = self.k.shape[:2] + (max_seq_len or self.max_seq_len,) + self.k.shape[3:]
        twin.k, twin.v = lazy_zeros(shape), lazy_zeros(shape)
        twin.k[:, :, :positions] = self.k[:, :, :positions]
        twin.v[:, :, :positions] = self.v[:, :, :positions]
        twin.max_seq_len, twin.length = shape[2], positions
        return twin


def kv_bytes_per_token(config: ModelConfig) -> int:
    """What one position of one sequence's KVCache holds: keys and values of every layer, float32."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4


class LayerHooks(Protocol):
    """What a caller sees of a decoder layer as it runs (the GPTQ quantizer: each Linear's
    input, and each Linear replaced by its quantized self before the later ones run, in the
    order q, k, v -> o -> gate, up -> down)."""

    def inputs(self, names: tuple[str, ...], x: np.ndarray) -> None:
        """x (rows, in): the input that the layer's Linears `names` (Meta names) read next."""

    def replace(self, name: str, linear: Linear) -> Linear:
        """The Linear to compute with in place of the layer's `name`."""


def linears(layer: Layer, names: tuple[str, ...], x: np.ndarray, hooks: LayerHooks | None) -> list[np.ndarray]:
    """The outputs of the layer's Linears `names` on x (rows, in), in one kernel call when
    they were fused together."""
    if hooks is None:
        return project(x, *(getattr(layer, name) for name in names))
    hooks.inputs(names, x)
    return project(x, *(hooks.replace(name, getattr(layer, name)) for name in names))


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """SwiGLU (Shazeer 2020): silu(gate) ⊙ up."""
    return silu(gate) * up


def feed_forward(x: np.ndarray, layer: Layer, hooks: LayerHooks | None = None) -> np.ndarray:
    """w2(swiglu(w1 x, w3 x)).  x (rows, hidden)."""
    gated = swiglu(*linears(layer, ("w1", "w3"), x, hooks))            # (rows, intermediate)
    return linears(layer, ("w2",), gated, hooks)[0]


def causal_mask(n: int, start_pos: int) -> np.ndarray:
    """0 where query row i (position start_pos + i) may see key position t ≤ start_pos + i,
    -inf elsewhere.  Returns (n, start_pos + n) float32."""
    key_pos = np.arange(start_pos + n)[None, :]
    query_pos = start_pos + np.arange(n)[:, None]
    return np.where(key_pos <= query_pos, np.float32(0.0), np.float32(-np.inf))


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int) -> np.ndarray:
    """Causal grouped-query attention: softmax(q kᵀ / sqrt(d) + mask) v, where query head h
    reads key/value head h // n_rep (transformers' repeat_kv).

    q (n, n_heads, d); k, v (n_kv_heads, ≥ T, d), of which the first T = start_pos + n
    positions are read.  Returns (n, n_heads * d). One-row chunks, which see every position,
    go to kernels/attention.py instead (cached_attention).
    """
    n, n_heads, d = q.shape
    n_kv_heads, seq_len = k.shape[0], start_pos + n
    k, v = k[:, :seq_len], v[:, :seq_len]
    n_rep = n_heads // n_kv_heads
    q = q.reshape(n, n_kv_heads, n_rep, d).transpose(1, 2, 0, 3)       # (n_kv, n_rep, n, d)
    scores = q @ k[:, None].transpose(0, 1, 3, 2) / np.float32(np.sqrt(d))  # (n_kv, n_rep, n, T)
    probs = softmax(scores + causal_mask(n, start_pos))              # (n_kv, n_rep, n, T)
    out = probs @ v[:, None]                                         # (n_kv, n_rep, n, d)
    return out.transpose(2, 0, 1, 3).reshape(n, n_heads * d)


@dataclass(frozen=True)
class Chunk:
    """Tokens of one sequence at positions start_pos .. start_pos + len(tokens) - 1, read
    against and written into that sequence's cache, and what the pass returns for them:
    "logits" of every row (n, vocab); "last", the last row's logits (1, vocab), all that a
    sampler reads (the output layer is a fifth of a small model's prefill); "hidden", the
    final norm's output (n, hidden), which embeddings pool."""
    tokens: np.ndarray   # (n,) int64
    start_pos: int
    cache: KVCache
    output: Literal["logits", "last", "hidden"] = "logits"


def spans(lengths: tuple[int, ...]):
    """(first row, last row + 1) of each sequence in rows stacked sequence by sequence."""
    ends = np.cumsum(lengths)
    return zip(ends - lengths, ends)


@dataclass(frozen=True)
class SingleRows:
    """The one-row chunks of a pass (decoding steps, and a prompt's one-token chunks), which
    attend together in one kernel call a layer (kernels/attention.py): their rows in the pass,
    and their caches' arrays as the kernel takes them, by address (the chunks keep them alive)."""
    rows: np.ndarray        # (m,) int64
    keys: np.ndarray        # (m,) intp: the address of each row's KVCache.k
    values: np.ndarray      # (m,) intp: the same of KVCache.v
    capacities: np.ndarray  # (m,) int64: each cache's max_seq_len
    positions: np.ndarray   # (m,) int64: each row's position, where its key and value go


def single_rows(chunks: list[Chunk], bounds: list[tuple[int, int]]) -> SingleRows | None:
    single = [(a, chunk) for chunk, (a, b) in zip(chunks, bounds) if b - a == 1]
    if not single:
        return None
    caches = [chunk.cache for _, chunk in single]
    return SingleRows(np.array([a for a, _ in single]), np.array([c.k.ctypes.data for c in caches], dtype=np.intp),
                      np.array([c.v.ctypes.data for c in caches], dtype=np.intp),
                      np.array([c.max_seq_len for c in caches]), np.array([chunk.start_pos for _, chunk in single]))


def cached_attention(chunks: list[Chunk], bounds: list[tuple[int, int]], layer_index: int,
                     single: SingleRows | None) -> Callable:
    """attend() for chunks that extend their KV caches: each chunk's new keys and values
    join its cache, and its queries read everything the cache then holds; the one-row chunks
    all in one kernel call, longer chunks each in NumPy. bounds: each chunk's rows (spans of
    the lengths, found once a pass rather than once a layer)."""
    def attend(q, k, v, lengths):
        n_heads, d = q.shape[1:]
        mixed = np.empty((q.shape[0], n_heads * d), dtype=np.float32)         # (rows, n_heads * d)
        if single is not None:
            rows = single.rows
            attended = decode_attention(q[rows], k[rows], v[rows], single.keys, single.values, single.capacities,
                                        layer_index, single.positions, np.float32(1 / np.sqrt(d)))  # (m, heads, d)
            mixed[rows] = attended.reshape(len(rows), -1)
        for chunk, (a, b) in zip(chunks, bounds):
            if b - a > 1:
                mixed[a:b] = attention(q[a:b], *chunk.cache.update(layer_index, chunk.start_pos, k[a:b], v[a:b]),
                                       chunk.start_pos)
        return mixed
    return attend


def self_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, lengths: tuple[int, ...]) -> np.ndarray:
    """attend() for whole sequences without a cache (quantizer calibration): each sequence's
    queries read its own keys and values, from position 0."""
    return np.concatenate([attention(q[a:b], k[a:b].transpose(1, 0, 2), v[a:b].transpose(1, 0, 2), 0)
                           for a, b in spans(lengths)])


def mixed_values(config: ModelConfig, layer: Layer, h: np.ndarray, lengths: tuple[int, ...], cos: np.ndarray,
                 sin: np.ndarray, attend: Callable, hooks: LayerHooks | None) -> np.ndarray:
    """The attention's input to wo: q, k, v of h (rows, hidden), rotated, mixed by attend.
    Returns (rows, n_heads * head_dim)."""
    rows = h.shape[0]
    n_heads, n_kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q, k, v = linears(layer, ("wq", "wk", "wv"), h, hooks)
    q = rope_rows(q.reshape(rows, n_heads, d), cos, sin)                # (rows, n_heads, d)
    k = rope_rows(k.reshape(rows, n_kv_heads, d), cos, sin)             # (rows, n_kv_heads, d)
    return attend(q, k, v.reshape(rows, n_kv_heads, d), lengths)


def decoder_layer(config: ModelConfig, layer: Layer, x: np.ndarray, lengths: tuple[int, ...], cos: np.ndarray,
                  sin: np.ndarray, attend: Callable, hooks: LayerHooks | None = None) -> np.ndarray:
    """One decoder layer on sequences of lengths[j] tokens each: x + attention, then + the
    feed-forward.  x (rows, hidden), sequence by sequence; cos, sin (rows, head_dim), each
    row's angles for its own position; attend(q, k, v, lengths) mixes each sequence's values:
    q (rows, n_heads, d), k, v (rows, n_kv_heads, d) -> (rows, n_heads * d). Arrays that a
    later step does not read are freed before it runs: quantizing a layer of a 7B model holds
    several GB at its widest.  Returns (rows, hidden)."""
    eps = np.float32(config.rms_norm_eps)
    mixed = mixed_values(config, layer, rms_norm_rows(x, layer.attention_norm, eps), lengths, cos, sin,
                         attend, hooks)                                 # (rows, n_heads * d)
    x = x + linears(layer, ("wo",), mixed, hooks)[0]
    return x + feed_forward(rms_norm_rows(x, layer.ffn_norm, eps), layer, hooks)


def embed(tokens: np.ndarray, table) -> np.ndarray:
    """Rows of the embedding table (a StoredTensor, or a GGUFLinear for a quantized one),
    widened.  Returns (n, hidden) float32."""
    return table.rows(tokens)


def chunk_rope(config: ModelConfig, start_pos: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (n, head_dim) of a chunk ending at position start_pos + n - 1, with the
    frequencies for that length (rope.py: dynamic NTK depends on it)."""
    end = start_pos + n
    return rope_cos_sin(np.arange(start_pos, end), rope_inv_freq(config, seq_len=end))


def forward(config: ModelConfig, weights: Weights, chunks: list[Chunk]) -> list[np.ndarray]:
    """What each chunk asks for (Chunk.output), every chunk its own sequence at its own
    positions, reading and extending its own cache.  The matrix products see the rows of
    every chunk at once, so the step reads each weight once; a row's result depends only on
    its own chunk as long as the kernels' row-parallel path runs (at most
    kernels.SMALL_BATCH rows in all).  Returns one float32 array per chunk: (n, vocab_size)
    for "logits", (1, vocab_size) for "last", (n, hidden) for "hidden"."""
    for chunk in chunks:
        check_positions(config, chunk.cache, len(chunk.tokens), chunk.start_pos)
    lengths = tuple(len(chunk.tokens) for chunk in chunks)
    angles = [chunk_rope(config, chunk.start_pos, len(chunk.tokens)) for chunk in chunks]
    cos, sin = np.concatenate([c for c, _ in angles]), np.concatenate([s for _, s in angles])  # (rows, d)
    x = embed(np.concatenate([chunk.tokens for chunk in chunks]), weights.tok_embeddings)     # (rows, hidden)
    bounds = list(spans(lengths))
    single = single_rows(chunks, bounds)
    for i, layer in enumerate(weights.layers):
        x = decoder_layer(config, layer, x, lengths, cos, sin, cached_attention(chunks, bounds, i, single))
    for chunk in chunks:
        chunk.cache.length = chunk.start_pos + len(chunk.tokens)
    return outputs(weights, chunks, rms_norm_rows(x, weights.norm, np.float32(config.rms_norm_eps)), lengths)


def outputs(weights: Weights, chunks: list[Chunk], hidden: np.ndarray, lengths: tuple[int, ...]) -> list[np.ndarray]:
    """Each chunk's Chunk.output from the final hidden states (rows, hidden), the output
    layer run once over just the rows whose logits are wanted."""
    wanted = [np.arange(a, b) if chunk.output == "logits" else np.arange(b - 1, b)
              for chunk, (a, b) in zip(chunks, spans(lengths)) if chunk.output != "hidden"]
    logits = weights.output(hidden[np.concatenate(wanted)]) if wanted else None  # (wanted rows, vocab)
    results, taken = [], 0
    for chunk, (a, b) in zip(chunks, spans(lengths)):
        if chunk.output == "hidden":
            results.append(hidden[a:b])
            continue
        n = b - a if chunk.output == "logits" else 1
        results.append(logits[taken:taken + n])
        taken += n
    return results


def check_positions(config: ModelConfig, cache: KVCache, n: int, start_pos: int) -> None:
    if n == 0:
        raise ContextLengthError("tokens: at least one token is needed", "tokens")
    if not 0 <= start_pos <= cache.length:
        raise ContextLengthError(f"start_pos={start_pos}: the cache holds positions 0..{cache.length - 1}; "
                                 "a chunk must start inside or right after them", "start_pos")
    end = start_pos + n
    if end > config.context_length:
        raise ContextLengthError(f"tokens: {end} tokens do not fit in the model's context of "
                                 f"{config.context_length} tokens", "tokens")
    if end > cache.max_seq_len:
        raise ContextLengthError(f"tokens: {end} tokens do not fit in the KV cache of {cache.max_seq_len} positions",
                                 "tokens")
