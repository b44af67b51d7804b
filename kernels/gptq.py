"""4-bit GPTQ matrix products on the packed weights, and the NumPy reference they are tested against.

The packed format (AutoGPTQ, GPTQ-for-LLaMa, gptqmodel, transformers all write it):
    qweight (in/8, out) int32   8 codes per word along the input axis, LSB first:
                                bits 4k..4k+3 of qweight[r, o] are the code of input row 8r + k
    zeros   (groups, out)       the zero point of each group and output column, already
                                unpacked and corrected for the v1 "stored zero - 1" convention
    scales  (groups, out)
    W[i, o] = scales[g(i), o] * (code[i, o] - zeros[g(i), o])   and   y = x @ W

The kernels take the rows already sorted so that every group is one contiguous run of rows
starting at a multiple of 8 (group_starts (groups + 1,)); act-order checkpoints are put in
that order once at load time (see llama_ref/gptq.py). Factoring the zero point out of the
group sum keeps the hot loop to one multiply-add per code:
    y[o] = Σ_g scales[g, o] · Σ_{i∈g} x[i] · code[i, o]  −  Σ_g scales[g, o] · zeros[g, o] · Σ_{i∈g} x[i]
The dequantized matrix is never made for n ≤ SMALL_BATCH rows of x (decoding); for more
rows (prefill) column tiles of it are made in float32 and multiplied with BLAS.
"""
import numpy as np
from numba import njit, prange

from .dense import FASTMATH, SMALL_BATCH

BITS = 4
CODES_PER_WORD = 32 // BITS
COLUMN_BLOCK = 64      # output columns per parallel task: 64 words = 256 bytes of each packed row
TILE_COLUMNS = 512     # output columns dequantized per BLAS call in the prefill path


def unpack_rows(qweight: np.ndarray) -> np.ndarray:
    """(in/8, out) int32 -> (in, out) uint8 codes: word r holds rows 8r .. 8r+7, LSB first."""
    words = qweight.view(np.uint32)
    shifts = (np.arange(CODES_PER_WORD, dtype=np.uint32) * BITS)[None, :, None]
    codes = (words[:, None, :] >> shifts) & 0xF                     # (in/8, 8, out)
    return codes.reshape(-1, words.shape[1]).astype(np.uint8)


def pack_rows(codes: np.ndarray) -> np.ndarray:
    """(in, out) codes 0..15 -> (in/8, out) int32, the inverse of unpack_rows."""
    grouped = codes.astype(np.uint32).reshape(-1, CODES_PER_WORD, codes.shape[1])  # (in/8, 8, out)
    shifts = (np.arange(CODES_PER_WORD, dtype=np.uint32) * BITS)[None, :, None]
    return np.bitwise_or.reduce(grouped << shifts, axis=1).view(np.int32)


def unpack_columns(qzeros: np.ndarray) -> np.ndarray:
    """(groups, out/8) int32 -> (groups, out) uint8: word c holds columns 8c .. 8c+7, LSB first."""
    words = qzeros.view(np.uint32)
    shifts = np.arange(CODES_PER_WORD, dtype=np.uint32) * BITS
    return ((words[:, :, None] >> shifts) & 0xF).reshape(words.shape[0], -1).astype(np.uint8)


def pack_columns(codes: np.ndarray) -> np.ndarray:
    """(groups, out) codes -> (groups, out/8) int32, the inverse of unpack_columns."""
    grouped = codes.astype(np.uint32).reshape(codes.shape[0], -1, CODES_PER_WORD)
    shifts = np.arange(CODES_PER_WORD, dtype=np.uint32) * BITS
    return np.bitwise_or.reduce(grouped << shifts, axis=2).view(np.int32)


def dequantize_numpy(qweight, zeros, scales, g_idx) -> np.ndarray:
    """The reference: W (in, out) float32 = scales[g_idx] * (codes - zeros[g_idx]), any g_idx."""
    codes = unpack_rows(qweight).astype(np.float32)
    return scales[g_idx].astype(np.float32) * (codes - zeros[g_idx].astype(np.float32))


@njit(cache=True)
def group_sums(x, group_starts):
    """Σ_{i∈g} x[b, i] for every row b and group g.  Returns (n, groups) float32."""
    n = x.shape[0]
    groups = group_starts.shape[0] - 1
    sums = np.zeros((n, groups), dtype=np.float32)
    for b in range(n):
        for g in range(groups):
            acc = np.float32(0.0)
            for i in range(group_starts[g], group_starts[g + 1]):
                acc += x[b, i]
            sums[b, g] = acc
    return sums


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def gptq_matmul_small(x, words, scales, scaled_zeros, group_starts):
    """y = x @ W without making W.  x (n, in) float32 in the kernel's row order; words
    (in/8, out) uint32; scales, scaled_zeros (groups, out) float32 (scaled_zeros = scales * zeros).
    Parallel over blocks of output columns; each packed word is read once for all n rows."""
    n = x.shape[0]
    d_out = words.shape[1]
    groups = scales.shape[0]
    sums = group_sums(x, group_starts)                                # (n, groups)
    y = np.zeros((n, d_out), dtype=np.float32)                        # (n, out)
    for block in prange((d_out + COLUMN_BLOCK - 1) // COLUMN_BLOCK):
        j0 = block * COLUMN_BLOCK
        j1 = min(j0 + COLUMN_BLOCK, d_out)
        part = np.empty((n, j1 - j0), dtype=np.float32)               # Σ_{i∈g} x · code, per group
        for g in range(groups):
            part[:] = 0.0
            for r in range(group_starts[g] // CODES_PER_WORD, group_starts[g + 1] // CODES_PER_WORD):
                for b in range(n):
                    i = r * CODES_PER_WORD
                    x0, x1, x2, x3 = x[b, i], x[b, i + 1], x[b, i + 2], x[b, i + 3]
                    x4, x5, x6, x7 = x[b, i + 4], x[b, i + 5], x[b, i + 6], x[b, i + 7]
                    for j in range(j0, j1):
                        w = words[r, j]
                        part[b, j - j0] += (x0 * np.float32(w & 15) + x1 * np.float32((w >> 4) & 15)
                                            + x2 * np.float32((w >> 8) & 15) + x3 * np.float32((w >> 12) & 15)
                                            + x4 * np.float32((w >> 16) & 15) + x5 * np.float32((w >> 20) & 15)
                                            + x6 * np.float32((w >> 24) & 15) + x7 * np.float32((w >> 28) & 15))
            for b in range(n):
                for j in range(j0, j1):
                    y[b, j] += scales[g, j] * part[b, j - j0] - scaled_zeros[g, j] * sums[b, g]
    return y


@njit(parallel=True, cache=True)
def dequantize_tile(words, scales, scaled_zeros, group_starts, j0, j1):
    """W[:, j0:j1] (in, j1 - j0) float32, for the prefill path."""
    d_in = words.shape[0] * CODES_PER_WORD
    tile = np.empty((d_in, j1 - j0), dtype=np.float32)
    for g in prange(scales.shape[0]):
        for i in range(group_starts[g], group_starts[g + 1]):
            r, shift = i // CODES_PER_WORD, (i % CODES_PER_WORD) * BITS
            for j in range(j0, j1):
                code = np.float32((words[r, j] >> shift) & 15)
                tile[i, j - j0] = scales[g, j] * code - scaled_zeros[g, j]
    return tile


def gptq_matmul_tiled(x, words, scales, scaled_zeros, group_starts):
    """Column tiles of W in float32, multiplied with BLAS; best for prefill."""
    d_out = words.shape[1]
    y = np.empty((x.shape[0], d_out), dtype=np.float32)               # (n, out)
    for j0 in range(0, d_out, TILE_COLUMNS):
        j1 = min(j0 + TILE_COLUMNS, d_out)
        y[:, j0:j1] = x @ dequantize_tile(words, scales, scaled_zeros, group_starts, j0, j1)
    return y


def gptq_matmul(x, words, scales, scaled_zeros, group_starts):
    """y = x @ W for the packed W, choosing the kernel by the number of rows of x."""
    if x.shape[0] <= SMALL_BATCH:
        return gptq_matmul_small(x, words, scales, scaled_zeros, group_starts)
    return gptq_matmul_tiled(x, words, scales, scaled_zeros, group_starts)
