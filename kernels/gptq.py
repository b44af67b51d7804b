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

The product never makes the dequantized matrix, for one row (decoding) or hundreds
(prefill). Per group g and output column o it sums code · x in float32 (kernels/floatdot.py:
the codes of a word unpacked in registers once for up to 4 rows, one fused multiply-add per
code and row) and then applies the group's scale and zero point, in float64 where they meet:
    y[o] = Σ_g scale[g, o] · (Σ_{i∈g} code[i, o] · x[i]  −  zero[g, o] · Σ_{i∈g} x[i])
A row's operations are the same whatever rows share the call, so its result is too: a prompt
chunk and a decoding row give the same numbers alone or together. With a few rows the kernel
reads the weights at memory speed; with many it runs at the CPU's float32 multiply-add peak
(150 GFLOPS on 2 EPYC cores, as fast as OpenBLAS's sgemm on the dequantized matrix, which
would also cost the dequantizing: benchmarks.md, "Prefill").
"""
import numpy as np
from numba import njit, prange

from .convert import widen
from .floatdot import INPUT_SCALES, TILE_COLUMNS, TILE_ROWS, dot_codes_1, dot_codes_2, dot_codes_3, dot_codes_4

BITS = 4
CODES_PER_WORD = 32 // BITS
COLUMN_BLOCK = 64      # output columns per parallel task: 64 words = 256 bytes of each packed row
ROW_CHUNK = 64         # rows of x whose group sums one task keeps (64 x 64 floats: 16 KB, in L1)


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


def _make_kernels(storage, with_min):
    """The matrix product and the dequantized tile for scales stored as `storage` says.
    with_min: `zeros` holds each group's additive offset m (stored like the scales), so that
    W = scale · code + m, as GGUF's Q4_1 (and Q4_0, m = -8 · scale); else the uint8 zero
    points of GPTQ, W = scale · (code - zero)."""
    # a variable of the closure, not a global: Numba's cache keys a closure on its variables'
    # values, so the kernels of the two vector widths (floatdot.LANES) are kept apart
    tile_columns = TILE_COLUMNS

    @njit(parallel=True, cache=True)
    def matmul(x, blocks, scales, zeros, group_starts):
        """y = x @ W without making W.  x (n, in) float32 in the kernel's row order; blocks
        (out/64, in/8, 64) uint32 (block_columns); scales (out/64, groups, 64) as stored and
        zeros (out/64, groups, 64) uint8, the true zero points (block_groups).  Returns
        (n, out padded).  One parallel task per block of 64 columns; each word is read from
        memory once, and again from cache for each further ROW_CHUNK rows."""
        n, d_in = x.shape
        n_blocks, _, width = blocks.shape
        groups = group_starts.shape[0] - 1
        scaled = np.empty_like(x)                                     # (n, in): x[i] · 2^-4(i mod 8), see floatdot
        xsum = np.zeros((n, groups), dtype=np.float64)                # Σ x over each group
        for b in prange(n):
            for i in range(d_in):
                scaled[b, i] = x[b, i] * INPUT_SCALES[i % CODES_PER_WORD]
            for g in range(groups):
                for i in range(group_starts[g], group_starts[g + 1]):
                    xsum[b, g] += x[b, i]
        y = np.zeros((n, n_blocks * width), dtype=np.float32)         # (n, out padded)
        for block in prange(n_blocks):
            j0 = block * width
            acc = np.empty((min(n, ROW_CHUNK), width), dtype=np.float32)   # Σ code · x over one group
            scale = np.empty(width, dtype=np.float32)                 # the group's scales, widened
            offset = np.empty(width, dtype=np.float32)                # and its mins, widened
            zero = np.empty(width, dtype=np.float64)                  # or its zero points
            for c0 in range(0, n, ROW_CHUNK):
                rows = min(ROW_CHUNK, n - c0)
                for g in range(groups):
                    r0, r1 = group_starts[g] // CODES_PER_WORD, group_starts[g + 1] // CODES_PER_WORD
                    if r1 == r0:
                        continue
                    for b0 in range(0, rows, TILE_ROWS):
                        height = min(TILE_ROWS, rows - b0)
                        for c in range(0, width, tile_columns[height]):
                            w_at = blocks[block, r0, c:].ctypes.data
                            x_at, a_at = scaled[c0 + b0, r0 * CODES_PER_WORD:].ctypes.data, acc[b0, c:].ctypes.data
                            if height == 4:
                                dot_codes_4(w_at, x_at, d_in, r1 - r0, a_at)
                            elif height == 3:
                                dot_codes_3(w_at, x_at, d_in, r1 - r0, a_at)
                            elif height == 2:
                                dot_codes_2(w_at, x_at, d_in, r1 - r0, a_at)
                            else:
                                dot_codes_1(w_at, x_at, d_in, r1 - r0, a_at)
                    for j in range(width):
                        scale[j] = widen(storage, scales[block, g, j])
                        if with_min:
                            offset[j] = widen(storage, zeros[block, g, j])
                        else:
                            zero[j] = np.float64(zeros[block, g, j])
                    for b in range(rows):
                        total = xsum[c0 + b, g]
                        out = y[c0 + b, j0:j0 + width]
                        for j in range(width):
                            if with_min:
                                out[j] += scale[j] * acc[b, j] + offset[j] * np.float32(total)
                            else:
                                out[j] += scale[j] * np.float32(np.float64(acc[b, j]) - zero[j] * total)
        return y

    @njit(parallel=True, cache=True)
    def tile(blocks, scales, zeros, group_starts, j0, j1):
        """W[:, j0:j1] (in, j1 - j0) float32 (what the quantizer reads back); j0 and j1 multiples of 64."""
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
                        scale = widen(storage, scales[block, g, jj])
                        if with_min:
                            out[i, j - j0] = scale * code + widen(storage, zeros[block, g, jj])
                        else:
                            out[i, j - j0] = scale * (code - np.float32(zeros[block, g, jj]))
        return out

    return matmul, tile


# (scale storage, offsets are mins) -> (matrix product, dequantized tile); fp16 scales stay 16-bit in memory
_KERNELS = {(storage, with_min): _make_kernels(storage, with_min)
            for storage, with_min in (("F16", False), ("BF16", False), ("F32", False), ("F16", True))}


def gptq_matmul(x, blocks, scales, zeros, group_starts, storage, with_min=False):
    """y = x @ W for the packed W, any number of rows.  (n, out padded)."""
    return _KERNELS[storage, with_min][0](x, blocks, scales, zeros, group_starts)


def dequantize_tile(blocks, scales, zeros, group_starts, j0, j1, storage, with_min=False):
    return _KERNELS[storage, with_min][1](blocks, scales, zeros, group_starts, j0, j1)
