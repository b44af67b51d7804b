"""Rotary position embeddings (Su et al. 2021, arXiv 2104.09864) in the rotate-half layout.

Layout: HF checkpoints (and GPTQ checkpoints made from them) pair dimension i with
dimension i + head_dim/2 ("rotate half"); Meta's original checkpoints pair 2i with 2i+1
("interleaved"). This module implements rotate-half. A Meta or GGUF checkpoint is brought
to this layout by permuting the rows of wq and wk per head (see `interleaved_to_half`).

Frequencies follow transformers' modeling_rope_utils.py, computed in float32 as it does,
for rope types default, linear, dynamic (NTK) and llama3.

Dynamic NTK in transformers depends on the length of the sequence being run: its rotary
module recomputes the frequencies whenever a forward pass reaches a longer
`max(position_ids) + 1` than before. During `generate` the prompt is rotated with the
frequencies for the prompt length, and each decoded token with those for its own
position + 1; keys already in the cache keep the rotation they were made with. This engine
does the same per call: a chunk of tokens ending at position `end - 1` is rotated with the
frequencies for `seq_len = end`. So decoding through the KV cache equals transformers'
`generate`, while a single full-sequence forward equals transformers' full forward; past
max_position_embeddings the two differ, in transformers as here.
"""
import math

import numpy as np

from ..config import ModelConfig


def rope_inv_freq(config: ModelConfig, seq_len: int) -> np.ndarray:
    """θ_i = theta^(-2i/d), scaled as config.rope_scaling says.  Returns (head_dim/2,) float32."""
    dim, theta, scaling = config.head_dim, config.rope_theta, config.rope_scaling
    if scaling is not None and scaling.rope_type == "dynamic":
        theta = dynamic_ntk_theta(theta, scaling.factor, seq_len, config.max_position_embeddings, dim)
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)
    if scaling is None or scaling.rope_type == "dynamic":
        return inv_freq
    if scaling.rope_type == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    return llama3_inv_freq(inv_freq, scaling)


def dynamic_ntk_theta(theta: float, factor: float, seq_len: int, max_positions: int, dim: int) -> float:
    """Dynamic NTK-aware scaling (bloc97, emozilla):
    theta' = theta * (factor * L / L_max - (factor - 1)) ^ (d / (d - 2)),  L = max(seq_len, L_max)."""
    length = max(seq_len, max_positions)
    return theta * ((factor * length / max_positions) - (factor - 1)) ** (dim / (dim - 2))


def llama3_inv_freq(inv_freq: np.ndarray, scaling) -> np.ndarray:
    """Llama 3.1 scaling: wavelengths longer than L_orig / low_freq_factor are divided by
    `factor`, shorter than L_orig / high_freq_factor are kept, and the band between is a
    linear blend in L_orig / wavelength."""
    original = scaling.original_max_position_embeddings
    low_freq_wavelen = original / scaling.low_freq_factor
    high_freq_wavelen = original / scaling.high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(scaling.factor), inv_freq)
    smooth = (original / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / np.float32(scaling.factor) + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Angles m·θ_i for each position m, duplicated for both halves.  Returns cos, sin (n, head_dim)."""
    freqs = positions.astype(np.float32)[:, None] * inv_freq[None, :]  # (n, head_dim/2)
    angles = np.concatenate([freqs, freqs], axis=-1)                  # (n, head_dim)
    return np.cos(angles), np.sin(angles)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x·cos + rotate_half(x)·sin with rotate_half([a, b]) = [-b, a].  x (..., n, heads,
    head_dim); cos, sin (n, head_dim) for positions shared by every sequence, or (..., n,
    head_dim) for sequences at positions of their own. The model runs it compiled
    (kernels/rows.py), which this equation checks."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # (..., n, heads, head_dim)
    return x * cos[..., None, :] + rotated * sin[..., None, :]


def interleaved_to_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a wq/wk matrix from the interleaved layout (pairs 2i, 2i+1; Meta, GGUF) to
    rotate-half (pairs i, i + d/2; HF).  w (n_heads * head_dim, in)."""
    out_features, in_features = w.shape
    head_dim = out_features // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, in_features).swapaxes(1, 2).reshape(out_features, in_features)
