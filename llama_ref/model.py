"""The Llama forward pass in NumPy, float32 activations.

Checked against HuggingFace transformers' LlamaForCausalLM (float32, CPU): same logits
within 1e-4 relative, same greedy tokens (tests/test_model_vs_transformers.py).

Names follow Meta's reference model.py (wq wk wv wo, w1 w2 w3, attention_norm, ffn_norm);
loader.py maps HF checkpoint names onto them. Invariant throughout: row i of a chunk is the
token at absolute position start_pos + i.
"""
from dataclasses import dataclass, replace

import numba
import numpy as np
from threadpoolctl import ThreadpoolController

from .config import ModelConfig
from .errors import ContextLengthError, LlamaRefError
from .linear import GGUFLinear, Linear, fuse, project
from .rope import apply_rope, rope_cos_sin, rope_inv_freq
from .weights import StoredTensor


# rows x hidden size from which prefill gives BLAS every core: 128 tokens of a 2048-wide model
PARALLEL_BLAS_WORK = 128 * 2048


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


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x²) + eps) * weight.  x (n, hidden)."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) * weight


def silu(x: np.ndarray) -> np.ndarray:
    """SiLU(x) = x · sigmoid(x); exp overflows to inf for very negative x, giving -0 as it should."""
    with np.errstate(over="ignore"):
        return x / (np.float32(1.0) + np.exp(-x))


def feed_forward(x: np.ndarray, layer: Layer) -> np.ndarray:
    """SwiGLU (Shazeer 2020): w2(silu(w1 x) ⊙ w3 x).  x (n, hidden)."""
    gate, up = project(x, layer.w1, layer.w3)
    return layer.w2(silu(gate) * up)


def causal_mask(n: int, start_pos: int) -> np.ndarray:
    """0 where query row i (position start_pos + i) may see key position t ≤ start_pos + i,
    -inf elsewhere.  Returns (n, start_pos + n) float32."""
    key_pos = np.arange(start_pos + n)[None, :]
    query_pos = start_pos + np.arange(n)[:, None]
    return np.where(key_pos <= query_pos, np.float32(0.0), np.float32(-np.inf))


def softmax(scores: np.ndarray) -> np.ndarray:
    """Along the last axis, in the input's dtype, max-subtracted so that no exp overflows;
    -inf entries get probability exactly 0."""
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


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
    n_heads, n_kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    cos, sin = rope_cos_sin(np.arange(start_pos, end), rope_inv_freq(config, seq_len=end))  # (n, d)
    x = embed(tokens.reshape(-1), weights.tok_embeddings)               # (b * n, hidden)
    for i, layer in enumerate(weights.layers):
        h = rms_norm(x, layer.attention_norm, config.rms_norm_eps)     # (b * n, hidden)
        q, k, v = project(h, layer.wq, layer.wk, layer.wv)
        q = apply_rope(q.reshape(b, n, n_heads, d), cos, sin)           # (b, n, n_heads, d)
        k = apply_rope(k.reshape(b, n, n_kv_heads, d), cos, sin)        # (b, n, n_kv_heads, d)
        v = v.reshape(b, n, n_kv_heads, d)                              # (b, n, n_kv_heads, d)
        out = [attention(q[j], *caches[j].update(i, start_pos, k[j], v[j]), start_pos)
               for j in range(b)]                                       # b x (n, n_heads * d)
        x = x + layer.wo(np.concatenate(out))
        x = x + feed_forward(rms_norm(x, layer.ffn_norm, config.rms_norm_eps), layer)
    for cache in caches:
        cache.length = end
    logits = weights.output(rms_norm(x, weights.norm, config.rms_norm_eps))  # (b * n, vocab)
    return logits.reshape(b, n, -1)


def check_positions(config: ModelConfig, cache: KVCache, n: int, start_pos: int) -> None:
    if n == 0:
        raise ContextLengthError("tokens: at least one token is needed")
    if not 0 <= start_pos <= cache.length:
        raise ContextLengthError(f"start_pos={start_pos}: the cache holds positions 0..{cache.length - 1}; "
                                 "a chunk must start inside or right after them")
    end = start_pos + n
    if end > config.context_length:
        raise ContextLengthError(f"{end} tokens do not fit in the model's context of "
                                 f"{config.context_length} tokens")
    if end > cache.max_seq_len:
        raise ContextLengthError(f"{end} tokens do not fit in the KV cache of {cache.max_seq_len} positions")


class Model:
    """A loaded model: the public face of the engine (see README, "Python API")."""

    def __init__(self, config: ModelConfig, weights: Weights, tokenizer=None):
        self.config = config
        self.weights = weights
        self.tokenizer = tokenizer
        self._threadpools = ThreadpoolController()

    def new_cache(self, max_seq_len: int | None = None) -> KVCache:
        """A KV cache for one sequence of up to max_seq_len tokens (default: the context)."""
        limit = self.config.context_length
        if max_seq_len is not None and not 0 < max_seq_len <= limit:
            raise ContextLengthError(f"max_seq_len={max_seq_len}: must be in 1..{limit} (the model's context)")
        return KVCache(self.config, max_seq_len or limit)

    def generate(self, prompt, params=None, trace: bool = False):
        """Sample a response: iterate the returned Generation for one event per token, or
        call its result() for the whole completion.  prompt: raw text (BOS added when the
        tokenizer asks for it) or token ids, used as they are.  trace=True attaches the
        sampler's audit trace to every event."""
        # Imported here: generation and sampling import this module (softmax, Model).
        from .generation import Generation
        from .sampling import SamplingParams
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise LlamaRefError("prompt: this model has no tokenizer; pass token ids")
            prompt = self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos, eos=False)
        return Generation(self, prompt, params or SamplingParams(), trace)

    def chat(self, messages, params=None, chat_format: str | None = None, reject_control_strings: bool = False,
             trace: bool = False):
        """generate() on the prompt chat.format_chat builds for `messages` ([{"role", "content"}]):
        the model's own template, else its architecture's default format, unless chat_format
        names one. The format's own stop strings (airoboros, chatml) join params.stop, up to
        the limit of 16."""
        from .chat import format_chat
        from .generation import Generation
        from .sampling import MAX_STOP_STRINGS, SamplingParams
        if self.tokenizer is None:
            raise LlamaRefError("messages: this model has no tokenizer to format a chat with")
        params = params or SamplingParams()
        prompt = format_chat(messages, self.tokenizer, self.config.architecture, chat_format, reject_control_strings)
        stops = tuple(dict.fromkeys(params.stop + prompt.stop))[:MAX_STOP_STRINGS]
        return Generation(self, prompt.ids, replace(params, stop=stops), trace)

    def forward(self, tokens, start_pos: int, cache: KVCache) -> np.ndarray:
        """Logits (len(tokens), vocab_size) float32 for tokens at positions start_pos.. ."""
        return self.forward_batch(np.asarray(tokens, dtype=np.int64).reshape(1, -1), start_pos, [cache])[0]

    def forward_batch(self, tokens, start_pos: int, caches: list[KVCache]) -> np.ndarray:
        """Logits (b, n, vocab_size) float32 for b sequences of n tokens each, all at positions
        start_pos.., one cache per sequence (n = 2 choices decoding side by side)."""
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim != 2 or len(caches) != ids.shape[0]:
            raise ValueError(f"tokens: expected (batch, n) ids and one cache per row, got shape {ids.shape} "
                             f"and {len(caches)} caches")
        bad = ids[(ids < 0) | (ids >= self.config.vocab_size)]
        if bad.size:
            raise ValueError(f"tokens: id {int(bad[0])} is outside the vocabulary 0..{self.config.vocab_size - 1}")
        # The Numba kernels already use every core, and OpenBLAS threads, which keep spinning
        # after each call, would fight them for the same cores: BLAS runs single-threaded,
        # except for a prefill big enough that BLAS on the dequantized tiles dominates (measured
        # with 128 tokens and kernels/__init__.py's shorter spin: 13B shape 2.0 -> 2.3 tokens/s
        # with every core for BLAS, SmolLM2's 576-wide layers 165 -> 85).
        big = ids.size * self.config.hidden_size >= PARALLEL_BLAS_WORK
        with self._threadpools.limit(limits=numba.get_num_threads() if big else 1, user_api="blas"):
            return forward(self.config, self.weights, ids, start_pos, caches)
