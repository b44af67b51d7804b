"""Dense matrix products with fp32, fp16 or bf16 weights widened to float32 on the fly.

Contract of every kernel here:
    x (n, in) float32  @  W (out, in)  ->  y (n, out) float32
W is the stored nn.Linear weight, row o = output feature o, C-contiguous. fp32 weights are
float32 arrays; fp16 and bf16 weights are their raw bit patterns in uint16 arrays
(see convert.py). Every product is widened-weight times float32 activation, summed in
float32. The Numba kernels run in parallel over output rows, so each weight row is read
once per call whatever n is; that makes batch-1 decoding bound by memory bandwidth, which
is the physical limit for it.

For large n (prefill) the weight is widened in tiles of rows and multiplied with BLAS,
which reuses each widened tile across all n rows; the float32 tile is the only copy.

Each kernel has a NumPy twin (`*_numpy`) that the tests compare against.
"""
import numpy as np
from numba import njit, prange

from .convert import bf16_to_f32_numpy, f16_to_f32_numpy, f32_to_f32_numpy, widen

# reassoc lets LLVM vectorise the dot-product reduction; no flag that changes inf/nan handling.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
# Up to this many rows of x the row-parallel kernel wins; above it, widened tiles + BLAS
# (measured on 2 cores with BLAS single-threaded, 5632 x 2048 fp16: equal near n = 64).
SMALL_BATCH = 32
# Rows of W widened per BLAS call: about 8 MB of float32 for a 4096-wide layer.
TILE_ROWS = 512


def _make_matmul(storage):
    @njit(parallel=True, fastmath=FASTMATH, cache=True)
    def matmul(x, w):
        n, d_in = x.shape
        d_out = w.shape[0]
        y = np.empty((n, d_out), dtype=np.float32)  # (n, out)
        for o in prange(d_out):
            for b in range(n):
                acc = np.float32(0.0)
                for i in range(d_in):
                    acc += widen(storage, w[o, i]) * x[b, i]
                y[b, o] = acc
        return y
    return matmul


def _make_widen_rows(storage):
    @njit(parallel=True, cache=True)
    def widen_rows(w, start, stop):
        d_in = w.shape[1]
        tile = np.empty((stop - start, d_in), dtype=np.float32)  # (rows, in)
        for r in prange(stop - start):
            for i in range(d_in):
                tile[r, i] = widen(storage, w[start + r, i])
        return tile
    return widen_rows


_MATMUL = {storage: _make_matmul(storage) for storage in ("F32", "F16", "BF16")}
_WIDEN_ROWS = {storage: _make_widen_rows(storage) for storage in ("F16", "BF16")}
_WIDEN_NUMPY = {"F32": f32_to_f32_numpy, "F16": f16_to_f32_numpy, "BF16": bf16_to_f32_numpy}


def matmul_small(x: np.ndarray, w: np.ndarray, storage: str) -> np.ndarray:
    """Row-parallel Numba kernel; best for decoding (n = 1) and small batches."""
    return _MATMUL[storage](x, w)


def matmul_tiled(x: np.ndarray, w: np.ndarray, storage: str) -> np.ndarray:
    """Widen TILE_ROWS rows of W at a time and multiply with BLAS; best for prefill."""
    if storage == "F32":
        return x @ w.T
    y = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)  # (n, out)
    for start in range(0, w.shape[0], TILE_ROWS):
        stop = min(start + TILE_ROWS, w.shape[0])
        y[:, start:stop] = x @ _WIDEN_ROWS[storage](w, start, stop).T
    return y


def matmul(x: np.ndarray, w: np.ndarray, storage: str) -> np.ndarray:
    """y = x @ widen(W)ᵀ, choosing the kernel by batch size."""
    if x.shape[0] <= SMALL_BATCH:
        return matmul_small(x, w, storage)
    return matmul_tiled(x, w, storage)


def widen_numpy(w: np.ndarray, storage: str) -> np.ndarray:
    """Stored weight -> float32 array, in plain NumPy."""
    return _WIDEN_NUMPY[storage](w)


def matmul_numpy(x: np.ndarray, w: np.ndarray, storage: str) -> np.ndarray:
    """The NumPy twin of every kernel above."""
    return x.astype(np.float32) @ widen_numpy(w, storage).T
