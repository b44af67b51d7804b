"""Synthetic GPTQ checkpoints: random packed 4-bit weights in a real model's shape, written
in seconds (nothing is quantized), for benchmarks and memory tests; with dense=True, random
fp16 weights instead, a source for measuring the quantizer.

    write_synthetic_gptq(directory, "llama-2-13b")              # 40 layers, about 7 GB
    write_synthetic_gptq(directory, "llama-2-13b", layers=2)    # its first 2 layers

The file is a standard AutoGPTQ-style checkpoint (model.safetensors, config.json with
quantization_config, quantize_config.json, Llama-2's tokenizer.model): sym, v1 zero points,
group size 128; or, dense, an HF fp16 checkpoint with the same tokenizer. Tensors
are generated and written one at a time, so writing a 13B checkpoint never holds more than
one of them in memory; the directory appears only when complete.
"""
import json
import math
from pathlib import Path

import numpy as np

from ..errors import LlamaRefError
from ..files import atomic_output
from ..formats.safetensors import write_safetensors
from ..kernels.ggml import BLOCK, BLOCK_BYTES
from ..tokenizer.gguf_vocab import read_gguf_vocab, sentencepiece_model
from .assets import fetch_package_files

SHAPES = {  # Meta's published Llama-2 configurations
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40),
}
GROUP_SIZE = 128
SYM_V1_ZEROS = np.int32(0x77777777)   # zero point 8 stored as 7, in every nibble
# Codes are uniform on 0..15, so W = scale * (code - 8) has standard deviation about 4.6 * scale;
# this scale gives weights of about 0.02, as in a trained model, so activations stay finite.
SCALE = 0.0045
LLAMA_VOCAB_PACKAGE = "llama-cpp-python==0.3.36"


def tensor_specs(config: dict, dense: bool = False) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of every tensor, in file order: each Linear packed
    GPTQ, or fp16 when dense."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    specs = [("model.embed_tokens.weight", "F16", (vocab, hidden))]
    projections = [("self_attn.q_proj", hidden, hidden), ("self_attn.k_proj", hidden, kv),
                   ("self_attn.v_proj", hidden, kv), ("self_attn.o_proj", hidden, hidden),
                   ("mlp.gate_proj", hidden, inter), ("mlp.up_proj", hidden, inter), ("mlp.down_proj", inter, hidden)]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", "F16", (hidden,)), (p + "post_attention_layernorm.weight", "F16",
                                                                       (hidden,))]
        for name, d_in, d_out in projections:
            if dense:
                specs.append((f"{p}{name}.weight", "F16", (d_out, d_in)))
                continue
            groups = math.ceil(d_in / GROUP_SIZE)
            specs += [(f"{p}{name}.qweight", "I32", (d_in // 8, d_out)), (f"{p}{name}.qzeros", "I32",
                                                                           (groups, d_out // 8)),
                      (f"{p}{name}.scales", "F16", (groups, d_out)), (f"{p}{name}.g_idx", "I32", (d_in,))]
    return specs + [("model.norm.weight", "F16", (hidden,)), ("lm_head.weight", "F16", (vocab, hidden))]


def tensor_data(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if name.endswith(".qweight"):
        return rng.integers(0, 2**32, size=shape, dtype=np.uint32).view(np.int32)
    if name.endswith(".qzeros"):
        return np.full(shape, SYM_V1_ZEROS, dtype=np.int32)
    if name.endswith(".scales"):
        return (SCALE * (0.5 + rng.random(shape, dtype=np.float32))).astype(np.float16)
    if name.endswith(".g_idx"):
        return (np.arange(shape[0]) // GROUP_SIZE).astype(np.int32)
    if name.endswith("norm.weight"):
        return np.ones(shape, dtype=np.float16)
    return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)


def llama2_tokenizer_model() -> bytes:
    """Llama-2's tokenizer.model, rebuilt from the vocabulary GGUF that llama-cpp-python's
    source distribution carries (see tools/assets.py and tokenizer/gguf_vocab.py)."""
    member = "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf"
    return sentencepiece_model(read_gguf_vocab(fetch_package_files(LLAMA_VOCAB_PACKAGE, [member], "sdist")[member]))


def write_synthetic_gptq(directory, shape: str = "llama-2-13b", layers: int | None = None, seed: int = 0,
                         tokenizer_model: bytes | None = None, dense: bool = False) -> Path:
    """Write the checkpoint to `directory` (which must not exist) and return it, with Llama-2's
    tokenizer.model unless another is given. dense: fp16 Linears instead of packed 4-bit
    ones (a source for the quantizer)."""
    if shape not in SHAPES:
        raise LlamaRefError(f"shape: one of {', '.join(SHAPES)}, got {shape!r}", "shape")
    directory = Path(directory)
    if directory.exists():
        raise LlamaRefError(f"{directory}: already exists; synth writes a new directory", "output")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "float16",
              "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, **SHAPES[shape]}
    if layers is not None:
        config["num_hidden_layers"] = layers
    quantize = {"bits": 4, "group_size": GROUP_SIZE, "desc_act": False, "sym": True, "quant_method": "gptq",
                "checkpoint_format": "gptq", "damp_percent": 0.01, "true_sequential": True}
    rng = np.random.default_rng(seed)
    with atomic_output(directory, directory=True) as partial:
        write_safetensors(partial / "model.safetensors", tensor_specs(config, dense),
                          lambda name, shape: tensor_data(name, shape, rng))
        if dense:
            (partial / "config.json").write_text(json.dumps(config, indent=2))
        else:
            (partial / "config.json").write_text(json.dumps({**config, "quantization_config": quantize}, indent=2))
            (partial / "quantize_config.json").write_text(json.dumps(quantize, indent=2))
        (partial / "tokenizer.model").write_bytes(tokenizer_model or llama2_tokenizer_model())
    return directory


Q4_0_BLOCK, Q4_0_BYTES = BLOCK, BLOCK_BYTES["Q4_0"]   # an fp16 scale d, then 16 bytes of nibbles; w = d * (q - 8)


def random_q4_0(rows: int, columns: int, rng: np.random.Generator) -> np.ndarray:
    """(rows, columns / 32 * 18) uint8: random nibbles under scales that give weights of about
    0.02, as SCALE does for the GPTQ checkpoint."""
    blocks = rng.integers(0, 256, size=(rows, columns // Q4_0_BLOCK, Q4_0_BYTES), dtype=np.uint8)
    scales = (SCALE * (0.5 + rng.random((rows, columns // Q4_0_BLOCK), dtype=np.float32))).astype(np.float16)
    blocks[..., :2] = scales[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


def write_synthetic_q4_0_gguf(path, shape: str = "llama-2-13b", layers: int | None = None, seed: int = 0) -> Path:
    """A random Q4_0 GGUF of the shape, as llama.cpp reads it (Llama-2's vocabulary in its
    metadata), for measuring llama.cpp beside the GPTQ checkpoint of the same shape. Written
    tensor by tensor to a temporary name; the file appears only when complete."""
    import gguf

    if shape not in SHAPES:
        raise LlamaRefError(f"shape: one of {', '.join(SHAPES)}, got {shape!r}", "shape")
    path = Path(path)
    dims = {**SHAPES[shape], **({} if layers is None else {"num_hidden_layers": layers})}
    hidden, inter, heads = dims["hidden_size"], dims["intermediate_size"], dims["num_attention_heads"]
    kv = dims["num_key_value_heads"] * hidden // heads
    member = "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf"
    vocab = read_gguf_vocab(fetch_package_files(LLAMA_VOCAB_PACKAGE, [member], "sdist")[member])
    q4_0, f32 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.F32
    tensors = [("token_embd.weight", (len(vocab.tokens), hidden))]
    for i in range(dims["num_hidden_layers"]):
        tensors += [(f"blk.{i}.attn_norm.weight", (hidden,)), (f"blk.{i}.attn_q.weight", (hidden, hidden)),
                    (f"blk.{i}.attn_k.weight", (kv, hidden)), (f"blk.{i}.attn_v.weight", (kv, hidden)),
                    (f"blk.{i}.attn_output.weight", (hidden, hidden)), (f"blk.{i}.ffn_norm.weight", (hidden,)),
                    (f"blk.{i}.ffn_gate.weight", (inter, hidden)), (f"blk.{i}.ffn_up.weight", (inter, hidden)),
                    (f"blk.{i}.ffn_down.weight", (hidden, inter))]
    tensors += [("output_norm.weight", (hidden,)), ("output.weight", (len(vocab.tokens), hidden))]
    with atomic_output(path) as partial:
        writer = gguf.GGUFWriter(partial, "llama")
        writer.add_context_length(4096)
        writer.add_embedding_length(hidden)
        writer.add_block_count(dims["num_hidden_layers"])
        writer.add_feed_forward_length(inter)
        writer.add_head_count(heads)
        writer.add_head_count_kv(dims["num_key_value_heads"])
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_rope_dimension_count(hidden // heads)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(vocab.tokens)
        writer.add_token_scores(vocab.scores)
        writer.add_token_types(vocab.token_types)
        writer.add_bos_token_id(vocab.bos_id)
        writer.add_eos_token_id(vocab.eos_id)
        writer.add_unk_token_id(vocab.unk_id)
        for name, dims_ in tensors:
            if len(dims_) == 1:
                writer.add_tensor_info(name, dims_, np.dtype(np.float32), dims_[0] * 4, raw_dtype=f32)
            else:
                byte_shape = (dims_[0], dims_[1] // Q4_0_BLOCK * Q4_0_BYTES)
                writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=q4_0)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        rng = np.random.default_rng(seed)
        for name, dims_ in tensors:
            writer.write_tensor_data(np.ones(dims_, np.float32) if len(dims_) == 1 else random_q4_0(*dims_, rng))
        writer.close()
    return path
