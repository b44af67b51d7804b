"""Each Numba kernel against its NumPy twin, and when the kernels' thread settings apply."""
import os
import subprocess
import sys

import numpy as np
import pytest

from llama_ref.kernels import convert, dense

SHAPES = [(1, 1, 1), (1, 17, 33), (3, 129, 65), (8, 513, 257), (9, 300, 1), (37, 1000, 777), (1, 4097, 7)]


def random_weight(rng, shape, storage):
    w = rng.standard_normal(shape).astype(np.float32)
    if storage == "F16":
        return w.astype(np.float16).view(np.uint16)
    if storage == "BF16":
        return (w.view(np.uint32) >> 16).astype(np.uint16)
    return w


def test_f16_widening_is_exact_for_every_bit_pattern():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ours = convert_all(bits, "F16")
    expected = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(ours), nan)
    assert np.array_equal(ours[~nan].view(np.uint32), expected[~nan].view(np.uint32))


def test_bf16_widening_is_exact_for_every_bit_pattern():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ours = convert_all(bits, "BF16")
    assert np.array_equal(ours.view(np.uint32), bits.astype(np.uint32) << 16)
    # and the NumPy twin agrees with an independent float64 decoding of bf16 normals
    normal = (bits & 0x7F80 != 0) & (bits & 0x7F80 != 0x7F80)
    sign = np.where(bits & 0x8000, -1.0, 1.0)
    exponent = ((bits >> 7) & 0xFF).astype(np.int64) - 127
    mantissa = 1.0 + (bits & 0x7F) / 128.0
    assert np.array_equal(convert.bf16_to_f32_numpy(bits)[normal], (sign * mantissa * 2.0 ** exponent)[normal])


def convert_all(bits, storage):
    w = bits.reshape(1, -1)
    return dense._WIDEN_ROWS[storage](w, 0, 1)[0]


@pytest.mark.parametrize("storage", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("n, d_in, d_out", SHAPES)
@pytest.mark.parametrize("kernel", [dense.matmul_small, dense.matmul_tiled, dense.matmul])
def test_matmul_kernels_equal_a_float64_product(storage, n, d_in, d_out, kernel):
    """Against x @ Wᵀ in float64, W widened by the twin that the bit-pattern tests above check
    exhaustively (so the F32 BLAS path is compared with something other than itself)."""
    rng = np.random.default_rng(n * 1000 + d_in + d_out)
    x = rng.standard_normal((n, d_in)).astype(np.float32)
    w = random_weight(rng, (d_out, d_in), storage)
    ours = kernel(x, w, storage)
    expected = x.astype(np.float64) @ dense.widen_numpy(w, storage).astype(np.float64).T
    assert ours.shape == (n, d_out) and ours.dtype == np.float32
    scale = np.abs(expected).max()
    assert np.abs(ours - expected).max() <= 1e-5 * scale, f"max err {np.abs(ours - expected).max()}, scale {scale}"


def test_tiled_kernel_covers_a_partial_last_tile():
    rng = np.random.default_rng(0)
    d_out = dense.TILE_ROWS * 2 + 3
    x = rng.standard_normal((20, 64)).astype(np.float32)
    w = random_weight(rng, (d_out, 64), "F16")
    assert np.allclose(dense.matmul_tiled(x, w, "F16"), dense.matmul_numpy(x, w, "F16"), rtol=1e-5, atol=1e-5)


CACHE_KEY_PROBE = """
from llama_ref.kernels import dense, gptq
kernels = [*dense._MATMUL.values(), *dense._WIDEN_ROWS.values(), *(k for pair in gptq._KERNELS.values() for k in pair)]
for kernel in kernels:
    print(kernel._cache._index_key((), kernel.targetctx.codegen()))
"""


def test_every_process_finds_the_kernels_under_the_same_cache_key():
    """Numba's disk cache keys each kernel made by a factory on its closure's variables as
    pickled: a variable that pickles differently in each process (a compiled function does)
    makes every process compile the kernels again, seconds before its first token."""
    keys = [subprocess.run([sys.executable, "-c", CACHE_KEY_PROBE], capture_output=True, text=True, timeout=300,
                           check=True).stdout for _ in range(2)]
    assert keys[0].count("\n") == 13 and keys[0] == keys[1]


SPIN_PROBE = """
import os, sys
import llama_ref
print(os.environ.get("GOMP_SPINCOUNT"))
llama_ref.load_model(sys.argv[1])
print(os.environ.get("GOMP_SPINCOUNT"))
"""


@pytest.mark.parametrize("preset, expected", [(None, ["None", "30000"]), ("777", ["777", "777"])])
def test_thread_settings_are_applied_by_load_model_not_by_import(checkpoint, preset, expected):
    env = {key: value for key, value in os.environ.items() if key != "GOMP_SPINCOUNT"}
    if preset is not None:
        env["GOMP_SPINCOUNT"] = preset      # a value the user set wins
    out = subprocess.run([sys.executable, "-c", SPIN_PROBE, str(checkpoint("mha"))], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == expected


@pytest.mark.parametrize("heads, kv_heads, lengths", [(9, 3, (1,)), (9, 3, (300, 1, 17)), (8, 8, (17,)),
                                                       (40, 40, (64, 5))])
def test_decode_attention_stores_each_row_and_equals_a_float64_softmax_alone_or_together(heads, kv_heads, lengths):
    """Several sequences in one call, each with a cache of its own holding more positions than
    are read (layer 1 of 2), grouped heads included: each row's key and value land at its
    position, its output equals the float64 twin, and bit for bit what it gets alone."""
    from llama_ref.kernels.attention import decode_attention, decode_attention_numpy
    rng = np.random.default_rng(sum(lengths))
    n, d, scale = len(lengths), 64, np.float32(1 / np.sqrt(64))
    keys = [rng.standard_normal((2, kv_heads, length + 5, d)).astype(np.float32) * 2 for length in lengths]
    values = [rng.standard_normal((2, kv_heads, length + 5, d)).astype(np.float32) * 2 for length in lengths]
    q = rng.standard_normal((n, heads, d)).astype(np.float32) * 2
    k_new, v_new = rng.standard_normal((2, n, kv_heads, d)).astype(np.float32)
    positions, capacities = np.array(lengths) - 1, np.array(lengths) + 5
    addresses = [np.array([a.ctypes.data for a in arrays], dtype=np.intp) for arrays in (keys, values)]
    ours = decode_attention(q, k_new, v_new, *addresses, capacities, 1, positions, scale)
    for s, length in enumerate(lengths):
        np.testing.assert_array_equal(keys[s][1, :, length - 1], k_new[s])
        np.testing.assert_array_equal(values[s][1, :, length - 1], v_new[s])
        expected = decode_attention_numpy(q[s], keys[s][1], values[s][1], length, scale)
        np.testing.assert_allclose(ours[s], expected, rtol=1e-5, atol=1e-5)
        alone = decode_attention(q[s:s + 1], k_new[s:s + 1], v_new[s:s + 1], addresses[0][s:s + 1],
                                 addresses[1][s:s + 1], capacities[s:s + 1], 1, positions[s:s + 1], scale)
        np.testing.assert_array_equal(alone[0], ours[s])


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_row_kernels_equal_their_numpy_equations_and_each_row_its_own(rows):
    """RMSNorm within float32 rounding of nn/ops.rms_norm (a sum in order, not pairwise); the
    rotation bit for bit nn/rope.apply_rope, also on the strided q of a fused projection; and
    row 0 of a call the same as row 0 alone."""
    from llama_ref.kernels.rows import rms_norm_rows, rope_rows
    from llama_ref.nn.ops import rms_norm
    from llama_ref.nn.rope import apply_rope, rope_cos_sin
    rng = np.random.default_rng(rows)
    x = (rng.standard_normal((rows, 576)) * 3).astype(np.float32)
    weight = rng.standard_normal(576).astype(np.float32)
    ours = rms_norm_rows(x, weight, np.float32(1e-5))
    np.testing.assert_allclose(ours, rms_norm(x, weight, 1e-5), rtol=2e-6, atol=1e-7)
    np.testing.assert_array_equal(ours[:1], rms_norm_rows(x[:1], weight, np.float32(1e-5)))
    fused = rng.standard_normal((rows, 15 * 64)).astype(np.float32)               # q | k | v, 9 + 3 + 3 heads
    q = fused[:, :9 * 64].reshape(rows, 9, 64)                                    # a strided view, as in the model
    cos, sin = rope_cos_sin(np.arange(100, 100 + rows), 1 / 10000 ** (np.arange(0, 64, 2, dtype=np.float32) / 64))
    np.testing.assert_array_equal(rope_rows(q, cos, sin), apply_rope(q, cos, sin))
    np.testing.assert_array_equal(rope_rows(q, cos, sin)[:1], rope_rows(q[:1], cos[:1], sin[:1]))
