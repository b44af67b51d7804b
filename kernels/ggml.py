"""Matrix products on GGUF block-quantized weights (llama.cpp's Q8_0, Q4_0, Q4_1), kept as
stored: each output row is its own run of blocks of 32 inputs.

    Q8_0  34 bytes: d (fp16), then 32 int8 q          w = d * q
    Q4_0  18 bytes: d (fp16), then 16 bytes of nibbles w = d * (q - 8)
    Q4_1  20 bytes: d (fp16), m (fp16), 16 bytes       w = d * q + m
In Q4_0 and Q4_1, byte j of a block holds input j in its low nibble and input j + 16 in its
high nibble (ggml's dequantize_row_q4_0/q4_1).

Contract, as for the dense kernels: x (n, in) float32 @ W (out, in) -> y (n, out) float32,
with W given as its stored bytes (out, in / 32 * block bytes) uint8. A block's offset term
is factored out of its sum: Σ x·(d·q + m) = d·Σ x·q + m·Σ x (Q4_0: m = -8·d). Each kernel
has a NumPy twin (the test compares both with gguf.quants.dequantize).
"""
import numpy as np
from numba import njit, prange

from .convert import f16_to_f32
from .dense import FASTMATH, SMALL_BATCH, TILE_ROWS

BLOCK = 32
ROWS_PER_TASK = 64     # output rows per parallel task in the Q8_0 kernel
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


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


@njit(cache=True)
def block_sums(x):
    """Σ of x over each block of 32 inputs.  Returns (n, in/32) float32."""
    n, d_in = x.shape
    sums = np.zeros((n, d_in // BLOCK), dtype=np.float32)
    for b in range(n):
        for k in range(d_in // BLOCK):
            sums[b, k] = x[b, k * BLOCK:(k + 1) * BLOCK].sum()
    return sums


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


def _make_q4_matmul(with_min):
    header, block_bytes = (4, 20) if with_min else (2, 18)

    @njit(parallel=True, fastmath=FASTMATH, cache=True)
    def q4_matmul(x, data):
        n, d_in = x.shape
        sums = block_sums(x)                                             # (n, in/32)
        y = np.zeros((n, data.shape[0]), dtype=np.float32)
        for o in prange(data.shape[0]):
            for k in range(d_in // BLOCK):
                base = k * block_bytes
                d = _half(data, o, base)
                m = _half(data, o, base + 2) if with_min else np.float32(-8.0) * d
                for b in range(n):
                    acc = np.float32(0.0)
                    for j in range(16):
                        byte = data[o, base + header + j]
                        acc += (x[b, k * BLOCK + j] * np.float32(byte & 15)
                                + x[b, k * BLOCK + j + 16] * np.float32(byte >> 4))
                    y[b, o] += d * acc + m * sums[b, k]
        return y
    return q4_matmul


q4_0_matmul = _make_q4_matmul(False)
q4_1_matmul = _make_q4_matmul(True)


def matmul_small(x: np.ndarray, data: np.ndarray, kind: str) -> np.ndarray:
    if kind == "Q8_0":
        return q8_0_matmul(x, data, data.view(np.int8))
    return (q4_1_matmul if kind == "Q4_1" else q4_0_matmul)(x, data)


def matmul(x: np.ndarray, data: np.ndarray, kind: str) -> np.ndarray:
    """y = x @ Wᵀ: the row-parallel kernels for decoding, dequantized row tiles + BLAS for prefill."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[0] <= SMALL_BATCH:
        return matmul_small(x, data, kind)
    y = np.empty((x.shape[0], data.shape[0]), dtype=np.float32)          # (n, out)
    for start in range(0, data.shape[0], TILE_ROWS):
        stop = min(start + TILE_ROWS, data.shape[0])
        y[:, start:stop] = x @ dequantize_numpy(data[start:stop], kind).T
    return y
