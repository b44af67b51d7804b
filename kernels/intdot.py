"""The integer inner loop of the 4-bit decode kernel, written as LLVM vector IR.

    dot_codes(words, xpairs, rows, acc)     acc[t, j] = Σ_r Σ_k code_k(words[r, j]) · xq_t[8r + k]

for one block of 64 output columns (kernels/gptq.py): `rows` packed rows of 64 uint32
words (8 codes each, LSB first), and for each row and each term t its 8 int16
activations as 4 uint32 pairs (xq_t[8r+k] in the low half, xq_t[8r+k+4] in the high half,
k = 0..3). Products and sums are exact int32 arithmetic; the caller keeps a run short
enough not to overflow.

Why IR and not a Numba loop: one AVX2 `vpmaddwd` multiplies 16 int16 pairs and adds each
pair, so masking a word vector with 0x000F000F (after shifting by 4k) puts codes k and k+4
of 8 words side by side as int16 and one instruction takes both products. That is 4
multiply-adds per 64 codes instead of the float path's 8 conversions and 8 FMAs, and the
loop then streams at memory speed. LLVM only emits it from its x86 intrinsic; on a CPU
without AVX2 the same sums come from plain vector IR (sign-extend, multiply, add), so the
integer results are identical everywhere.
"""
from llvmlite import binding, ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

I16, I32 = ir.IntType(16), ir.IntType(32)
V8I32, V16I16 = ir.VectorType(I32, 8), ir.VectorType(I16, 16)
VECTORS = 8                 # 8 vectors of 8 words: the kernel's 64-column block
HOST_AVX2 = binding.get_host_cpu_features().get("avx2", False)


def _splat(builder, value):
    """<8 x i32> of one i32."""
    vector = builder.insert_element(ir.Constant(V8I32, ir.Undefined), value, ir.Constant(I32, 0))
    return builder.shuffle_vector(vector, ir.Constant(V8I32, ir.Undefined), ir.Constant(V8I32, [0] * 8))


def _pmaddwd_avx2(builder, a, b):
    function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(V8I32, [V16I16, V16I16]),
                                              "llvm.x86.avx2.pmadd.wd")
    return builder.call(function, [a, b])


def _pmaddwd_generic(builder, a, b):
    """a[2i]·b[2i] + a[2i+1]·b[2i+1] in int32, as vpmaddwd computes it."""
    def lanes(vector, first):
        picked = builder.shuffle_vector(vector, vector, ir.Constant(V8I32, list(range(first, 16, 2))))
        return builder.sext(picked, V8I32)
    return builder.add(builder.mul(lanes(a, 0), lanes(b, 0)), builder.mul(lanes(a, 1), lanes(b, 1)))


def make_dot_codes(native: bool, terms: int):
    """The intrinsic, with vpmaddwd (native) or its portable equivalent, for `terms` int16
    activation vectors multiplied with the same codes."""
    pmaddwd = _pmaddwd_avx2 if native else _pmaddwd_generic

    @intrinsic
    def dot_codes(typingctx, words, xpairs, rows, acc):
        """Addresses (intp) of words[0, 0] (rows, 64) uint32, xpairs[0, 0, 0] (rows, terms, 4)
        uint32 and acc[0, 0] (terms, 64) int32; rows: intp."""
        def codegen(context, builder, signature, args):
            words_at = builder.inttoptr(args[0], V8I32.as_pointer())
            pairs_at = builder.inttoptr(args[1], I32.as_pointer())
            acc_at = builder.inttoptr(args[3], V8I32.as_pointer())
            # the accumulators live in allocas that LLVM promotes to registers for the loop
            sums = [[cgutils.alloca_once(builder, V8I32) for _ in range(VECTORS)] for _ in range(terms)]
            for t in range(terms):
                for slot in sums[t]:
                    builder.store(ir.Constant(V8I32, [0] * 8), slot)
            mask = ir.Constant(V8I32, [0x000F000F] * 8)
            with cgutils.for_range(builder, args[2]) as loop:
                row_words = builder.gep(words_at, [builder.mul(loop.index, ir.Constant(loop.index.type, VECTORS))])
                row_pairs = builder.gep(pairs_at, [builder.mul(loop.index, ir.Constant(loop.index.type, 4 * terms))])
                pairs = [[builder.bitcast(_splat(builder, builder.load(
                    builder.gep(row_pairs, [ir.Constant(I32, 4 * t + k)]), align=4)), V16I16) for k in range(4)]
                    for t in range(terms)]
                for c in range(VECTORS):
                    word = builder.load(builder.gep(row_words, [ir.Constant(I32, c)]), align=4)
                    totals = [builder.load(sums[t][c]) for t in range(terms)]
                    for k in range(4):
                        shifted = builder.lshr(word, ir.Constant(V8I32, [4 * k] * 8)) if k else word
                        codes = builder.bitcast(builder.and_(shifted, mask), V16I16)   # codes k and k+4
                        totals = [builder.add(totals[t], pmaddwd(builder, codes, pairs[t][k])) for t in range(terms)]
                    for t in range(terms):
                        builder.store(totals[t], sums[t][c])
            for t in range(terms):
                for c, slot in enumerate(sums[t]):
                    builder.store(builder.load(slot), builder.gep(acc_at, [ir.Constant(I32, t * VECTORS + c)]), align=4)
            return context.get_dummy_value()
        return types.void(types.intp, types.intp, types.intp, types.intp), codegen

    return dot_codes



TERMS = 2                   # int16 vectors per activation (kernels/gptq.py: quantize_activations)
dot_codes = make_dot_codes(HOST_AVX2, TERMS)
