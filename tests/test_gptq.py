"""GPTQ: our NumPy dequantization against two peer decoders (gptqmodel 7.7.0's TorchLinear and
AutoGPTQ 0.7.1's qlinear_cuda torch path), the Numba kernels against the dequantized
product, and whole checkpoints of every variant against transformers on the same weights."""
import importlib.util
import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")

import llama_ref  # noqa: E402
from llama_ref.errors import CheckpointError, ConfigError  # noqa: E402
from llama_ref.formats.gptq import GPTQConfig, prepare_layer  # noqa: E402
from llama_ref.kernels.floatdot import INPUT_SCALES, LANES, PATH, TILE_COLUMNS, make_dot_codes  # noqa: E402
from llama_ref.kernels.gptq import (ROW_CHUNK, block_columns, block_groups, dequantize_numpy, gptq_matmul,  # noqa: E402
                                    pack_columns, pack_rows, unblock_columns, unblock_groups,
                                    unpack_columns, unpack_rows)
from llama_ref.nn.linear import GPTQLinear, fuse, project  # noqa: E402
from llama_ref.formats.safetensors import StoredTensor  # noqa: E402
from conftest import _fetch, load_reference, make_checkpoint, relative_error  # noqa: E402


def random_pack(rng, d_in, d_out, group_size, sym=True, version=1, act_order=False, nibble_f=False):
    """A packed GPTQ layer from random codes, made with plain NumPy. Returns the checkpoint
    tensors and the true zero points (groups, out)."""
    groups = 1 if group_size == -1 else math.ceil(d_in / group_size)
    size = d_in if group_size == -1 else group_size
    g_idx = np.arange(d_in) // size
    if act_order:
        g_idx = g_idx[rng.permutation(d_in)]
    codes = rng.integers(0, 16, size=(d_in, d_out))
    if sym:
        zeros = np.full((groups, d_out), 8)
    else:   # v1 cannot store a zero point of 0 (it becomes nibble 0xF); nibble_f puts some in
        zeros = rng.integers(1 if version == 1 else 0, 16, size=(groups, d_out))
        if nibble_f:
            zeros[rng.random(zeros.shape) < 0.05] = 0
    stored = (zeros - 1) & 0xF if version == 1 else zeros
    scales = (rng.random((groups, d_out)) * 0.02 + 0.001).astype(np.float16)
    tensors = {"qweight": pack_rows(codes), "qzeros": pack_columns(stored), "scales": scales,
               "g_idx": g_idx.astype(np.int32)}
    return tensors, zeros


def stored(name, array):
    dtype = {np.int32: "I32", np.float16: "F16", np.float32: "F32"}[array.dtype.type]
    return StoredTensor(name, dtype, array.view(np.uint16) if dtype == "F16" else array)


def packed_linear(tensors, group_size, version=1, with_g_idx=True):
    config = GPTQConfig(group_size=group_size, version=version)
    layer = prepare_layer("layer", stored("qweight", tensors["qweight"]), stored("qzeros", tensors["qzeros"]),
                          stored("scales", tensors["scales"]),
                          stored("g_idx", tensors["g_idx"]) if with_g_idx else None, config)
    return GPTQLinear("layer", layer)


# variant: (d_in, d_out, group_size, sym, version, act_order)
VARIANTS = {
    "sym v1 g128": (512, 96, 128, True, 1, False),
    "asym v1 g128": (512, 96, 128, False, 1, False),
    "asym v2 g64": (512, 96, 64, False, 2, False),
    "sym v2 g32 act-order": (256, 64, 32, True, 2, True),
    "asym v1 g128 act-order": (512, 96, 128, False, 1, True),
    "sym v1 one group": (384, 64, -1, True, 1, False),
    "asym v1 partial last group": (576, 64, 128, False, 1, False),
    "asym v1 partial last group act-order": (576, 64, 128, False, 1, True),
}


def test_pack_and_unpack_are_inverse():
    rng = np.random.default_rng(0)
    words = rng.integers(-2**31, 2**31, size=(16, 24), dtype=np.int64).astype(np.int32)
    assert np.array_equal(pack_rows(unpack_rows(words)), words)
    assert np.array_equal(pack_columns(unpack_columns(words)), words)
    for out in (24, 64, 130):
        wide = rng.integers(0, 2**32, size=(16, out), dtype=np.uint32)
        blocks = block_columns(wide)
        assert blocks.shape == (-(-out // 64), 16, 64) and np.array_equal(unblock_columns(blocks, out), wide)
        assert np.array_equal(blocks[1 if out > 64 else 0, 3, 5], wide[3, 64 + 5 if out > 64 else 5])
        grouped = block_groups(wide[:3], len(blocks))
        assert grouped.shape == (len(blocks), 3, 64) and np.array_equal(unblock_groups(grouped, out), wide[:3])
    # LSB first: word r of qweight holds rows 8r .. 8r+7, the code of row 8r in the lowest nibble.
    codes = np.zeros((8, 1), dtype=np.uint8)
    codes[0, 0], codes[7, 0] = 0x3, 0xA
    assert pack_rows(codes)[0, 0].view(np.uint32) == 0xA0000003


def gptqmodel_dequantize(tensors, d_in, d_out, group_size, sym, version, act_order):
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module
    layer = TorchLinear(bits=4, group_size=group_size, sym=sym, desc_act=act_order, in_features=d_in,
                        out_features=d_out, bias=False)
    for name in ["qweight", "qzeros", "g_idx"]:
        getattr(layer, name).data = torch.from_numpy(tensors[name].copy())
    layer.scales.data = torch.from_numpy(tensors["scales"].copy())
    if version == 1:
        convert_gptq_v1_to_v2_format_module(layer, bits=4, pack_dtype=torch.int32)
    layer.post_init()
    return layer.dequantize_weight().numpy()     # (in, out) float16


@pytest.mark.parametrize("variant", VARIANTS)
def test_dequantization_equals_gptqmodel_bit_exactly(variant):
    d_in, d_out, group_size, sym, version, act_order = VARIANTS[variant]
    tensors, zeros = random_pack(np.random.default_rng(1), d_in, d_out, group_size, sym, version, act_order)
    ours = dequantize_numpy(tensors["qweight"], zeros, tensors["scales"], tensors["g_idx"]).astype(np.float16)
    theirs = gptqmodel_dequantize(tensors, d_in, d_out, group_size, sym, version, act_order)
    assert np.array_equal(ours.view(np.uint16), theirs.view(np.uint16))


@pytest.fixture(scope="module")
def autogptq_quant_linear():
    """AutoGPTQ 0.7.1's qlinear_cuda.py alone (its torch path needs only torch and numpy)."""
    path = _fetch("auto-gptq==0.7.1", ["auto_gptq/nn_modules/qlinear/qlinear_cuda.py"])[
        "auto_gptq/nn_modules/qlinear/qlinear_cuda.py"]
    spec = importlib.util.spec_from_file_location("autogptq_qlinear_cuda", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.QuantLinear


def autogptq_weight(quant_linear, tensors, d_in, d_out, group_size):
    layer = quant_linear(4, group_size, d_in, d_out, bias=False, weight_dtype=torch.float32)
    layer.qweight, layer.qzeros = torch.from_numpy(tensors["qweight"]), torch.from_numpy(tensors["qzeros"])
    layer.scales = torch.from_numpy(tensors["scales"].astype(np.float32))
    layer.g_idx = torch.from_numpy(tensors["g_idx"])
    with torch.no_grad():
        return layer(torch.eye(d_in, dtype=torch.float32)).numpy()   # rows of the identity: W itself


@pytest.mark.parametrize("variant", [v for v in VARIANTS if VARIANTS[v][4] == 1])
def test_dequantization_equals_autogptq_qlinear_cuda(variant, autogptq_quant_linear):
    d_in, d_out, group_size, sym, version, act_order = VARIANTS[variant]
    tensors, zeros = random_pack(np.random.default_rng(2), d_in, d_out, group_size, sym, version, act_order)
    ours = dequantize_numpy(tensors["qweight"], zeros, tensors["scales"], tensors["g_idx"])
    assert np.array_equal(ours, autogptq_weight(autogptq_quant_linear, tensors, d_in, d_out, group_size))


def test_legacy_layout_without_g_idx_and_with_fp32_scales_equals_autogptq(autogptq_quant_linear):
    """GPTQ-for-LLaMa 2023: no g_idx (so rows belong to i // group_size), scales in float32."""
    tensors, zeros = random_pack(np.random.default_rng(9), 512, 64, 128, sym=False)
    tensors["scales"] = tensors["scales"].astype(np.float32) * np.float32(1.0001)   # not fp16-representable
    layer = packed_linear(tensors, 128, with_g_idx=False).layer     # the zero points and scales as we load them
    expected = autogptq_weight(autogptq_quant_linear, tensors, 512, 64, 128)   # given g_idx = i // 128
    assert layer.scale_storage == "F32" and np.array_equal(unblock_groups(layer.scales, 64), tensors["scales"])  # kept as they are
    assert np.array_equal(unblock_groups(layer.zeros, 64), zeros)
    assert np.array_equal(dequantize_numpy(tensors["qweight"], zeros, unblock_groups(layer.scales, 64),
                                           np.arange(512) // 128),
                          expected)


def test_v1_nibble_f_reads_as_zero_16_like_qlinear_cuda_and_warns(autogptq_quant_linear):
    tensors, zeros = random_pack(np.random.default_rng(3), 256, 64, 128, sym=False, version=1, nibble_f=True)
    with pytest.warns(UserWarning, match="v1 zero point nibble 0xF"):
        layer = packed_linear(tensors, 128)
    expected = autogptq_weight(autogptq_quant_linear, tensors, 256, 64, 128)
    read_as = unpack_columns(tensors["qzeros"]) + 1                         # nibble + 1, no wrap
    np.testing.assert_array_equal(unblock_groups(layer.layer.zeros, 64), read_as)
    assert (read_as == 16).any()
    x = np.eye(256, dtype=np.float32)
    assert relative_error(layer(x), expected) <= 1e-6


def check_product(ours, x, w, what):
    expected = x.astype(np.float64) @ w.astype(np.float64)
    error = relative_error(ours, expected)
    sqnr = 10 * np.log10(np.sum(expected ** 2) / max(np.sum((ours - expected) ** 2), 1e-300))
    assert error <= 1e-4, f"{what}: max relative error {error:.2e}, SQNR {sqnr:.1f} dB"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n", [1, 3, 32, 33, 70])
def test_kernels_equal_x_times_the_dequantized_weight(variant, n):
    d_in, d_out, group_size, sym, version, act_order = VARIANTS[variant]
    rng = np.random.default_rng(4)
    tensors, zeros = random_pack(rng, d_in, d_out + 24 if d_out > 64 else d_out, group_size, sym, version,
                                 act_order)
    w = dequantize_numpy(tensors["qweight"], zeros, tensors["scales"], tensors["g_idx"])
    layer = packed_linear(tensors, group_size, version)
    x = rng.standard_normal((n, d_in)).astype(np.float32)
    check_product(layer(x), x, w, f"{variant}, n={n}")
    assert np.array_equal(layer.dequantize(), w.T)        # what the quantizer reads back from a GPTQ layer
    xp = x if layer.layer.permutation is None else x[:, layer.layer.permutation]
    packed = layer.layer
    args = (packed.blocks, packed.scales, packed.zeros, packed.group_starts, packed.scale_storage)
    out = w.shape[1]
    product = gptq_matmul(np.ascontiguousarray(xp), *args)
    assert relative_error(product[:, :out], x.astype(np.float64) @ w) <= 1e-6   # float32 sums, no int8 activations


@pytest.mark.parametrize("with_min", [False, True], ids=["zero points", "mins"])
def test_a_row_decodes_the_same_whatever_rows_share_the_call(with_min):
    """kernels/floatdot.py tiles rows by 4, 3, 2 and 1, and the kernel takes rows ROW_CHUNK at
    a time: row b of an n-row call equals row b decoded alone, bit for bit, for a few rows and
    for a prompt's worth (the batching server's determinism rests on it), and both are
    float32-accurate. Groups of 32 and 128, an empty group, and an all-zero row."""
    rng = np.random.default_rng(8)
    d_in, d_out = 512, 192
    group_starts = np.array([0, 32, 32, 160, 288, 416, 512])
    groups = len(group_starts) - 1
    codes = rng.integers(0, 16, (d_in, d_out))
    g_idx = np.repeat(np.arange(groups), np.diff(group_starts))
    scales = (rng.random((groups, d_out)) * 0.02 + 0.001).astype(np.float16)
    if with_min:
        offsets = (rng.standard_normal((groups, d_out)) * 0.02).astype(np.float16)
        w = scales[g_idx].astype(np.float64) * codes + offsets[g_idx].astype(np.float64)
        stored = block_groups(offsets.view(np.uint16), 3)
    else:
        offsets = rng.integers(0, 17, (groups, d_out)).astype(np.uint8)
        w = scales[g_idx].astype(np.float64) * (codes - offsets[g_idx].astype(np.float64))
        stored = block_groups(offsets, 3)
    args = (block_columns(pack_rows(codes).view(np.uint32)), block_groups(scales.view(np.uint16), 3), stored,
            group_starts, "F16", with_min)
    x = rng.standard_normal((2 * ROW_CHUNK + 22, d_in)).astype(np.float32)
    x[5] = 0
    together = gptq_matmul(x, *args)
    assert relative_error(together[:, :d_out], x.astype(np.float64) @ w) <= 1e-6
    assert not together[5].any()
    for n in range(1, 12):
        part = gptq_matmul(x[:n], *args)
        for b in range(n):
            assert np.array_equal(part[b], together[b]), f"row {b} of {n}"
    for b in (ROW_CHUNK - 1, ROW_CHUNK, 2 * ROW_CHUNK + 1, len(x) - 1):
        assert np.array_equal(gptq_matmul(x[b:b + 1], *args)[0], together[b]), f"row {b} of {len(x)}"


@pytest.mark.parametrize("path", [PATH])
def test_decode_kernel_compiles_to_the_instructions_of_its_path(path):
    """The test's id names the path this CPU takes. avx2+fma: 256-bit fused multiply-adds and
    conversions; portable: no fused multiply-add. Each row's product comes from the same
    instructions as the sums checked above."""
    from numba import njit
    dot_codes = make_dot_codes(4)

    @njit
    def kernel(words, x, acc):
        dot_codes(words.ctypes.data, x.ctypes.data, x.shape[1], words.shape[0], acc.ctypes.data)

    words = np.random.default_rng(9).integers(0, 2**32, (16, 64), dtype=np.uint32)
    rows = np.arange(1, 5, dtype=np.float32)[:, None]
    x = rows * np.tile(INPUT_SCALES, 16)                  # inputs 1, 2, 3, 4, scaled as the kernel takes them
    acc = np.zeros((4, 64), np.float32)
    kernel(words, x, acc)
    expected = rows * unpack_rows(words).sum(axis=0)      # (4, 64): small integers, exact in float32
    tile = TILE_COLUMNS[4]                                # the columns of a tile of 4 rows
    assert np.array_equal(acc[:, :tile], expected[:, :tile]) and not acc[:, tile:].any()
    assembly = next(iter(kernel.inspect_asm().values()))
    if path == "portable":
        assert "vfmadd" not in assembly
    else:
        register = "%zmm" if path == "avx512" else "%ymm"
        assert f"vfmadd231ps\t{register}" in assembly and f"vcvtdq2ps\t{register}" in assembly


LANES_PROBE = """
import sys
import numpy as np
from llama_ref.kernels.gptq import gptq_matmul
given = np.load(sys.argv[1])
np.save(sys.argv[2], gptq_matmul(given["x"], given["blocks"], given["scales"], given["zeros"], given["starts"], "F16"))
"""


@pytest.mark.parametrize("lanes", [16 if LANES == 8 else 8])
def test_the_other_vector_width_gives_the_bits_of_this_cpus_path(lanes, tmp_path):
    """The 8- and 16-lane kernels (LLAMA_REF_LANES) do the same operations for each column,
    so the width this CPU does not take gives what its path gives, bit for bit, on 1 to 70
    rows. Both widths run on every machine: LLVM splits a vector wider than the registers."""
    rng = np.random.default_rng(11)
    codes, group_starts = rng.integers(0, 16, (512, 192)), np.array([0, 128, 256, 384, 512])
    scales = (rng.random((4, 192)) * 0.02 + 0.001).astype(np.float16)
    given = {"blocks": block_columns(pack_rows(codes).view(np.uint32)),
             "scales": block_groups(scales.view(np.uint16), 3),
             "zeros": block_groups(rng.integers(0, 17, (4, 192)).astype(np.uint8), 3), "starts": group_starts,
             "x": rng.standard_normal((70, 512)).astype(np.float32)}
    np.savez(tmp_path / "given.npz", **given)
    env = {**os.environ, "LLAMA_REF_LANES": str(lanes)}
    out = subprocess.run([sys.executable, "-c", LANES_PROBE, tmp_path / "given.npz", tmp_path / "y.npy"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    ours = np.load(tmp_path / "y.npy")
    for n in (1, 3, 70):
        here = gptq_matmul(given["x"][:n], given["blocks"], given["scales"], given["zeros"], group_starts, "F16")
        assert np.array_equal(ours[:n], here), f"{n} rows: {lanes} lanes against {PATH}"


def test_fused_projections_equal_the_separate_ones():
    """q, k, v (and gate, up) share one packed matrix and one kernel call; each output equals
    what its Linear gives alone, and each member still works alone. Different grouping or
    row orders are not fused."""
    rng = np.random.default_rng(10)
    separate = []
    for d_out in (96, 64, 136):                         # widths that are and are not multiples of 64
        tensors, _ = random_pack(rng, 512, d_out, 128, sym=False, act_order=False)
        separate.append(packed_linear(tensors, 128))
    separate[1].bias = rng.standard_normal(64).astype(np.float32)
    fused = fuse(*separate)
    assert all(member.fused is fused[0].fused for member in fused)
    for n in (1, 5, 70):
        x = rng.standard_normal((n, 512)).astype(np.float32)
        for ours, alone, member in zip(project(x, *fused), [linear(x) for linear in separate], fused):
            assert ours.shape == alone.shape
            assert np.array_equal(ours, alone) and np.array_equal(member(x), ours)
    other_groups, _ = random_pack(rng, 512, 64, 64, sym=False)
    assert fuse(separate[0], packed_linear(other_groups, 64))[0].fused is None
    act_order, _ = random_pack(rng, 512, 64, 128, sym=False, act_order=True)
    assert fuse(separate[0], packed_linear(act_order, 128))[0].fused is None


def test_odd_output_widths_and_missing_g_idx():
    rng = np.random.default_rng(5)
    tensors, zeros = random_pack(rng, 256, 8 * 13, 64, sym=False)
    w = dequantize_numpy(tensors["qweight"], zeros, tensors["scales"], tensors["g_idx"])
    layer = packed_linear(tensors, 64, with_g_idx=False)
    assert layer.layer.permutation is None
    x = rng.standard_normal((2, 256)).astype(np.float32)
    check_product(layer(x), x, w, "no g_idx")
    tensors["g_idx"][:] = 0       # an all-zero g_idx means "absent"
    check_product(packed_linear(tensors, 64)(x), x, w, "all-zero g_idx")


# --- whole checkpoints --------------------------------------------------------------------

PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"]


def quantize_rtn(weight, group_size, sym, rng, act_order):
    """Round-to-nearest 4-bit quantization of an nn.Linear weight (out, in), GPTQ's grid:
    returns codes (in, out), zero points and scales (groups, out), g_idx (in,)."""
    w = weight.T.astype(np.float64)                                  # (in, out)
    d_in = w.shape[0]
    size = d_in if group_size == -1 else group_size
    order = rng.permutation(d_in) if act_order else np.arange(d_in)  # act-order: groups of scattered rows
    g_idx = np.empty(d_in, dtype=np.int32)
    g_idx[order] = np.arange(d_in) // size
    groups = g_idx.max() + 1
    codes, zeros, scales = np.empty(w.shape, np.int64), np.empty((groups, w.shape[1]), np.int64), \
        np.empty((groups, w.shape[1]), np.float16)
    for g in range(groups):
        rows = w[g_idx == g]
        lo, hi = np.minimum(rows.min(0), 0), np.maximum(rows.max(0), 0)
        if sym:
            hi = np.maximum(np.abs(lo), hi)
            lo = -hi
        scale = ((hi - lo) / 15).astype(np.float16)
        scale[scale == 0] = 1
        zero = np.full(w.shape[1], 8) if sym else np.clip(np.round(-lo / scale.astype(np.float64)), 1, 15)
        codes[g_idx == g] = np.clip(np.round(rows / scale.astype(np.float64)) + zero, 0, 15)
        zeros[g], scales[g] = zero, scale
    return codes, zeros, scales, g_idx


def write_gptq_checkpoint(dense_dir, out_dir, group_size=128, sym=True, version=1, act_order=False, legacy=False):
    """A GPTQ checkpoint of a dense one (round-to-nearest codes), and the dense checkpoint of
    exactly the weights it encodes, for transformers to run."""
    from safetensors.numpy import load_file
    rng = np.random.default_rng(6)
    dense = load_file(dense_dir / "model.safetensors")
    config = json.loads((dense_dir / "config.json").read_text())
    packed, dequantized = {}, dict(dense)
    for i in range(config["num_hidden_layers"]):
        for projection in PROJECTIONS:
            prefix = f"model.layers.{i}.{projection}"
            weight = dense.pop(prefix + ".weight")
            codes, zeros, scales, g_idx = quantize_rtn(weight, group_size, sym, rng, act_order)
            stored_zeros = (zeros - 1) & 0xF if version == 1 else zeros
            packed.update({prefix + ".qweight": pack_rows(codes), prefix + ".qzeros": pack_columns(stored_zeros),
                           prefix + ".scales": scales.astype(np.float32) if legacy else scales})
            if legacy:
                packed[prefix + ".bias"] = np.zeros(weight.shape[0], dtype=np.float32)
            else:
                packed[prefix + ".g_idx"] = g_idx
            dequantized[prefix + ".weight"] = dequantize_numpy(pack_rows(codes), zeros, scales, g_idx).T.copy()
    out_dir.mkdir(parents=True)
    save_file({**dense, **packed}, str(out_dir / ("4bit-128g.safetensors" if legacy else "model.safetensors")))
    if not legacy:
        config["quantization_config"] = {"bits": 4, "group_size": group_size, "desc_act": act_order, "sym": sym,
                                         "quant_method": "gptq", "format": "gptq" if version == 1 else "gptq_v2",
                                         "meta": {"quantizer": ["test"]}}
    (out_dir / "config.json").write_text(json.dumps(config))
    reference = out_dir.parent / (out_dir.name + "-dequantized")
    reference.mkdir()
    save_file(dequantized, str(reference / "model.safetensors"))
    (reference / "config.json").write_text((dense_dir / "config.json").read_text())
    return out_dir, reference


CHECKPOINTS = {
    "sym v1": dict(sym=True, version=1),
    "asym v2 act-order g32": dict(sym=False, version=2, act_order=True, group_size=32),
    "asym v1 one group": dict(sym=False, version=1, group_size=-1),
    "pygmalion-style legacy": dict(sym=False, version=1, legacy=True),
}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_gptq_checkpoints_equal_transformers_on_the_dequantized_weights(name, tmp_path):
    dense = make_checkpoint(tmp_path / "dense", overrides=dict(hidden_size=128, intermediate_size=256,
                                                             num_key_value_heads=2))
    quantized, reference = write_gptq_checkpoint(dense, tmp_path / "gptq", **CHECKPOINTS[name])
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # none of these holds a 0xF zero nibble
        model = llama_ref.load_model(quantized)
    assert isinstance(model.weights.layers[0].wq, GPTQLinear)
    prompt = np.random.default_rng(7).integers(3, 320, size=24)
    with torch.no_grad():
        theirs = load_reference(reference)(torch.tensor(prompt)[None]).logits[0].numpy()
    assert relative_error(model.forward(prompt, 0, model.new_cache()), theirs) <= 1e-4


@pytest.mark.parametrize("raw, message", [
    ({"bits": 8, "group_size": 128}, "bits=8; only 4-bit GPTQ is supported"),
    ({"bits": 4, "group_size": 100}, "group_size=100; must be -1 or a positive multiple of 8"),
    ({"bits": 4, "format": "marlin"}, "format='marlin'; supported: gptq, gptq_v2"),
    ({"quant_method": "awq"}, "quant_method='awq'; only GPTQ checkpoints are supported"),
])
def test_unsupported_gptq_configs_are_clear_errors(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        GPTQConfig.from_dict(raw, "quantize_config.json")


def test_mismatched_group_count_is_a_checkpoint_error():
    tensors, _ = random_pack(np.random.default_rng(8), 256, 64, 64)
    with pytest.raises(CheckpointError, match="scales has 4 groups; group_size 128 over 256 inputs makes 2"):
        packed_linear(tensors, 128)
