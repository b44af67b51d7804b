"""The inner loop of GPTQ (Frantar et al. 2022, Algorithm 1): quantize columns one at a time
and push each column's rounding error onto the columns after it, inside one lazy block.

    w      (out, in) float32   the weights in processing order, updated in place
    u      (in, in) float32    upper Cholesky factor of H⁻¹
    scale, zero (out,)         the grid of the group the columns belong to
    codes  (out, in) uint8     written for columns first..last-1
    errors (out, block) float32  (w - ŵ) / u[j, j] of each column, for the lazy update after the block

Every output row is its own least-squares problem sharing H, so the Numba kernel runs rows in
parallel and each row's working set is one block of 128 floats. Rounding is half to even
(np.rint), as torch.round in the reference implementations.
"""
import numpy as np
from numba import njit, prange

MAX_CODE = 15


@njit(parallel=True, cache=True)
def gptq_columns(w, u, first, last, block_start, block_end, scale, zero, codes, errors):
    low, high = np.float32(0), np.float32(MAX_CODE)    # float32 constants keep the arithmetic float32
    for o in prange(w.shape[0]):
        s, z = scale[o], zero[o]
        for j in range(first, last):
            q = min(max(np.rint(w[o, j] / s) + z, low), high)
            codes[o, j] = np.uint8(q)
            error = (w[o, j] - s * (q - z)) / u[j, j]
            errors[o, j - block_start] = error
            for k in range(j + 1, block_end):
                w[o, k] -= error * u[j, k]


def gptq_columns_numpy(w, u, first, last, block_start, block_end, scale, zero, codes, errors):
    """The twin of gptq_columns, one column at a time over all rows (all arrays float32)."""
    for j in range(first, last):
        q = np.clip(np.rint(w[:, j] / scale) + zero, np.float32(0), np.float32(MAX_CODE))
        codes[:, j] = q
        error = (w[:, j] - scale * (q - zero)) / u[j, j]
        errors[:, j - block_start] = error
        w[:, j + 1:block_end] -= np.outer(error, u[j, j + 1:block_end])
