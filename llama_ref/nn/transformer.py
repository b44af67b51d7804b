"""The Llama forward pass in NumPy, float32 activations.

Checked against HuggingFace transformers' LlamaForCausalLM (float32, CPU): same logits
within 1e-4 relative, same greedy tokens (tests/test_model_vs_transformers.py).

Names follow Meta's reference model.py (wq wk wv wo, w1 w2 w3, attention_norm, ffn_norm);
formats/hf.py and formats/gguf_file.py map the checkpoints' names onto them. Invariant
throughout: row i of a chunk is the token at absolute position start_pos + i.
"""
from dataclasses import dataclass, replace
from typing import Callable, Protocol

import numpy as np

from ..config import ModelConfig
from ..errors import ContextLengthError
from ..formats.safetensors import StoredTensor
from .linear import GGUFLinear, Linear, fuse, project
from .ops import rms_norm, silu, softmax
from .rope import apply_rope, rope_cos_sin, rope_inv_freq


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


class KVCache:
    """Keys and values of every layer for one sequence, written in place.

    k, v: (n_layers, n_kv_heads, max_seq_len, head_dim) float32. np.zeros maps untouched
    pages lazily, so a long max_seq_len costs memory only as positions are filled.
    """

    def __init__(self, config: ModelConfig, max_seq_len: int):
        shape = (config.num_hidden_layers, config.num_key_value_heads, max_seq_len, config.head_dim)
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)
        self.max_seq_len = max_seq_len
        self.length = 0  # positions 0 .. length-1 hold valid keys and values

    def update(self, layer: int, start_pos: int, k: np.ndarray, v: np.ndarray):
        """Store k, v (n, n_kv_heads, head_dim) at positions start_pos..start_pos+n-1 and
        return all keys and values up to there: (n_kv_heads, start_pos + n, head_dim) each."""
        end = start_pos + k.shape[0]
        self.k[layer, :, start_pos:end] = k.transpose(1, 0, 2)
        self.v[layer, :, start_pos:end] = v.transpose(1, 0, 2)
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def copy(self) -> "KVCache":
        """A second cache holding the same positions (n = 2 choices share the prompt's prefill)."""
        twin = KVCache.__new__(KVCache)
        twin.k, twin.v = np.zeros(self.k.shape, np.float32), np.zeros(self.v.shape, np.float32)
        twin.k[:, :, :self.length] = self.k[:, :, :self.length]
        twin.v[:, :, :self.length] = self.v[:, :, :self.length]
        twin.max_seq_len, twin.length = self.max_seq_len, self.length
        return twin


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

    q (n, n_heads, d); k, v (n_kv_heads, T, d) with T = start_pos + n.  Returns (n, n_heads * d).
    """
    n, n_heads, d = q.shape
    n_kv_heads, seq_len, _ = k.shape
    n_rep = n_heads // n_kv_heads
    q = q.reshape(n, n_kv_heads, n_rep, d).transpose(1, 2, 0, 3)       # (n_kv, n_rep, n, d)
    scores = q @ k[:, None].transpose(0, 1, 3, 2) / np.float32(np.sqrt(d))  # (n_kv, n_rep, n, T)
    probs = softmax(scores + causal_mask(n, start_pos))              # (n_kv, n_rep, n, T)
    out = probs @ v[:, None]                                         # (n_kv, n_rep, n, d)
    return out.transpose(2, 0, 1, 3).reshape(n, n_heads * d)


def cached_attention(caches: list["KVCache"], layer_index: int, start_pos: int) -> Callable:
    """attend() for sequences that extend their KV caches: each sequence's new keys and values
    join its cache, and its queries read everything the cache then holds."""
    def attend(q, k, v):
        return np.concatenate([attention(q[j], *caches[j].update(layer_index, start_pos, k[j], v[j]), start_pos)
                               for j in range(len(caches))])
    return attend


def self_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """attend() for whole sequences without a cache (quantizer calibration): each sequence's
    queries read its own keys and values, from position 0."""
    return np.concatenate([attention(q[j], k[j].transpose(1, 0, 2), v[j].transpose(1, 0, 2), 0)
                           for j in range(len(q))])


def mixed_values(config: ModelConfig, layer: Layer, h: np.ndarray, batch: int, cos: np.ndarray, sin: np.ndarray,
                 attend: Callable, hooks: LayerHooks | None) -> np.ndarray:
    """The attention's input to wo: q, k, v of h (batch * n, hidden), rotated, mixed by
    attend.  Returns (batch * n, n_heads * head_dim)."""
    n = h.shape[0] // batch
    n_heads, n_kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q, k, v = linears(layer, ("wq", "wk", "wv"), h, hooks)
    q = apply_rope(q.reshape(batch, n, n_heads, d), cos, sin)           # (batch, n, n_heads, d)
    k = apply_rope(k.reshape(batch, n, n_kv_heads, d), cos, sin)        # (batch, n, n_kv_heads, d)
    v = v.reshape(batch, n, n_kv_heads, d)                              # (batch, n, n_kv_heads, d)
    return attend(q, k, v)


def decoder_layer(config: ModelConfig, layer: Layer, x: np.ndarray, batch: int, cos: np.ndarray, sin: np.ndarray,
                  attend: Callable, hooks: LayerHooks | None = None) -> np.ndarray:
    """One decoder layer on `batch` sequences of n tokens each: x + attention, then + the
    feed-forward.  x (batch * n, hidden), sequence by sequence; cos, sin (n, head_dim) for
    the chunk's positions, or (batch, n, head_dim) for sequences at positions of their own;
    attend(q, k, v) mixes each sequence's values: q (batch, n, n_heads, d), k, v (batch, n,
    n_kv_heads, d) -> (batch * n, n_heads * d). Arrays that a later step does not read are
    freed before it runs: quantizing a layer of a 7B model holds several GB at its widest.
    Returns (batch * n, hidden)."""
    mixed = mixed_values(config, layer, rms_norm(x, layer.attention_norm, config.rms_norm_eps), batch, cos, sin,
                         attend, hooks)                                 # (batch * n, n_heads * d)
    x = x + linears(layer, ("wo",), mixed, hooks)[0]
    return x + feed_forward(rms_norm(x, layer.ffn_norm, config.rms_norm_eps), layer, hooks)


def embed(tokens: np.ndarray, table) -> np.ndarray:
    """Rows of the embedding table (a StoredTensor, or a GGUFLinear for a quantized one),
    widened.  Returns (n, hidden) float32."""
    return table.rows(tokens)


def forward(config: ModelConfig, weights: Weights, tokens: np.ndarray, start_pos: int,
            caches: list[KVCache]) -> np.ndarray:
    """Logits for a batch of sequences, each a chunk of n tokens at positions start_pos ..
    start_pos + n - 1, reading and extending its own cache.  The matrix products see all
    b * n rows at once, so a batch reads each weight once.  tokens (b, n) int.
    Returns (b, n, vocab_size) float32."""
    b, n = tokens.shape
    end = start_pos + n
    for cache in caches:
        check_positions(config, cache, n, start_pos)
    cos, sin = rope_cos_sin(np.arange(start_pos, end), rope_inv_freq(config, seq_len=end))  # (n, d)
    x = embed(tokens.reshape(-1), weights.tok_embeddings)               # (b * n, hidden)
    for i, layer in enumerate(weights.layers):
        x = decoder_layer(config, layer, x, b, cos, sin, cached_attention(caches, i, start_pos))
    for cache in caches:
        cache.length = end
    logits = weights.output(rms_norm(x, weights.norm, config.rms_norm_eps))  # (b * n, vocab)
    return logits.reshape(b, n, -1)


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
