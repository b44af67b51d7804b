"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022, arXiv 2210.17323) and round-to-nearest:
4-bit weights in groups of input columns, written as a standard GPTQ checkpoint.

    gptq(W, H, settings)                  one Linear: the paper's Algorithm 1
    round_to_nearest(W, settings)         the baseline
    quantize_model(model, windows, settings)   every Linear of every layer, in order
    write_checkpoint(model, quantized, directory, settings, source)

W is (out, in) as in the checkpoint; column j multiplies input j. H = 2 XᵀX / n is the
Hessian of the layer's squared error ‖XW - XŴ‖² over the n calibration rows of X (n, in).

Where this follows the reference code (IST-DASLab gptq.py, AutoGPTQ, gptqmodel) and where not:
- Same: dead inputs (H[i,i] = 0) are pinned to H[i,i] = 1 and W[:, i] = 0; dampening
  λ = damp · mean(diag H); the upper Cholesky factor of H⁻¹; lazy blocks of 128 columns;
  act-order = columns by descending diag H, with g_idx recording each input's group.
- A group's grid is found on the weights as its lazy block starts, as in the reference:
  when a group starts mid-block (group size < 128) the updates from the block's earlier
  columns are not in it. Finding it after those updates instead was measured worse on
  SmolLM2 (0.3% higher error on calibration and held-out inputs at group size 32, up to 3%
  on some Linears): the updates widen a group's range, and a wider grid costs every weight
  in it more than clipping the few that moved out costs those. Blocks here are a whole
  number of groups (so group sizes that do not divide 128 start at a block).
- A group is quantized with its fp32 scale and the scale is stored as fp16, as in the
  reference. Rounding the scale to fp16 first, so that the propagated errors are those of
  the weights as stored, was measured worse: 0.9% higher error on held-out inputs on
  SmolLM2 at group size 128 (benchmarks/layer_error.py). Perplexity moved both ways, inside
  its draw-to-draw noise.
- sym: the grid is ±max|w| even when the group has no negative weight (the reference then
  keeps xmin = 0 with zero point 8 and clips the upper half of its range).
- asym with v1 zero points ("gptq", stored as zero - 1): a zero point of 0 cannot be stored
  (it corrupts the word, docs/formats.md "Zero points of 0 in v1 checkpoints"), so zero points are kept in 1..15; "gptq_v2" uses 0..15.
"""
import json
import shutil
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np

from ..api import Model
from ..errors import LlamaRefError
from ..files import atomic_output
from ..formats.hf import LAYER_NAMES
from ..formats.safetensors import StoredTensor, dtype_name, write_safetensors
from ..kernels.gptq import pack_columns, pack_rows
from ..kernels.quantize import MAX_CODE, gptq_columns
from ..nn.linear import DenseLinear
from ..nn.ops import rms_norm, silu
from ..nn.rope import apply_rope, rope_cos_sin, rope_inv_freq
from ..nn.transformer import attention, embed

# public domain; provenance in its first line
DEFAULT_CALIBRATION = Path(__file__).parent.parent / "data" / "calibration.txt"
METHODS = ("gptq", "rtn")
FORMATS = ("gptq", "gptq_v2")
HF_NAMES = {meta: hf for hf, meta in LAYER_NAMES.items()}
# Meta name -> HF name, in the order each layer quantizes them (true-sequential)
LINEARS = {meta: HF_NAMES[meta] for meta in ("wq", "wk", "wv", "wo", "w1", "w3", "w2")}


class QuantizeError(LlamaRefError, ValueError):
    """Quantization settings or inputs that cannot work."""


@dataclass(frozen=True)
class QuantizeSettings:
    method: str = "gptq"            # "gptq" | "rtn"
    bits: int = 4
    group_size: int = 128           # input columns per scale; -1: one group for the whole row
    act_order: bool = False         # quantize columns by descending diag H (GPTQ only)
    sym: bool = True                # zero point 8; asym fits each group's own min and max
    damp: float = 0.01              # λ = damp · mean(diag H)
    checkpoint_format: str = "gptq"  # "gptq" (v1 zero points) | "gptq_v2"
    block_size: int = 128           # lazy-batch width, rounded to whole groups

    def __post_init__(self):
        if self.method not in METHODS:
            raise QuantizeError(f"method: one of {', '.join(METHODS)}, got {self.method!r}")
        if self.bits != 4:
            raise QuantizeError(f"bits: only 4 is supported, got {self.bits}")
        if not (self.group_size == -1 or (self.group_size > 0 and self.group_size % 8 == 0)):
            raise QuantizeError(f"group_size: -1 or a positive multiple of 8, got {self.group_size}")
        if not 0 < self.damp < 1:
            raise QuantizeError(f"damp: must be in (0, 1), got {self.damp}")
        if self.checkpoint_format not in FORMATS:
            raise QuantizeError(f"checkpoint_format: one of {', '.join(FORMATS)}, got {self.checkpoint_format!r}")
        if self.act_order and self.method != "gptq":
            raise QuantizeError("act_order: needs method gptq (round-to-nearest has no Hessian to order by)")
        if self.block_size <= 0:
            raise QuantizeError(f"block_size: must be positive, got {self.block_size}")

    @property
    def min_zero(self) -> int:
        return 1 if self.checkpoint_format == "gptq" and not self.sym else 0


@dataclass(frozen=True)
class QuantizedWeight:
    """One Linear as a GPTQ checkpoint stores it, inputs in checkpoint order."""
    codes: np.ndarray    # (out, in) uint8, 0..15
    scales: np.ndarray   # (groups, out) float16
    zeros: np.ndarray    # (groups, out) uint8, the true zero points
    g_idx: np.ndarray    # (in,) int32, the group of each input

    def dequantize(self) -> np.ndarray:
        """Ŵ (out, in) float32 = scale · (code - zero) of each input's group, as loaders compute it."""
        scales = self.scales.astype(np.float32)[self.g_idx].T             # (out, in)
        return scales * (self.codes.astype(np.float32) - self.zeros[self.g_idx].T)


def quantization_grid(w: np.ndarray, settings: QuantizeSettings) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of each row of w (out, k), both float32: the grid
    scale · (q - zero), q = 0..15, spans [min(w, 0), max(w, 0)]. The scale is kept in fp32
    while the group is quantized and stored as fp16 (see the module notes)."""
    w = w.astype(np.float32)
    low, high = np.minimum(w.min(axis=1), 0.0), np.maximum(w.max(axis=1), 0.0)
    if settings.sym:
        high = np.maximum(-low, high)
        low = -high
    empty = high == low                     # an all-zero row still needs a usable scale
    low, high = np.where(empty, -1.0, low), np.where(empty, 1.0, high)
    scale = ((high - low) / np.float32(MAX_CODE)).astype(np.float32)
    if np.isinf(scale.astype(np.float16)).any():
        raise QuantizeError(f"weights up to {np.abs(w).max():.3g} overflow an fp16 scale")
    scale = np.maximum(scale, np.float32(2.0 ** -24))   # tiny weights: the smallest fp16, not 0
    if settings.sym:
        zero = np.full(w.shape[0], (MAX_CODE + 1) // 2)
    else:
        zero = np.clip(np.round(-low / scale), settings.min_zero, MAX_CODE)
    return scale, zero.astype(np.float32)


def quantize_codes(w: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """q = clamp(round(w / scale) + zero, 0, 15), round half to even as torch.round.
    w (out, k) float32; scale, zero (out,) float32."""
    return np.clip(np.rint(w / scale[:, None]) + zero[:, None], 0, MAX_CODE)


def round_to_nearest(weight: np.ndarray, settings: QuantizeSettings) -> QuantizedWeight:
    """Every group of columns on its own grid, nothing propagated."""
    out, n = weight.shape
    size = settings.group_size if settings.group_size > 0 else n
    codes, scales, zeros = np.empty((out, n), np.uint8), [], []
    for start in range(0, n, size):
        w = weight[:, start:start + size].astype(np.float32)
        scale, zero = quantization_grid(w, settings)
        codes[:, start:start + size] = quantize_codes(w, scale, zero)
        scales.append(scale)
        zeros.append(zero)
    return QuantizedWeight(codes, np.array(scales, np.float16), np.array(zeros, np.uint8),
                           (np.arange(n) // size).astype(np.int32))


@dataclass(frozen=True)
class InverseHessian:
    """What GPTQ needs of H, shared by the Linears that read the same input (q, k, v; gate, up)."""
    order: np.ndarray    # (in,) the order columns are quantized in (descending diag H with act-order)
    dead: np.ndarray     # (in,) bool, inputs that were always zero: their weights are set to 0
    u: np.ndarray        # (in, in) float32, upper, UᵀU = (H + λI)⁻¹ in processing order


def inverse_hessian(hessian: np.ndarray, settings: QuantizeSettings) -> InverseHessian:
    """Dead inputs pinned to H[i,i] = 1, columns ordered, λ = damp · mean(diag H) added, and
    the upper Cholesky factor of the inverse taken: row i of U holds what quantizing column i
    does to the columns after it (the paper's Cholesky form of the OBQ updates)."""
    h = hessian.astype(np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    order = np.argsort(-np.diag(h), kind="stable") if settings.act_order else np.arange(len(h))
    h = h[np.ix_(order, order)]
    h[np.diag_indices_from(h)] += settings.damp * np.mean(np.diag(h))
    try:
        u = np.linalg.cholesky(np.linalg.inv(h)).T
    except np.linalg.LinAlgError:
        raise QuantizeError(f"the Hessian is not positive definite with damp={settings.damp}; "
                            "try a larger --damp") from None
    return InverseHessian(order, dead, np.ascontiguousarray(u, dtype=np.float32))


def gptq(weight: np.ndarray, inverse: InverseHessian, settings: QuantizeSettings) -> QuantizedWeight:
    """Quantize W (out, in) column by column, each column's rounding error spread over the
    columns not yet quantized so as to minimise ‖XW - XŴ‖² (H = 2XᵀX/n, see inverse_hessian)."""
    out, n = weight.shape
    w = np.array(weight, dtype=np.float32)                               # (out, in), updated in place
    w[:, inverse.dead] = 0.0
    order, u = inverse.order, inverse.u
    w = np.ascontiguousarray(w[:, order])
    size = settings.group_size if settings.group_size > 0 else n
    block = size * max(1, settings.block_size // size) if settings.group_size > 0 else settings.block_size
    step = min(size, block)              # a run of columns on one grid inside one block
    codes, scales, zeros = np.empty((out, n), np.uint8), [], []
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        errors = np.empty((out, b1 - b0), np.float32)                    # (out, block)
        # Every grid of the block comes from the weights as the block starts (see the module notes)
        grids = {first: quantization_grid(w[:, first:first + size], settings)
                 for first in range(b0, b1, step) if first % size == 0}
        for first in range(b0, b1, step):
            if first in grids:
                scale, zero = grids[first]
                scales.append(scale)
                zeros.append(zero)
            gptq_columns(w, u, first, min(first + step, b1), b0, b1, scale, zero, codes, errors)
        w[:, b1:] -= errors @ u[b0:b1, b1:]                              # the lazy update of the rest
    g_idx = np.empty(n, np.int32)
    g_idx[order] = np.arange(n) // size
    restored = np.empty_like(codes)
    restored[:, order] = codes
    return QuantizedWeight(restored, np.array(scales, np.float16), np.array(zeros, np.uint8), g_idx)


class Hessian:
    """H = 2 XᵀX / n, accumulated over batches of rows of X."""

    def __init__(self, features: int):
        self.sum = np.zeros((features, features))   # Σ xᵀx, float64
        self.rows = 0
        self._inverse = None

    def add(self, x: np.ndarray) -> None:
        """x (rows, features) float32."""
        self.sum += x.T @ x
        self.rows += x.shape[0]

    def value(self) -> np.ndarray:
        return 2.0 * self.sum / self.rows

    def inverse(self, settings: QuantizeSettings) -> InverseHessian:
        """inverse_hessian of the value, computed once for all the Linears that share it."""
        if self._inverse is None:
            self._inverse = inverse_hessian(self.value(), settings)
        return self._inverse


def calibration_windows(tokenizer, text: str, samples: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """`samples` windows of `seq_len` tokens at random offsets in the text (as AutoGPTQ's and
    gptqmodel's examples sample WikiText or C4), each starting with BOS when the tokenizer
    adds one.  Returns (samples, seq_len) int64."""
    if samples < 1 or seq_len < 2:
        raise QuantizeError(f"samples and seq_len: need at least 1 and 2, got {samples} and {seq_len}")
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    ids = tokenizer.encode_text(text)
    span = seq_len - len(bos)
    if len(ids) < span:
        raise QuantizeError(f"calibration: the text has {len(ids)} tokens, fewer than seq_len={seq_len}")
    starts = np.random.default_rng(seed).integers(0, len(ids) - span + 1, size=samples)
    return np.array([bos + ids[s:s + span] for s in starts], dtype=np.int64)


def as_linear(name: str, quantized: QuantizedWeight, bias: np.ndarray | None) -> DenseLinear:
    """The quantized weight as the next layers will compute with it."""
    stored = StoredTensor(name, "F32", quantized.dequantize())
    return DenseLinear(stored, None if bias is None else StoredTensor(name + ".bias", "F32", bias))


def quantize_linear(name: str, linear, hessian: Hessian | None, settings: QuantizeSettings):
    """(QuantizedWeight, the Linear to compute the following activations with)."""
    weight = linear.dequantize()                                         # (out, in) float32
    if settings.method == "rtn":
        quantized = round_to_nearest(weight, settings)
    else:
        try:
            quantized = gptq(weight, hessian.inverse(settings), settings)
        except QuantizeError as err:
            raise QuantizeError(f"{name}: {err}") from None
    return quantized, as_linear(name, quantized, linear.bias)


def quantize_model(model: Model, windows: np.ndarray | None, settings: QuantizeSettings,
                   progress: bool = False) -> dict[str, QuantizedWeight]:
    """Every Linear of every decoder layer, by HF name ("model.layers.0.self_attn.q_proj").

    GPTQ runs the calibration windows (samples, seq_len) through the model one layer at a
    time: each Linear's Hessian comes from its inputs as computed with the layers and the
    Linears before it already quantized (q, k, v -> o -> gate, up -> down), as the
    reference's true-sequential mode. Round-to-nearest needs no windows."""
    from tqdm import tqdm
    config, layers = model.config, model.weights.layers
    bar = tqdm(total=len(layers) * len(LINEARS), unit="linear", disable=not progress, desc="quantize")
    result = {}

    def run(i: int, short: str, linear, hessian: Hessian | None):
        name = f"model.layers.{i}.{LINEARS[short]}"
        bar.set_description(f"layer {i + 1}/{len(layers)} {LINEARS[short]}")
        result[name], quantized = quantize_linear(name, linear, hessian, settings)
        bar.update(1)
        return quantized

    if settings.method == "rtn":
        for i, layer in enumerate(layers):
            for short in LINEARS:
                run(i, short, getattr(layer, short), None)
        bar.close()
        return result
    if windows is None:
        raise QuantizeError("calibration: GPTQ needs calibration windows")
    samples, seq_len = windows.shape
    n_heads, n_kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    cos, sin = rope_cos_sin(np.arange(seq_len), rope_inv_freq(config, seq_len=seq_len))   # (seq_len, d)
    x = embed(windows.reshape(-1), model.weights.tok_embeddings)                         # (samples * seq_len, hidden)
    for i, layer in enumerate(layers):
        h = rms_norm(x, layer.attention_norm, config.rms_norm_eps)                      # (rows, hidden)
        attention_inputs = hessian_of(h)
        wq, wk, wv = (run(i, short, getattr(layer, short), attention_inputs) for short in ("wq", "wk", "wv"))
        q = apply_rope(wq(h).reshape(samples, seq_len, n_heads, d), cos, sin)
        k = apply_rope(wk(h).reshape(samples, seq_len, n_kv_heads, d), cos, sin)
        v = wv(h).reshape(samples, seq_len, n_kv_heads, d)
        mixed = np.concatenate([attention(q[s], k[s].transpose(1, 0, 2), v[s].transpose(1, 0, 2), 0)
                                for s in range(samples)])                               # (rows, n_heads * d)
        x = x + run(i, "wo", layer.wo, hessian_of(mixed))(mixed)
        h = rms_norm(x, layer.ffn_norm, config.rms_norm_eps)
        ffn_inputs = hessian_of(h)
        w1, w3 = run(i, "w1", layer.w1, ffn_inputs), run(i, "w3", layer.w3, ffn_inputs)
        gated = silu(w1(h)) * w3(h)                                                     # (rows, intermediate)
        x = x + run(i, "w2", layer.w2, hessian_of(gated))(gated)
    bar.close()
    return result


def hessian_of(x: np.ndarray) -> Hessian:
    hessian = Hessian(x.shape[1])
    hessian.add(x)
    return hessian


# ---- the checkpoint ---------------------------------------------------------------------

HF_LAYER_NORMS = {meta: HF_NAMES[meta] for meta in ("attention_norm", "ffn_norm")}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


def quantization_config(settings: QuantizeSettings) -> dict:
    """quantize_config.json, also config.json's quantization_config (docs/formats.md,
    "quantize_config.json keys"): the keys
    AutoGPTQ, gptqmodel and transformers read."""
    return {"bits": settings.bits, "group_size": settings.group_size, "desc_act": settings.act_order,
            "sym": settings.sym, "damp_percent": settings.damp, "true_sequential": True, "static_groups": False,
            "quant_method": "gptq", "checkpoint_format": settings.checkpoint_format,
            "format": settings.checkpoint_format, "pack_dtype": "int32",
            "meta": {"quantizer": [f"llama-ref:{version('llama-ref')}"], "method": settings.method}}


def packed_tensors(name: str, quantized: QuantizedWeight, settings: QuantizeSettings) -> dict[str, np.ndarray]:
    stored_zeros = quantized.zeros.astype(np.int64) - (1 if settings.checkpoint_format == "gptq" else 0)
    return {name + ".qweight": pack_rows(quantized.codes.T),
            name + ".qzeros": pack_columns(stored_zeros & 0xF),
            name + ".scales": quantized.scales,
            name + ".g_idx": quantized.g_idx}


def checkpoint_tensors(model: Model, quantized: dict[str, QuantizedWeight],
                       settings: QuantizeSettings) -> dict[str, np.ndarray]:
    """name -> array in the order written: HF names, fp16 for everything not quantized."""
    weights, vocab = model.weights, model.config.vocab_size
    tensors = {"model.embed_tokens.weight": weights.tok_embeddings.rows(np.arange(vocab)).astype(np.float16)}
    for i, layer in enumerate(weights.layers):
        prefix = f"model.layers.{i}."
        for meta, hf in HF_LAYER_NORMS.items():
            tensors[prefix + hf + ".weight"] = getattr(layer, meta).astype(np.float16)
        for short, hf in LINEARS.items():
            tensors.update(packed_tensors(prefix + hf, quantized[prefix + hf], settings))
            bias = getattr(layer, short).bias
            if bias is not None:
                tensors[prefix + hf + ".bias"] = bias.astype(np.float16)
    tensors["model.norm.weight"] = weights.norm.astype(np.float16)
    if not model.config.tie_word_embeddings:
        tensors["lm_head.weight"] = weights.output.dequantize().astype(np.float16)
    return tensors


def write_checkpoint(model: Model, quantized: dict[str, QuantizedWeight], directory, settings: QuantizeSettings,
                     source) -> Path:
    """A GPTQ checkpoint directory: model.safetensors, config.json with quantization_config,
    quantize_config.json, and the tokenizer (the source directory's files, or for a GGUF
    source the tokenizer it embeds). The directory appears only when complete."""
    directory = Path(directory)
    if directory.exists():
        raise QuantizeError(f"{directory}: already exists; quantize writes a new directory", "output")
    with atomic_output(directory, directory=True) as staging:
        tensors = checkpoint_tensors(model, quantized, settings)
        specs = [(name, dtype_name(array.dtype), array.shape) for name, array in tensors.items()]
        write_safetensors(staging / "model.safetensors", specs, lambda name, shape: tensors[name])
        source = Path(source) if source is not None else None
        base = (json.loads((source / "config.json").read_text()) if source is not None and source.is_dir()
                else model.config.to_hf_dict())
        config = {**base, "torch_dtype": "float16", "quantization_config": quantization_config(settings)}
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        (staging / "quantize_config.json").write_text(json.dumps(quantization_config(settings), indent=2))
        if source is not None and source.is_dir():
            for name in TOKENIZER_FILES:
                if (source / name).exists():
                    shutil.copy(source / name, staging / name)
        elif model.tokenizer is not None:
            model.tokenizer.save(staging)
    return directory


def quantize(model: Model, directory, settings: QuantizeSettings, calibration_text: str | None = None,
             samples: int = 128, seq_len: int = 256, source=None, progress: bool = False, seed: int = 0) -> dict:
    """Quantize `model` and write it to `directory`; returns what was done and how long it took.
    GPTQ calibrates on `samples` windows of `seq_len` tokens that `seed` draws from the text."""
    started = time.perf_counter()
    windows = None
    if settings.method == "gptq":
        if model.tokenizer is None:
            raise QuantizeError("calibration: the model has no tokenizer to encode the calibration text with")
        text = DEFAULT_CALIBRATION.read_text() if calibration_text is None else calibration_text
        windows = calibration_windows(model.tokenizer, text, samples, seq_len, seed)
    quantized = quantize_model(model, windows, settings, progress)
    write_checkpoint(model, quantized, directory, settings, source)
    return {"settings": asdict(settings), "linears": len(quantized),
            "calibration_tokens": 0 if windows is None else int(windows.size),
            "seconds": round(time.perf_counter() - started, 1)}
