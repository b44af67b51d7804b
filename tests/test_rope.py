"""RoPE layouts: Meta's interleaved pairs equal HF's rotate-half after the documented row permutation."""
import numpy as np

from llama_ref.config import ModelConfig
from llama_ref.nn.rope import apply_rope, interleaved_to_half, rope_cos_sin, rope_inv_freq


def meta_rope(q, positions, inv_freq):
    """Meta's reference (llama/model.py apply_rotary_emb): pairs (2i, 2i+1) as complex numbers
    multiplied by e^{i m θ_i}.  q (n, heads, d)."""
    pairs = q.reshape(*q.shape[:-1], -1, 2).astype(np.float64)
    z = (pairs[..., 0] + 1j * pairs[..., 1]) * np.exp(1j * np.outer(positions, inv_freq))[:, None, :]
    return np.stack([z.real, z.imag], axis=-1).reshape(q.shape)


def test_interleaved_weights_permuted_give_the_same_attention_scores():
    rng = np.random.default_rng(0)
    n_heads, d, hidden, n = 3, 16, 24, 11
    config = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": hidden,
                                    "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": n_heads,
                                    "head_dim": d, "max_position_embeddings": 64})
    w_meta_q = rng.standard_normal((n_heads * d, hidden)).astype(np.float32)
    w_meta_k = rng.standard_normal((n_heads * d, hidden)).astype(np.float32)
    x = rng.standard_normal((n, hidden)).astype(np.float32)
    positions = np.arange(5, 5 + n)
    inv_freq = rope_inv_freq(config, seq_len=16)

    q_meta = meta_rope((x @ w_meta_q.T).reshape(n, n_heads, d), positions, inv_freq)
    k_meta = meta_rope((x @ w_meta_k.T).reshape(n, n_heads, d), positions, inv_freq)
    cos, sin = rope_cos_sin(positions, inv_freq)
    q_half = apply_rope((x @ interleaved_to_half(w_meta_q, n_heads).T).reshape(n, n_heads, d), cos, sin)
    k_half = apply_rope((x @ interleaved_to_half(w_meta_k, n_heads).T).reshape(n, n_heads, d), cos, sin)

    scores_meta = np.einsum("qhd,khd->hqk", q_meta, k_meta)
    scores_half = np.einsum("qhd,khd->hqk", q_half, k_half)
    assert np.allclose(scores_half, scores_meta, rtol=1e-4, atol=1e-3)
    # and element by element: half-layout index j*d/2 + i holds interleaved index 2i + j
    assert np.allclose(q_half[..., : d // 2], q_meta[..., 0::2], atol=1e-4)
    assert np.allclose(q_half[..., d // 2:], q_meta[..., 1::2], atol=1e-4)


def test_sequences_at_positions_of_their_own_rotate_as_meta_does():
    """A batch of two sequences, each with its own positions (cos, sin (batch, n, d)), against
    Meta's complex-number rotation of each sequence on its own."""
    rng = np.random.default_rng(1)
    n_heads, d, n = 2, 8, 3
    inv_freq = (1.0 / 10000.0 ** (np.arange(0, d, 2) / d)).astype(np.float32)
    starts = (0, 17)
    q = rng.standard_normal((len(starts), n, n_heads, d)).astype(np.float32)
    tables = [rope_cos_sin(np.arange(start, start + n), inv_freq) for start in starts]
    cos, sin = np.stack([c for c, _ in tables]), np.stack([s for _, s in tables])   # (batch, n, d)
    ours = apply_rope(q, cos, sin)
    for j, start in enumerate(starts):
        interleaved = np.empty_like(q[j])                     # half-layout i, d/2 + i -> pair 2i, 2i + 1
        interleaved[..., 0::2], interleaved[..., 1::2] = q[j][..., :d // 2], q[j][..., d // 2:]
        meta = meta_rope(interleaved, np.arange(start, start + n), inv_freq)
        assert np.allclose(ours[j][..., :d // 2], meta[..., 0::2], atol=1e-5)
        assert np.allclose(ours[j][..., d // 2:], meta[..., 1::2], atol=1e-5)
