"""Exact widening of 16-bit floats to float32, inside Numba kernels and in NumPy.

Numba has no CPU float16 type, so fp16 and bf16 weights reach the kernels as their raw
16-bit patterns (uint16 arrays). `f16_to_f32` emits LLVM's `fpext half -> float`, which
compiles to the CPU's conversion instruction (F16C) and is exact for every one of the
65536 patterns, subnormals, infinities and NaNs included. bf16 is the top half of a
float32, so widening it is a 16-bit shift. Each has a NumPy twin that the tests compare
against.

The kernels widen through `widen(storage, value)`, with the storage's name ("F16", "BF16",
"F32") a constant of the kernel's closure. Why a name and not the function itself: Numba's
disk cache keys a closure on its variables as pickled, and a compiled function pickles with
an id new in every process, so each process compiled the kernels again (4-5 s before the
first token of every `generate`, server and test subprocess).
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload


@intrinsic
def f16_to_f32(typingctx, bits):
    """fp16 bit pattern (uint16) -> float32, exactly."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def bf16_to_f32(typingctx, bits):
    """bf16 bit pattern (uint16) -> float32, exactly: the pattern becomes the high 16 bits."""
    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())
    return types.float32(types.uint16), codegen


def widen(storage, value):
    """value (a stored weight) as float32, read as `storage` says; inside kernels only."""


@overload(widen)
def _widen(storage, value):
    if not isinstance(storage, types.StringLiteral):
        raise TypingError(f"widen: the storage must be a constant name, got {storage}")
    if storage.literal_value == "F16":
        return lambda storage, value: f16_to_f32(value)
    if storage.literal_value == "BF16":
        return lambda storage, value: bf16_to_f32(value)
    if storage.literal_value == "F32":
        return lambda storage, value: np.float32(value)
    raise TypingError(f"widen: storage {storage.literal_value!r} is none of F16, BF16, F32")


def f16_to_f32_numpy(bits: np.ndarray) -> np.ndarray:
    return bits.view(np.float16).astype(np.float32)


def bf16_to_f32_numpy(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_f32_numpy(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)
