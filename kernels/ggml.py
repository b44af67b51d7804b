"""GGUF block-quantized weights (llama.cpp's Q8_0, Q4_0, Q4_1), kept as stored: each output
row is its own run of blocks of 32 inputs. All three dequantize here (embedding rows); Q8_0
also multiplies here, while Q4_0 and Q4_1 are re-laid out at load for gptq.py's kernels.

    Q8_0  34 bytes: d (fp16), then 32 int8 q          w = d * q
    Q4_0  18 bytes: d (fp16), then 16 bytes of nibbles w = d * (q - 8)
    Q4_1  20 bytes: d (fp16), m (fp16), 16 bytes       w = d * q + m
In Q4_0 and Q4_1, byte j of a block holds input j in its low nibble and input j + 16 in its
high nibble (ggml's dequantize_row_q4_0/q4_1).

Contract, as for the dense kernels: x (n, in) float32 @ W (out, in) -> y (n, out) float32,
with W given as its stored bytes (out, in / 32 * block bytes) uint8. The kernel has a NumPy
twin (the test compares both with gguf.quants.dequantize).
"""
import numpy as np
from numba import njit, prange

from .convert import f16_to_f32
from .dense import FASTMATH, SMALL_BATCH, TILE_ROWS

BLOCK = 32
ROWS_PER_TASK = 64     # output rows per parallel task in the Q8_0 kernel
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
# Q4_0 and Q4_1 weights run through the 4-bit kernels of gptq.py instead, re-laid out at load
# (several times faster than a per-row block kernel); their rows are still dequantized here.
MATMUL_KINDS = ("Q8_0",)


def _fp16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 at byte `offset` of every block, as float32.  blocks (..., block bytes) uint8."""
    return np.ascontiguousarray(blocks[..., offset:offset + 2]).view(np.float16)[..., 0].astype(np.float32)


def dequantize_numpy(data: np.ndarray, kind: str) -> np.ndarray:
    """(out, row bytes) uint8 -> W (out, in) float32."""
    blocks = data.reshape(data.shape[0], -1, BLOCK_BYTES[kind])         # (out, in/32, bytes)
    d = _fp16(blocks, 0)[..., None]                                     # (out, in/32, 1)
    if kind == "Q8_0":
        w = d * blocks[..., 2:].view(np.int8).astype(np.float32)
    else:
        nibbles = blocks[..., 4 if kind == "Q4_1" else 2:]
        q = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1).astype(np.float32)  # (out, in/32, 32)
        w = d * q + _fp16(blocks, 2)[..., None] if kind == "Q4_1" else d * (q - 8)
    return w.reshape(data.shape[0], -1)


def matmul_numpy(x: np.ndarray, data: np.ndarray, kind: str) -> np.ndarray:
    return x.astype(np.float32) @ dequantize_numpy(data, kind).T


@njit(cache=True)
def _half(data, o, at):
    return f16_to_f32(np.uint16(data[o, at]) | (np.uint16(data[o, at + 1]) << np.uint16(8)))


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def q8_0_matmul(x, data, signed):
    """data (out, row bytes) uint8 and `signed`, the same bytes viewed as int8.  Each row keeps
    32 partial sums, one per position in a block, and adds them up once at its end: no
    horizontal sum per block, so the loop over a block's 32 values stays vectorised."""
    n, d_in = x.shape
    out = data.shape[0]
    y = np.zeros((n, out), dtype=np.float32)
    for chunk in prange((out + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        acc = np.empty(BLOCK, dtype=np.float32)
        for o in range(chunk * ROWS_PER_TASK, min((chunk + 1) * ROWS_PER_TASK, out)):
            for b in range(n):
                acc[:] = 0.0
                for k in range(d_in // BLOCK):
                    base = k * 34
                    d = _half(data, o, base)
                    for j in range(BLOCK):
                        acc[j] += d * (x[b, k * BLOCK + j] * np.float32(signed[o, base + 2 + j]))
                y[b, o] = acc.sum()
    return y


def matmul_small(x: np.ndarray, data: np.ndarray, kind: str) -> np.ndarray:
    if kind not in MATMUL_KINDS:
        raise ValueError(f"kind: the block kernels take {', '.join(MATMUL_KINDS)}, got {kind!r}")
    return q8_0_matmul(x, data, data.view(np.int8))


def matmul(x: np.ndarray, data: np.ndarray, kind: str) -> np.ndarray:
    """y = x @ Wᵀ: the row-parallel kernels for decoding, dequantized row tiles + BLAS for prefill."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if kind not in MATMUL_KINDS:
        raise ValueError(f"kind: the block kernels take {', '.join(MATMUL_KINDS)}, got {kind!r}")
    if x.shape[0] <= SMALL_BATCH:
        return matmul_small(x, data, kind)
    y = np.empty((x.shape[0], data.shape[0]), dtype=np.float32)          # (n, out)
    for start in range(0, data.shape[0], TILE_ROWS):
        stop = min(start + TILE_ROWS, data.shape[0])
        y[:, start:stop] = x @ dequantize_numpy(data[start:stop], kind).T
    return y
