"""The element-wise functions of the model and the sampler, one per equation."""
import numpy as np


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x²) + eps) * weight.  x (n, hidden).
    The model runs it compiled (kernels/rows.py), which this equation checks."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) * weight


def silu(x: np.ndarray) -> np.ndarray:
    """SiLU(x) = x · sigmoid(x); exp overflows to inf for very negative x, giving -0 as it should."""
    with np.errstate(over="ignore"):
        return x / (np.float32(1.0) + np.exp(-x))


def softmax(scores: np.ndarray) -> np.ndarray:
    """Along the last axis, in the input's dtype, max-subtracted so that no exp overflows;
    -inf entries get probability exactly 0."""
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax along the last axis, in float64; -inf entries stay -inf."""
    shifted = logits.astype(np.float64, copy=False) - logits.max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
