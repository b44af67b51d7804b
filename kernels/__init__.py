"""Numba kernels, each with a plain-NumPy twin. They know nothing about Llama."""
import os

# Numba's OpenMP workers spin after each parallel loop (GNU's default: 300,000 rounds) before
# they sleep. Prefill alternates a parallel tile loop with BLAS, whose own threads then share
# the cores with the spinning ones: 5120 x 13824 x 128 rows took 440-480 ms, 270-290 ms with
# 30,000 rounds, which still spans the gap between one decoding kernel and the next.
# libgomp reads this when Numba first starts its threads (its first parallel loop, or
# numba.set_num_threads), so llama_ref must be imported before that; a value set by the user wins.
os.environ.setdefault("GOMP_SPINCOUNT", "30000")

from .dense import STORAGE_DTYPES, matmul, matmul_numpy, widen_numpy  # noqa: E402

__all__ = ["STORAGE_DTYPES", "matmul", "matmul_numpy", "widen_numpy"]
