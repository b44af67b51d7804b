"""4-bit GPTQ matrix products on the packed weights, and the NumPy reference they are tested against.

The packed format (AutoGPTQ, GPTQ-for-LLaMa, gptqmodel, transformers all write it):
    qweight (in/8, out) int32   8 codes per word along the input axis, LSB first:
                                bits 4k..4k+3 of qweight[r, o] are the code of input row 8r + k
    zeros   (groups, out) uint8 the zero point of each group and output column, already
                                unpacked and corrected for the v1 "stored zero - 1" convention
    scales  (groups, out)       as stored: fp16 (as uint16 bits), bf16 or float32
    W[i, o] = scales[g(i), o] * (code[i, o] - zeros[g(i), o])   and   y = x @ W

The kernels take the rows already sorted so that every group is one contiguous run of rows
starting at a multiple of 8 (group_starts (groups + 1,)); act-order checkpoints are put in
that order once at load time (see llama_ref/formats/gptq.py). They also take the words re-laid out
in blocks of 64 output columns (block_columns), each block one contiguous stream, and the
scales and zero points likewise (block_groups, (out/64, groups, 64)).

Decoding (n <= SMALL_BATCH rows of x) never makes the dequantized matrix. It works in
integers, as llama.cpp does, but without giving up float32 accuracy: each row of x is cut
into runs (a group, or 4096 inputs of a longer one), and a run is written as two int16
vectors on its own scale s_x = max|x| / 32767 (quantize_activations):
    x = s_x · (q1 + 2^-15 · q2)      q1 = round(x / s_x), q2 = round the remainder
to within s_x · 2^-16, about 2^-31 of the run's largest |x|, far below float32's own
rounding. Then, per term,
    y[o] = Σ_runs scale[g, o] · s_x · Σ_t 2^-15t · (Σ_{i∈run} code[i, o] · q_t[i]  −  zero[g, o] · Σ_{i∈run} q_t[i])
with each bracket exact in int32 (kernels/intdot.py: one vpmaddwd multiplies 16 codes by
16 int16 activations). The second term costs about 10% (measured, 5120 x 13824): the
integer loop is bound by memory, not arithmetic. For more rows (prefill) column tiles of W
are made in float32 and multiplied with BLAS.
"""
import numpy as np
from numba import njit, prange

from .convert import bf16_to_f32, f16_to_f32, f32_to_f32
from .dense import SMALL_BATCH
from .intdot import TERMS, dot_codes

BITS = 4
CODES_PER_WORD = 32 // BITS
COLUMN_BLOCK = 64      # output columns per parallel task: 64 words = 256 bytes of each packed row
TILE_COLUMNS = 512     # output columns dequantized per BLAS call in the prefill path
X_LEVELS = 32767       # the first activation term is an int16 in -X_LEVELS..X_LEVELS
REMAINDER = np.float32(2.0 ** 15)   # the second term counts steps of s_x / 2^15: |q2| about 2^14
# Inputs summed in one int32 run: |code - zero| <= 16 (a v1 0xF zero point reads as 16), so
# a run's bracket is at most 4096 · 16 · 32767 < 2^31.
RUN_INPUTS = 4096


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


def block_columns(words: np.ndarray) -> np.ndarray:
    """(in/8, out) words -> (ceil(out/64), in/8, 64): each run of COLUMN_BLOCK output columns
    contiguous, so a parallel task streams one sequential region instead of 256 bytes per row
    (measured 1.4x on 5120 x 13824); the last block is padded with zero words."""
    rows, out = words.shape
    blocks = np.empty((-(-out // COLUMN_BLOCK), rows, COLUMN_BLOCK), dtype=np.uint32)
    _fill_blocks(words, blocks)
    return blocks


@njit(parallel=True, cache=True)
def _fill_blocks(words, blocks):
    n_blocks, rows, width = blocks.shape
    for block in prange(n_blocks):
        for r in range(rows):
            for j in range(width):
                column = block * width + j
                blocks[block, r, j] = words[r, column] if column < words.shape[1] else 0


def unblock_columns(blocks: np.ndarray, out: int) -> np.ndarray:
    """The inverse of block_columns: (in/8, out) uint32."""
    return blocks.transpose(1, 0, 2).reshape(blocks.shape[1], -1)[:, :out]


def block_groups(values: np.ndarray, n_blocks: int) -> np.ndarray:
    """(groups, out) scales or zero points -> (n_blocks, groups, 64) of the same dtype, zeros
    beyond out: a block's values for all its groups in one place, next to its words
    (measured 1.2x over reading them from (groups, out) rows 2 * out bytes apart)."""
    groups, out = values.shape
    padded = np.zeros((groups, n_blocks * COLUMN_BLOCK), dtype=values.dtype)
    padded[:, :out] = values
    return np.ascontiguousarray(padded.reshape(groups, n_blocks, COLUMN_BLOCK).transpose(1, 0, 2))


def unblock_groups(values: np.ndarray, out: int) -> np.ndarray:
    """The inverse of block_groups: (groups, out)."""
    return values.transpose(1, 0, 2).reshape(values.shape[1], -1)[:, :out]


@njit(cache=True)
def activation_runs(group_starts):
    """Each non-empty group cut into runs of at most RUN_INPUTS inputs (multiples of 8).
    Returns (run_starts (runs + 1,), run_groups (runs,)) int64."""
    count = 0
    for g in range(group_starts.shape[0] - 1):
        count += -(-(group_starts[g + 1] - group_starts[g]) // RUN_INPUTS)
    starts = np.empty(count + 1, dtype=np.int64)
    groups = np.empty(count, dtype=np.int64)
    run = 0
    for g in range(group_starts.shape[0] - 1):
        for start in range(group_starts[g], group_starts[g + 1], RUN_INPUTS):
            starts[run], groups[run] = start, g
            run += 1
    starts[count] = group_starts[-1]
    return starts, groups


@njit(cache=True)
def quantize_activations(x, run_starts):
    """Each run of each row of x (n, in) as s_x · (q1 + q2 / 2^15), s_x = max|x| / X_LEVELS.
    Returns xpairs (n, in/8, 2, 4) uint32 (for term t, q_t[8r+k] low and q_t[8r+k+4] high:
    what dot_codes multiplies codes k and k+4 with), s_x (n, runs) float32 and
    Σ q_t (n, runs, 2) int32."""
    n, d_in = x.shape
    runs = run_starts.shape[0] - 1
    xpairs = np.empty((n, d_in // CODES_PER_WORD, TERMS, 4), dtype=np.uint32)
    scale = np.empty((n, runs), dtype=np.float32)
    total = np.zeros((n, runs, TERMS), dtype=np.int32)
    q = np.empty((TERMS, CODES_PER_WORD), dtype=np.int32)
    for b in range(n):
        for run in range(runs):
            largest = np.float32(0.0)
            for i in range(run_starts[run], run_starts[run + 1]):
                largest = max(largest, abs(x[b, i]))
            step = largest / np.float32(X_LEVELS)
            scale[b, run] = step
            inverse = np.float32(1.0) / step if largest > 0 else np.float32(0.0)
            for r in range(run_starts[run] // CODES_PER_WORD, run_starts[run + 1] // CODES_PER_WORD):
                for k in range(CODES_PER_WORD):
                    value = x[b, r * CODES_PER_WORD + k]
                    first = min(max(np.rint(value * inverse), -np.float32(X_LEVELS)), np.float32(X_LEVELS))
                    q[0, k] = np.int32(first)
                    q[1, k] = np.int32(np.rint((value - first * step) * inverse * REMAINDER))
                for t in range(TERMS):
                    for k in range(4):
                        total[b, run, t] += q[t, k] + q[t, k + 4]
                        xpairs[b, r, t, k] = np.uint32(q[t, k] & 0xFFFF) | (np.uint32(q[t, k + 4] & 0xFFFF) << np.uint32(16))
    return xpairs, scale, total


def quantize_activations_numpy(x: np.ndarray, run_starts: np.ndarray):
    """The twin of quantize_activations, returning q (n, in, 2) int64 instead of the pairs."""
    q, scale, total = np.empty(x.shape + (TERMS,), np.int64), [], []
    for start, stop in zip(run_starts[:-1], run_starts[1:]):
        part = x[:, start:stop]
        largest = np.abs(part).max(axis=1)
        step = largest / np.float32(X_LEVELS)
        inverse = np.divide(np.float32(1), step, out=np.zeros_like(step), where=largest > 0)[:, None]
        first = np.clip(np.rint(part * inverse), -X_LEVELS, X_LEVELS).astype(np.float32)
        q[:, start:stop, 0] = first
        q[:, start:stop, 1] = np.rint((part - first * step[:, None]) * inverse * REMAINDER)
        scale.append(step)
        total.append(q[:, start:stop].sum(axis=1))
    return q, np.array(scale, np.float32).T, np.array(total, np.int64).transpose(1, 0, 2)


def matmul_small_numpy(x, blocks, scales, zeros, group_starts, widen_numpy, with_min=False):
    """The twin of the decode kernel: the same int16 activations, the brackets in int64 and
    the rest in float64.  Returns (n, out padded) float64."""
    run_starts, run_groups = activation_runs(group_starts)
    q, xscale, total = quantize_activations_numpy(x, run_starts)
    codes = unpack_rows(unblock_columns(blocks, blocks.shape[0] * COLUMN_BLOCK)).astype(np.int64)  # (in, out padded)
    scale = widen_numpy(unblock_groups(scales, codes.shape[1])).astype(np.float64)           # (groups, out padded)
    offset = unblock_groups(zeros, codes.shape[1])
    y = np.zeros((x.shape[0], codes.shape[1]))
    for run, g in enumerate(run_groups):
        start, stop = run_starts[run], run_starts[run + 1]
        for t in range(TERMS):
            dot = q[:, start:stop, t] @ codes[start:stop]                                       # (n, out) int64
            if with_min:
                bracket = scale[g] * dot + widen_numpy(offset[g]).astype(np.float64) * total[:, run, t:t + 1]
            else:
                bracket = scale[g] * (dot - offset[g].astype(np.int64) * total[:, run, t:t + 1])
            y += xscale[:, run:run + 1].astype(np.float64) * bracket / float(REMAINDER) ** t
    return y


def _make_kernels(widen, with_min):
    """The decode kernel and the prefill tile for scales stored as `widen` reads them.
    with_min: `zeros` holds each group's additive offset m (stored like the scales), so that
    W = scale · code + m, as GGUF's Q4_1 (and Q4_0, m = -8 · scale); else the uint8 zero
    points of GPTQ, W = scale · (code - zero)."""

    @njit(parallel=True, cache=True)
    def matmul_small(x, blocks, scales, zeros, group_starts):
        """y = x @ W without making W.  x (n, in) float32 in the kernel's row order; blocks
        (out/64, in/8, 64) uint32 (block_columns); scales (out/64, groups, 64) as stored and
        zeros (out/64, groups, 64) uint8, the true zero points (block_groups).  Returns
        (n, out padded).  One parallel task per block of 64 columns; each word is read once."""
        n = x.shape[0]
        n_blocks, _, width = blocks.shape
        run_starts, run_groups = activation_runs(group_starts)
        xpairs, xscale, xsum = quantize_activations(x, run_starts)
        y = np.zeros((n, n_blocks * width), dtype=np.float32)         # (n, out padded)
        for block in prange(n_blocks):
            j0 = block * width
            acc = np.empty((TERMS, width), dtype=np.int32)            # Σ code · q_t over one run
            for run in range(run_groups.shape[0]):
                g = run_groups[run]
                r0, r1 = run_starts[run] // CODES_PER_WORD, run_starts[run + 1] // CODES_PER_WORD
                for b in range(n):
                    dot_codes(blocks[block, r0].ctypes.data, xpairs[b, r0].ctypes.data, r1 - r0, acc.ctypes.data)
                    step = xscale[b, run]
                    out = y[b, j0:j0 + width]
                    if with_min:
                        # GGUF's groups of 32: |acc| < 32 · 15 · 32767 < 2^24, exact in float32
                        offsets = np.float32(xsum[b, run, 0]) + np.float32(xsum[b, run, 1]) / REMAINDER
                        for j in range(width):
                            codes_part = np.float32(acc[0, j]) + np.float32(acc[1, j]) / REMAINDER
                            out[j] += step * (widen(scales[block, g, j]) * codes_part + widen(zeros[block, g, j]) * offsets)
                        continue
                    # float64 keeps the brackets exact (|values| < 2^53) and vectorises, where
                    # Numba's int32 arithmetic would widen to int64 and stay scalar
                    first_sum, second_sum = np.float64(xsum[b, run, 0]), np.float64(xsum[b, run, 1])
                    for j in range(width):
                        zero = np.float64(zeros[block, g, j])
                        bracket = widen(scales[block, g, j]) * np.float32(
                            (np.float64(acc[0, j]) - zero * first_sum) + (np.float64(acc[1, j]) - zero * second_sum) / REMAINDER)
                        out[j] += step * bracket
        return y

    @njit(parallel=True, cache=True)
    def tile(blocks, scales, zeros, group_starts, j0, j1):
        """W[:, j0:j1] (in, j1 - j0) float32, for the prefill path; j0 and j1 multiples of 64."""
        width = blocks.shape[2]
        d_in = blocks.shape[1] * CODES_PER_WORD
        out = np.empty((d_in, j1 - j0), dtype=np.float32)
        for g in prange(scales.shape[1]):
            for i in range(group_starts[g], group_starts[g + 1]):
                r, shift = i // CODES_PER_WORD, (i % CODES_PER_WORD) * BITS
                for block in range(j0 // width, j1 // width):
                    for jj in range(width):
                        j = block * width + jj
                        code = np.float32((blocks[block, r, jj] >> shift) & 15)
                        if with_min:
                            out[i, j - j0] = widen(scales[block, g, jj]) * code + widen(zeros[block, g, jj])
                        else:
                            out[i, j - j0] = widen(scales[block, g, jj]) * (code - np.float32(zeros[block, g, jj]))
        return out

    return matmul_small, tile


# (scale storage, offsets are mins) -> (decode kernel, prefill tile); fp16 scales stay 16-bit in memory
_KERNELS = {("F16", False): _make_kernels(f16_to_f32, False), ("BF16", False): _make_kernels(bf16_to_f32, False),
            ("F32", False): _make_kernels(f32_to_f32, False), ("F16", True): _make_kernels(f16_to_f32, True)}


def gptq_matmul_small(x, blocks, scales, zeros, group_starts, storage, with_min=False):
    return _KERNELS[storage, with_min][0](x, blocks, scales, zeros, group_starts)


def dequantize_tile(blocks, scales, zeros, group_starts, j0, j1, storage, with_min=False):
    return _KERNELS[storage, with_min][1](blocks, scales, zeros, group_starts, j0, j1)


def gptq_matmul_tiled(x, blocks, scales, zeros, group_starts, storage, with_min=False):
    """Column tiles of W in float32, multiplied with BLAS; best for prefill.  (n, out padded)."""
    d_out = blocks.shape[0] * blocks.shape[2]
    y = np.empty((x.shape[0], d_out), dtype=np.float32)               # (n, out padded)
    for j0 in range(0, d_out, TILE_COLUMNS):
        j1 = min(j0 + TILE_COLUMNS, d_out)
        y[:, j0:j1] = x @ dequantize_tile(blocks, scales, zeros, group_starts, j0, j1, storage, with_min)
    return y


def gptq_matmul(x, blocks, scales, zeros, group_starts, storage, with_min=False):
    """y = x @ W for the packed W, choosing the kernel by the number of rows of x.  (n, out padded)."""
    if x.shape[0] <= SMALL_BATCH:
        return gptq_matmul_small(x, blocks, scales, zeros, group_starts, storage, with_min)
    return gptq_matmul_tiled(x, blocks, scales, zeros, group_starts, storage, with_min)
