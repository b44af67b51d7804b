"""Quantizing a whole model into a standard GPTQ checkpoint (`llama-ref quantize`), with
tools/gptq.py's GPTQ or round-to-nearest on each Linear.

    quantize_model(model, windows, settings)   every Linear of every layer, a layer at a time
    write_checkpoint(model, layers, directory, settings, source)   streamed as the layers come

GPTQ runs the calibration windows through the model's own decoder layers
(nn/transformer.decoder_layer) with hooks (LayerQuantizer) that quantize each Linear from
its inputs just before it computes. The checkpoint is written in file order as the layers
are quantized, each Linear's codes packed as soon as they exist, so memory holds one layer's
work at a time, never the whole quantized model.
"""
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import numpy as np

from .. import __version__
from ..api import Model
from ..files import atomic_output
from ..formats.hf import LAYER_NAMES
from ..formats.safetensors import StoredTensor, release_pages, write_safetensors
from ..kernels.gptq import pack_columns
from ..nn.linear import DenseLinear, Linear
from ..nn.transformer import chunk_rope, decoder_layer, embed, self_attention
from .gptq import Hessian, QuantizedWeight, QuantizeError, QuantizeSettings, gptq, hessian_of, round_to_nearest

# public domain; provenance in its first line
DEFAULT_CALIBRATION = Path(__file__).parent.parent / "data" / "calibration.txt"
HF_NAMES = {meta: hf for hf, meta in LAYER_NAMES.items()}
# Meta name -> HF name, in the order each layer quantizes them (true-sequential)
LINEARS = {meta: HF_NAMES[meta] for meta in ("wq", "wk", "wv", "wo", "w1", "w3", "w2")}


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
    if isinstance(linear, DenseLinear):
        release_pages(linear.weight)     # the source's mapped pages leave the resident set once read
    if settings.method == "rtn":
        quantized = round_to_nearest(weight, settings)
    else:
        try:
            quantized = gptq(weight, hessian.inverse(settings), settings)
        except QuantizeError as err:
            raise QuantizeError(f"{name}: {err}") from None
    return quantized, as_linear(name, quantized, linear.bias)


class LayerQuantizer:
    """The hooks (nn/transformer.LayerHooks) that quantize one decoder layer as it runs: each
    Linear from the Hessian of the input it reads (shared by the Linears that read the same
    input: q, k, v; gate, up), then replaced by its quantized self, so that the Linears after
    it see the activations of the quantized layer, as the reference's true-sequential mode."""

    def __init__(self, prefix: str, settings: QuantizeSettings, bar):
        self.prefix, self.settings, self.bar = prefix, settings, bar
        self.hessians: dict[str, Hessian] = {}        # Meta name -> the Hessian of its input, until used
        self.quantized: dict[str, QuantizedWeight] = {}   # HF name -> the Linear as the checkpoint stores it

    def inputs(self, names: tuple[str, ...], x: np.ndarray) -> None:
        shared = hessian_of(x)
        self.hessians.update({name: shared for name in names})

    def replace(self, name: str, linear: Linear) -> Linear:
        hf_name = self.prefix + HF_NAMES[name]
        self.bar.set_description(f"{self.prefix}{HF_NAMES[name]}")
        self.quantized[hf_name], computed = quantize_linear(hf_name, linear, self.hessians.pop(name, None),
                                                            self.settings)
        self.bar.update(1)
        return computed


def quantize_model(model: Model, windows: np.ndarray | None, settings: QuantizeSettings,
                   progress: bool = False) -> Iterator[dict[str, QuantizedWeight]]:
    """Every Linear of every decoder layer, a layer at a time: yields {HF name
    ("model.layers.0.self_attn.q_proj"): QuantizedWeight} for each layer, in order, computing
    a layer only when the one before it has been taken.

    GPTQ runs the calibration windows (samples, seq_len) through the layers: each Linear's
    Hessian comes from its inputs as computed with the layers and the Linears before it
    already quantized (q, k, v -> o -> gate, up -> down). Round-to-nearest needs no windows."""
    from tqdm import tqdm
    config, layers = model.config, model.weights.layers
    if settings.method == "gptq" and windows is None:
        raise QuantizeError("calibration: GPTQ needs calibration windows", "calibration")
    with tqdm(total=len(layers) * len(LINEARS), unit="linear", disable=not progress, desc="quantize") as bar:
        if settings.method == "gptq":
            samples, seq_len = windows.shape
            cos, sin = (np.tile(angles, (samples, 1)) for angles in chunk_rope(config, 0, seq_len))  # (rows, d)
            x = embed(windows.reshape(-1), model.weights.tok_embeddings)                   # (samples * seq_len, hidden)
        for i, layer in enumerate(layers):
            quantizer = LayerQuantizer(f"model.layers.{i}.", settings, bar)
            if settings.method == "gptq":
                x = decoder_layer(config, layer, x, (seq_len,) * samples, cos, sin, self_attention, quantizer)
            else:
                for name in LINEARS:
                    quantizer.replace(name, getattr(layer, name))
            yield quantizer.quantized


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
            "meta": {"quantizer": [f"llama-ref:{__version__}"], "method": settings.method}}


def packed_tensors(quantized: QuantizedWeight, settings: QuantizeSettings) -> tuple[np.ndarray, ...]:
    """qweight, qzeros, scales, g_idx: the zero points as the format stores them."""
    stored_zeros = quantized.zeros.astype(np.int64) - (1 if settings.checkpoint_format == "gptq" else 0)
    return quantized.qweight, pack_columns(stored_zeros & 0xF), quantized.scales, quantized.g_idx


PACKED = (".qweight", ".qzeros", ".scales", ".g_idx")


def checkpoint_specs(model: Model, settings: QuantizeSettings) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor, in the order written: HF names, fp16 for
    everything not quantized. The shapes follow from the model alone, so the file's header is
    written before anything is quantized."""
    config = model.config
    hidden, vocab = config.hidden_size, config.vocab_size
    specs = [("model.embed_tokens.weight", "F16", (vocab, hidden))]
    for i, layer in enumerate(model.weights.layers):
        prefix = f"model.layers.{i}."
        specs += [(prefix + hf + ".weight", "F16", (hidden,)) for hf in HF_LAYER_NORMS.values()]
        for short, hf in LINEARS.items():
            linear = getattr(layer, short)
            n_in, n_out = linear.in_features, linear.out_features
            groups = 1 if settings.group_size == -1 else -(-n_in // settings.group_size)
            specs += [(prefix + hf + suffix, dtype, shape) for suffix, dtype, shape in zip(
                PACKED, ("I32", "I32", "F16", "I32"), ((n_in // 8, n_out), (groups, n_out // 8), (groups, n_out), (n_in,)))]
            if linear.bias is not None:
                specs.append((prefix + hf + ".bias", "F16", (n_out,)))
    specs.append(("model.norm.weight", "F16", (hidden,)))
    if not config.tie_word_embeddings:
        specs.append(("lm_head.weight", "F16", (vocab, hidden)))
    return specs


def checkpoint_tensors(model: Model, layers, settings: QuantizeSettings) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) in checkpoint_specs' order, each made when the writer reaches it: a layer
    is taken from `layers` (quantize_model's) only when everything before it is written."""
    weights = model.weights
    yield "model.embed_tokens.weight", weights.tok_embeddings.rows(np.arange(model.config.vocab_size)).astype(
        np.float16)
    if isinstance(weights.tok_embeddings, StoredTensor):
        release_pages(weights.tok_embeddings.data)
    for i, (layer, quantized) in enumerate(zip(weights.layers, layers)):
        prefix = f"model.layers.{i}."
        for meta, hf in HF_LAYER_NORMS.items():
            yield prefix + hf + ".weight", getattr(layer, meta).astype(np.float16)
        for short, hf in LINEARS.items():
            yield from zip((prefix + hf + suffix for suffix in PACKED), packed_tensors(quantized[prefix + hf], settings))
            bias = getattr(layer, short).bias
            if bias is not None:
                yield prefix + hf + ".bias", bias.astype(np.float16)
    yield "model.norm.weight", weights.norm.astype(np.float16)
    if not model.config.tie_word_embeddings:
        yield "lm_head.weight", weights.output.dequantize().astype(np.float16)


def write_checkpoint(model: Model, layers, directory, settings: QuantizeSettings, source) -> Path:
    """A GPTQ checkpoint directory: model.safetensors, config.json with quantization_config,
    quantize_config.json, and the tokenizer (the source directory's files, or for a GGUF
    source the tokenizer it embeds). `layers` yields each layer's QuantizedWeights in order
    (quantize_model); they are written as they come. The directory appears only when complete."""
    directory = Path(directory)
    if directory.exists():
        raise QuantizeError(f"{directory}: already exists; quantize writes a new directory", "output")
    with atomic_output(directory, directory=True) as staging:
        tensors = checkpoint_tensors(model, layers, settings)

        def make(name, shape):
            made, array = next(tensors)
            if made != name:
                raise RuntimeError(f"the checkpoint's tensors came out of order: {made} where {name} belongs")
            return array
        write_safetensors(staging / "model.safetensors", checkpoint_specs(model, settings), make)
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
    write_checkpoint(model, quantize_model(model, windows, settings, progress), directory, settings, source)
    return {"settings": asdict(settings), "linears": len(model.weights.layers) * len(LINEARS),
            "calibration_tokens": 0 if windows is None else int(windows.size),
            "seconds": round(time.perf_counter() - started, 1)}
