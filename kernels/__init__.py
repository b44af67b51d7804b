"""Numba kernels, each with a plain-NumPy twin. They know nothing about Llama."""
from .dense import STORAGE_DTYPES, matmul, matmul_numpy, widen_numpy

__all__ = ["STORAGE_DTYPES", "matmul", "matmul_numpy", "widen_numpy"]
