"""The inner loop of the 4-bit decode kernel, written as LLVM vector IR.

    dot_codes[h](words, x, x_stride, rows, acc)
        acc[b, j] = Σ_r Σ_k code_k(words[r, j]) · x[b, 8r + k]      b < h, j < TILE_COLUMNS[h]

for a tile of output columns of a block (kernels/gptq.py): `rows` packed rows of words (8
codes each, LSB first; a block's rows are 64 words apart), and h rows of x (x_stride floats
apart). Sums are float32, one fused multiply-add per code and row, in the order r, then k:
the same operations for a row whatever h is, so a row's result never depends on the rows
beside it (the batching server's rule: a request's answer is the same alone or in a batch).

Why tiles of h rows: the codes are unpacked once (mask, convert) for all h rows, so a further
row costs one multiply-add per 8 codes. Why IR and not a Numba loop: Numba keeps the
accumulators in memory; here the h x VECTORS[h] accumulators stay in registers (at most 8 of
the 16 AVX2 registers). The IR is plain vector IR, which LLVM lowers to what the CPU has
(`llvm.fmuladd` fuses where it has FMA); PATH names what that is.

Vectors are LANES columns wide: 16 where the CPU has AVX-512 (512-bit registers), else 8.
Each column's sums are the same operations in the same order at either width, so both give
the same bits; `LLAMA_REF_LANES=8` chooses the narrow path on an AVX-512 CPU (tests compare
the two).
"""
import os

import numpy as np
from llvmlite import binding, ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

FEATURES = binding.get_host_cpu_features()
LANES_SET = os.environ.get("LLAMA_REF_LANES", "16" if FEATURES.get("avx512f") else "8")
if LANES_SET not in ("8", "16"):
    raise ValueError(f"LLAMA_REF_LANES={LANES_SET!r}: the decode kernel's vectors are 8 or 16 floats wide")
LANES = int(LANES_SET)
PATH = ("avx512" if LANES == 16 and FEATURES.get("avx512f") else
        "avx2+fma" if FEATURES.get("avx2") and FEATURES.get("fma") else "portable")

I32, F32 = ir.IntType(32), ir.FloatType()
VI32, VF32 = ir.VectorType(I32, LANES), ir.VectorType(F32, LANES)
CODES = 8                   # codes per word
BLOCK_COLUMNS = 64          # a block's row is 64 words (kernels/gptq.py COLUMN_BLOCK)
BLOCK_VECTORS = BLOCK_COLUMNS // LANES
# vectors per tile of 1, 2, 3, 4 rows: 4 to 8 sums in flight, and a tile within a block
VECTORS = (0, 8, 4, 2, 2) if LANES == 8 else (0, 4, 4, 2, 2)
TILE_COLUMNS = tuple(LANES * vectors for vectors in VECTORS)
TILE_ROWS = len(VECTORS) - 1
# code k of a word is multiplied in place (code · 2^4k), so its input comes times 2^-4k; the
# top code is shifted down instead
INPUT_SCALES = np.array([2.0 ** (-4 * k) for k in range(CODES - 1)] + [1.0], dtype=np.float32)


def _splat(builder, value):
    """<LANES x float> of one float."""
    vector = builder.insert_element(ir.Constant(VF32, ir.Undefined), value, ir.Constant(I32, 0))
    return builder.shuffle_vector(vector, ir.Constant(VF32, ir.Undefined), ir.Constant(VI32, [0] * LANES))


def make_dot_codes(height: int):
    """The intrinsic for a tile of `height` rows of x and VECTORS[height] vectors of columns."""
    vectors = VECTORS[height]

    @intrinsic
    def dot_codes(typingctx, words, x, x_stride, rows, acc):
        """Addresses (intp) of the tile's first word (uint32), of x[b0, 8 r0] (float32, input i
        times INPUT_SCALES[i mod 8]) and of acc[b0, c0] (float32, rows 64 apart); x_stride, rows: intp."""
        def codegen(context, builder, signature, args):
            words_at = builder.inttoptr(args[0], VI32.as_pointer())
            x_at = builder.inttoptr(args[1], F32.as_pointer())
            acc_at = builder.inttoptr(args[4], F32.as_pointer())
            intp = args[2].type
            fmuladd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(VF32, [VF32] * 3),
                                                     f"llvm.fmuladd.v{LANES}f32")
            # the accumulators live in allocas that LLVM promotes to registers for the loop
            sums = [[cgutils.alloca_once(builder, VF32) for _ in range(vectors)] for _ in range(height)]
            for slot in (slot for row in sums for slot in row):
                builder.store(ir.Constant(VF32, [0.0] * LANES), slot)
            with cgutils.for_range(builder, args[3]) as loop:
                row_words = builder.gep(words_at, [builder.mul(loop.index, ir.Constant(intp, BLOCK_VECTORS))])
                words = [builder.load(builder.gep(row_words, [ir.Constant(I32, c)]), align=4) for c in range(vectors)]
                first = builder.mul(loop.index, ir.Constant(intp, CODES))
                totals = [[builder.load(slot) for slot in row] for row in sums]
                for k in range(CODES):
                    # code k left in place is code · 2^4k, exact in float32: its input comes scaled
                    # by 2^-4k. The top code is shifted down instead (in place its sign bit is set).
                    if k < CODES - 1:
                        parts = [builder.and_(word, ir.Constant(VI32, [0xF << 4 * k] * LANES)) for word in words]
                    else:
                        parts = [builder.lshr(word, ir.Constant(VI32, [4 * k] * LANES)) for word in words]
                    codes = [builder.sitofp(part, VF32) for part in parts]
                    for b in range(height):
                        at = builder.add(builder.mul(args[2], ir.Constant(intp, b)), builder.add(first, ir.Constant(intp, k)))
                        value = _splat(builder, builder.load(builder.gep(x_at, [at]), align=4))
                        totals[b] = [builder.call(fmuladd, [code, value, total]) for code, total in zip(codes, totals[b])]
                for b in range(height):
                    for c in range(vectors):
                        builder.store(totals[b][c], sums[b][c])
            for b in range(height):
                for c in range(vectors):
                    target = builder.gep(acc_at, [ir.Constant(I32, b * BLOCK_COLUMNS + c * LANES)])
                    builder.store(builder.load(sums[b][c]), builder.bitcast(target, VF32.as_pointer()), align=4)
            return context.get_dummy_value()
        return types.void(types.intp, types.intp, types.intp, types.intp, types.intp), codegen

    return dot_codes


dot_codes_1, dot_codes_2, dot_codes_3, dot_codes_4 = (make_dot_codes(height) for height in range(1, TILE_ROWS + 1))
