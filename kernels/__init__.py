"""Numba kernels, each with a plain-NumPy twin. They know nothing about Llama."""
import os

from .dense import SMALL_BATCH, matmul, matmul_numpy, widen_numpy

__all__ = ["SMALL_BATCH", "configure_threads", "matmul", "matmul_numpy", "widen_numpy"]

# Numba's OpenMP workers spin after each parallel loop (GNU's default: 300,000 rounds) before
# they sleep. A dense model's prefill alternates a parallel tile loop with BLAS, whose own
# threads then share the cores with the spinning ones: 5120 x 13824 x 128 rows took 440-480
# ms, 270-290 ms with 30,000 rounds, which still spans the gap between one decoding kernel and
# the next.
SPIN_COUNT = 30000


def configure_threads(threads: int | None = None) -> None:
    """The kernels' thread settings, applied once before the first kernel runs (load_model
    calls it): OpenMP's spin count (a value the user set wins; libgomp reads it when Numba
    first starts its threads, so later calls cannot change it) and, when given, the number of
    threads Numba runs on."""
    os.environ.setdefault("GOMP_SPINCOUNT", str(SPIN_COUNT))
    if threads is not None:
        import numba
        numba.set_num_threads(threads)
