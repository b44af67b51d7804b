"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022, arXiv 2210.17323) and round-to-nearest
on one Linear: 4-bit weights in groups of input columns, as a GPTQ checkpoint stores them.

    gptq(W, inverse_hessian(H), settings)   the paper's Algorithm 1
    round_to_nearest(W, settings)           the baseline

W is (out, in) as in the checkpoint; column j multiplies input j. H = 2 XᵀX / n is the
Hessian of the layer's squared error ‖XW - XŴ‖² over the n calibration rows of X (n, in).

Where this follows the reference code (IST-DASLab gptq.py, AutoGPTQ, gptqmodel) and where not:
- Same: dead inputs (H[i,i] = 0) are pinned to H[i,i] = 1 and W[:, i] = 0; dampening
  λ = damp · mean(diag H); the upper Cholesky factor of H⁻¹; lazy blocks of 128 columns;
  act-order = columns by descending diag H, with g_idx recording each input's group.
- A group's grid is found on the weights as its lazy block starts, as in the reference:
  when a group starts mid-block (group size < 128) the updates from the block's earlier
  columns are not in it. Finding it after those updates instead was measured worse on
  SmolLM2 (0.3% higher error on calibration and held-out inputs at group size 32, up to 3%
  on some Linears): the updates widen a group's range, and a wider grid costs every weight
  in it more than clipping the few that moved out costs those. Blocks here are a whole
  number of groups (so group sizes that do not divide 128 start at a block).
- A group is quantized with its fp32 scale and the scale is stored as fp16, as in the
  reference. Rounding the scale to fp16 first, so that the propagated errors are those of
  the weights as stored, was measured worse: 0.9% higher error on held-out inputs on
  SmolLM2 at group size 128 (benchmarks/layer_error.py). Perplexity moved both ways, inside
  its draw-to-draw noise.
- sym: the grid is ±max|w| even when the group has no negative weight (the reference then
  keeps xmin = 0 with zero point 8 and clips the upper half of its range).
- asym with v1 zero points ("gptq", stored as zero - 1): a zero point of 0 cannot be stored
  (it corrupts the word: docs/formats.md, "Zero points of 0 in v1 checkpoints"), so zero
  points are kept in 1..15; "gptq_v2" uses 0..15.
"""
from dataclasses import dataclass

import numpy as np

from ..errors import LlamaRefError
from ..kernels.gptq import pack_rows, unpack_rows
from ..kernels.quantize import MAX_CODE, gptq_columns

METHODS = ("gptq", "rtn")
FORMATS = ("gptq", "gptq_v2")


class QuantizeError(LlamaRefError, ValueError):
    """Quantization settings or inputs that cannot work."""


@dataclass(frozen=True)
class QuantizeSettings:
    method: str = "gptq"            # "gptq" | "rtn"
    bits: int = 4
    group_size: int = 128           # input columns per scale; -1: one group for the whole row
    act_order: bool = False         # quantize columns by descending diag H (GPTQ only)
    sym: bool = True                # zero point 8; asym fits each group's own min and max
    damp: float = 0.01              # λ = damp · mean(diag H)
    checkpoint_format: str = "gptq"  # "gptq" (v1 zero points) | "gptq_v2"
    block_size: int = 128           # lazy-batch width, rounded to whole groups

    def __post_init__(self):
        if self.method not in METHODS:
            raise QuantizeError(f"method: one of {', '.join(METHODS)}, got {self.method!r}")
        if self.bits != 4:
            raise QuantizeError(f"bits: only 4 is supported, got {self.bits}")
        if not (self.group_size == -1 or (self.group_size > 0 and self.group_size % 8 == 0)):
            raise QuantizeError(f"group_size: -1 or a positive multiple of 8, got {self.group_size}")
        if not 0 < self.damp < 1:
            raise QuantizeError(f"damp: must be in (0, 1), got {self.damp}")
        if self.checkpoint_format not in FORMATS:
            raise QuantizeError(f"checkpoint_format: one of {', '.join(FORMATS)}, got {self.checkpoint_format!r}")
        if self.act_order and self.method != "gptq":
            raise QuantizeError("act_order: needs method gptq (round-to-nearest has no Hessian to order by)")
        if self.block_size <= 0:
            raise QuantizeError(f"block_size: must be positive, got {self.block_size}")

    @property
    def min_zero(self) -> int:
        return 1 if self.checkpoint_format == "gptq" and not self.sym else 0


@dataclass(frozen=True)
class QuantizedWeight:
    """One Linear as a GPTQ checkpoint stores it, inputs in checkpoint order; the codes are
    packed as soon as they are made (8 per word along the input axis, kernels/gptq.py)."""
    qweight: np.ndarray  # (in/8, out) int32
    scales: np.ndarray   # (groups, out) float16
    zeros: np.ndarray    # (groups, out) uint8, the true zero points
    g_idx: np.ndarray    # (in,) int32, the group of each input

    @classmethod
    def pack(cls, codes: np.ndarray, scales, zeros, g_idx) -> "QuantizedWeight":
        """codes (out, in) 0..15; scales and zeros one row per group."""
        return cls(pack_rows(codes.T), np.array(scales, np.float16), np.array(zeros, np.uint8), g_idx)

    def dequantize(self) -> np.ndarray:
        """Ŵ (out, in) float32 = scale · (code - zero) of each input's group, as loaders compute it."""
        codes = unpack_rows(self.qweight).T                                # (out, in)
        scales = self.scales.astype(np.float32)[self.g_idx].T             # (out, in)
        return scales * (codes.astype(np.float32) - self.zeros[self.g_idx].T)


def quantization_grid(w: np.ndarray, settings: QuantizeSettings) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of each row of w (out, k), both float32: the grid
    scale · (q - zero), q = 0..15, spans [min(w, 0), max(w, 0)]. The scale is kept in fp32
    while the group is quantized and stored as fp16 (see the module notes)."""
    w = w.astype(np.float32)
    low, high = np.minimum(w.min(axis=1), 0.0), np.maximum(w.max(axis=1), 0.0)
    if settings.sym:
        high = np.maximum(-low, high)
        low = -high
    empty = high == low                     # an all-zero row still needs a usable scale
    low, high = np.where(empty, -1.0, low), np.where(empty, 1.0, high)
    scale = ((high - low) / np.float32(MAX_CODE)).astype(np.float32)
    if np.isinf(scale.astype(np.float16)).any():
        raise QuantizeError(f"weights up to {np.abs(w).max():.3g} overflow an fp16 scale")
    scale = np.maximum(scale, np.float32(2.0 ** -24))   # tiny weights: the smallest fp16, not 0
    if settings.sym:
        zero = np.full(w.shape[0], (MAX_CODE + 1) // 2)
    else:
        zero = np.clip(np.round(-low / scale), settings.min_zero, MAX_CODE)
    return scale, zero.astype(np.float32)


def quantize_codes(w: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """q = clamp(round(w / scale) + zero, 0, 15), round half to even as torch.round.
    w (out, k) float32; scale, zero (out,) float32."""
    return np.clip(np.rint(w / scale[:, None]) + zero[:, None], 0, MAX_CODE)


def round_to_nearest(weight: np.ndarray, settings: QuantizeSettings) -> QuantizedWeight:
    """Every group of columns on its own grid, nothing propagated."""
    out, n = weight.shape
    size = settings.group_size if settings.group_size > 0 else n
    codes, scales, zeros = np.empty((out, n), np.uint8), [], []
    for start in range(0, n, size):
        w = weight[:, start:start + size].astype(np.float32)
        scale, zero = quantization_grid(w, settings)
        codes[:, start:start + size] = quantize_codes(w, scale, zero)
        scales.append(scale)
        zeros.append(zero)
    return QuantizedWeight.pack(codes, scales, zeros, (np.arange(n) // size).astype(np.int32))


@dataclass(frozen=True)
class InverseHessian:
    """What GPTQ needs of H, shared by the Linears that read the same input (q, k, v; gate, up)."""
    order: np.ndarray    # (in,) the order columns are quantized in (descending diag H with act-order)
    dead: np.ndarray     # (in,) bool, inputs that were always zero: their weights are set to 0
    u: np.ndarray        # (in, in) float32, upper, UᵀU = (H + λI)⁻¹ in processing order


def inverse_hessian(hessian: np.ndarray, settings: QuantizeSettings) -> InverseHessian:
    """Dead inputs pinned to H[i,i] = 1, columns ordered, λ = damp · mean(diag H) added, and
    the upper Cholesky factor of the inverse taken: row i of U holds what quantizing column i
    does to the columns after it (the paper's Cholesky form of the OBQ updates)."""
    h = hessian.astype(np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    order = np.argsort(-np.diag(h), kind="stable") if settings.act_order else np.arange(len(h))
    h = h[np.ix_(order, order)]
    h[np.diag_indices_from(h)] += settings.damp * np.mean(np.diag(h))
    try:
        u = np.linalg.cholesky(np.linalg.inv(h)).T
    except np.linalg.LinAlgError:
        raise QuantizeError(f"the Hessian is not positive definite with damp={settings.damp}; "
                            "try a larger --damp") from None
    return InverseHessian(order, dead, np.ascontiguousarray(u, dtype=np.float32))


def gptq(weight: np.ndarray, inverse: InverseHessian, settings: QuantizeSettings) -> QuantizedWeight:
    """Quantize W (out, in) column by column, each column's rounding error spread over the
    columns not yet quantized so as to minimise ‖XW - XŴ‖² (H = 2XᵀX/n, see inverse_hessian)."""
    out, n = weight.shape
    w = np.array(weight, dtype=np.float32)                               # (out, in), updated in place
    w[:, inverse.dead] = 0.0
    order, u = inverse.order, inverse.u
    w = np.ascontiguousarray(w[:, order])
    size = settings.group_size if settings.group_size > 0 else n
    block = size * max(1, settings.block_size // size) if settings.group_size > 0 else settings.block_size
    step = min(size, block)              # a run of columns on one grid inside one block
    codes, scales, zeros = np.empty((out, n), np.uint8), [], []
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        errors = np.empty((out, b1 - b0), np.float32)                    # (out, block)
        # Every grid of the block comes from the weights as the block starts (see the module notes)
        grids = {first: quantization_grid(w[:, first:first + size], settings)
                 for first in range(b0, b1, step) if first % size == 0}
        for first in range(b0, b1, step):
            if first in grids:
                scale, zero = grids[first]
                scales.append(scale)
                zeros.append(zero)
            gptq_columns(w, u, first, min(first + step, b1), b0, b1, scale, zero, codes, errors)
        w[:, b1:] -= errors @ u[b0:b1, b1:]                              # the lazy update of the rest
    g_idx = np.empty(n, np.int32)
    g_idx[order] = np.arange(n) // size
    restored = np.empty_like(codes)
    restored[:, order] = codes
    return QuantizedWeight.pack(restored, scales, zeros, g_idx)


class Hessian:
    """H = 2 XᵀX / n, accumulated over batches of rows of X."""

    def __init__(self, features: int):
        self.sum = np.zeros((features, features))   # Σ xᵀx, float64
        self.rows = 0
        self._inverse = None

    def add(self, x: np.ndarray) -> None:
        """x (rows, features) float32."""
        self.sum += x.T @ x
        self.rows += x.shape[0]

    def value(self) -> np.ndarray:
        return 2.0 * self.sum / self.rows

    def inverse(self, settings: QuantizeSettings) -> InverseHessian:
        """inverse_hessian of the value, computed once for all the Linears that share it."""
        if self._inverse is None:
            self._inverse = inverse_hessian(self.value(), settings)
        return self._inverse


def hessian_of(x: np.ndarray) -> Hessian:
    hessian = Hessian(x.shape[1])
    hessian.add(x)
    return hessian
