"""GGUF files (llama.cpp's format), read with the `gguf` package.

- Config from the `llama.*` metadata; tokenizer and chat template from `tokenizer.ggml.*`.
- F32/F16/BF16 tensors are used as stored; Q8_0 stays block-quantized and runs through
  kernels/ggml.py. Q4_0 and Q4_1 linears are re-laid out once at load for the 4-bit kernels
  of kernels/gptq.py (the same codes and fp16 scales, group size 32, the block's offset m
  as a per-group min; the same bytes), which are several times faster than a per-row block
  kernel; a Q4 embedding table is also kept as stored for its row lookups. Any other type
  (the K-quants, Q5_*) is dequantized with gguf.quants.dequantize to fp16 at load, which
  costs memory and speed but not correctness.
- llama.cpp's converter permutes the rows of attn_q and attn_k within each head, from HF's
  rotate-half pairs (i, i + d/2) to interleaved pairs (2i, 2i + 1); the permutation is
  undone here (nn/rope.interleaved_to_half), so the forward pass is the same as for HF files.
"""
import mmap
import struct
from pathlib import Path

import gguf
import numpy as np

from ..config import ModelConfig, RopeScaling
from ..errors import CheckpointError, ConfigError, LlamaRefError
from ..kernels.ggml import BLOCK, BLOCK_BYTES, MATMUL_KINDS
from ..kernels.gptq import block_columns, block_groups, pack_rows
from ..nn.linear import DenseLinear, GGUFLinear, GPTQLinear
from ..nn.rope import interleaved_to_half
from ..nn.transformer import Layer, Weights, fuse_projections
from ..tokenizer import Tokenizer, load_gguf_tokenizer
from .gptq import PackedLayer
from .safetensors import DENSE_STORAGE, StoredTensor, release_pages

LAYER_NAMES = {"attn_norm": "attention_norm", "attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo",
               "ffn_norm": "ffn_norm", "ffn_gate": "w1", "ffn_down": "w2", "ffn_up": "w3"}


def is_dense(tensor) -> bool:
    """F32, F16 or BF16: GGUF's names of these types are the safetensors ones."""
    return tensor.tensor_type.name in DENSE_STORAGE


class MappedReader(gguf.GGUFReader):
    """gguf's reader over a plain array view of its mapped file: it slices the file once per
    value it reads (about 250,000 times for a 49,152-token vocabulary and its merges), and a
    slice of np.memmap costs several times that of an ndarray: SmolLM2's GGUF took 3.7 s to
    open, 1.2 s this way. The tensors are still views of the mapping."""

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, mapped: np.memmap) -> None:
        self._data = mapped.view(np.ndarray)


def field(reader: gguf.GGUFReader, key: str, default=None):
    value = reader.fields.get(key)
    return default if value is None else value.contents()


def gguf_config(reader: gguf.GGUFReader, source: str) -> ModelConfig:
    """The ModelConfig the `llama.*` keys describe (llama.cpp's llama_model_loader names)."""
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ConfigError(f"{source}: general.architecture={arch!r}; only 'llama' is supported")

    def required(key):
        value = field(reader, f"llama.{key}")
        if value is None:
            raise ConfigError(f"{source}: metadata llama.{key} is missing")
        return value
    hidden, heads = required("embedding_length"), required("attention.head_count")
    scaling_type = field(reader, "llama.rope.scaling.type", "none")
    if scaling_type not in ("none", "linear"):
        raise ConfigError(f"{source}: llama.rope.scaling.type={scaling_type!r}; supported: none, linear")
    scaling = RopeScaling("linear", float(field(reader, "llama.rope.scaling.factor"))) \
        if scaling_type == "linear" else None
    names = {t.name for t in reader.tensors}
    eos = field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=field(reader, "llama.vocab_size") or len(
            field(reader, "tokenizer.ggml.tokens")),
        hidden_size=hidden, intermediate_size=required("feed_forward_length"),
        num_hidden_layers=required("block_count"), num_attention_heads=heads,
        num_key_value_heads=field(reader, "llama.attention.head_count_kv", heads),
        head_dim=field(reader, "llama.rope.dimension_count", hidden // heads),
        rms_norm_eps=float(required("attention.layer_norm_rms_epsilon")),
        rope_theta=float(field(reader, "llama.rope.freq_base", 10000.0)), rope_scaling=scaling,
        max_position_embeddings=required("context_length"), tie_word_embeddings="output.weight" not in names,
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"), eos_token_ids=() if eos is None else (eos,))


def q_k_row_order(out_features: int, n_heads: int) -> np.ndarray:
    """Row i of the un-permuted matrix is row order[i] of the stored one."""
    return interleaved_to_half(np.arange(out_features)[:, None], n_heads)[:, 0]


def stored(tensor, data: np.ndarray | None = None) -> StoredTensor:
    """An F32/F16/BF16 GGUF tensor as the dense code reads it (16-bit types as raw bits)."""
    data = tensor.data if data is None else data
    return StoredTensor(tensor.name, tensor.tensor_type.name, data if data.dtype == np.float32 else data.view(np.uint16))


def q4_layer(data: np.ndarray, kind: str) -> PackedLayer:
    """A Q4_0 or Q4_1 tensor (out, in / 32 * block bytes) as the 4-bit kernels take it: its
    codes packed as GPTQ words, one group per block of 32 inputs, d as the group's scale and
    m as its offset (Q4_0 has none stored: m = -8 · d, exact in fp16)."""
    out = data.shape[0]
    blocks = data.reshape(out, -1, BLOCK_BYTES[kind])                             # (out, in/32, bytes)
    scales = np.ascontiguousarray(blocks[..., 0:2]).view(np.uint16)[..., 0]       # (out, in/32) fp16 bits
    if kind == "Q4_1":
        mins = np.ascontiguousarray(blocks[..., 2:4]).view(np.uint16)[..., 0]
    else:
        mins = (scales.view(np.float16) * np.float16(-8)).view(np.uint16)
    nibbles = blocks[..., 4 if kind == "Q4_1" else 2:]                            # (out, in/32, 16)
    codes = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1).reshape(out, -1)  # (out, in), ggml's order
    packed = block_columns(pack_rows(codes.T).view(np.uint32))
    release_pages(data)
    groups = codes.shape[1] // BLOCK
    return PackedLayer(packed, block_groups(scales.T, len(packed)), "F16", None, block_groups(mins.T, len(packed)),
                       np.arange(groups + 1, dtype=np.int64) * BLOCK, None, out)


def gguf_linear(tensor, rows: np.ndarray | None = None):
    """A Linear over one GGUF tensor (out, in), its rows reordered when `rows` is given."""
    data = tensor.data if rows is None else np.ascontiguousarray(tensor.data[rows])
    kind = tensor.tensor_type.name
    if is_dense(tensor):
        return DenseLinear(stored(tensor, data))
    if kind in ("Q4_0", "Q4_1"):
        return GPTQLinear(tensor.name, q4_layer(data, kind))
    if kind in MATMUL_KINDS:
        return GGUFLinear(tensor.name, data, kind)
    return DenseLinear(StoredTensor(tensor.name, "F16", dequantized_f16(tensor, rows)))


def dequantized_f16(tensor, rows: np.ndarray | None = None) -> np.ndarray:
    """Any other type, through gguf.quants: (out, in) fp16 bits."""
    dequantized = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    dequantized = dequantized if rows is None else dequantized[rows]
    return dequantized.astype(np.float16).view(np.uint16)


def embedding_table(tensor):
    """The token embedding for row lookups: as stored when dense or block-quantized."""
    if is_dense(tensor):
        return stored(tensor)
    if tensor.tensor_type.name in BLOCK_BYTES:
        return GGUFLinear(tensor.name, tensor.data, tensor.tensor_type.name)
    return StoredTensor(tensor.name, "F16", dequantized_f16(tensor))


def vector(tensor) -> np.ndarray:
    """A norm weight (hidden,) as float32."""
    if not is_dense(tensor):
        raise CheckpointError(f"{tensor.name}: a norm weight must be F32, F16 or BF16, got {tensor.tensor_type.name}")
    return stored(tensor).to_float32()


def load_gguf(path: str | Path) -> tuple[ModelConfig, Weights, Tokenizer]:
    """Config, weights and tokenizer of a GGUF file. A file the gguf package cannot parse, or
    whose metadata has the wrong types or sizes, is a CheckpointError naming the file and
    what the parser said (tests/test_checkpoint_fuzz.py mutates files to find these)."""
    path = Path(path)
    try:
        return read_gguf(path)
    except LlamaRefError:
        raise
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError, OverflowError, MemoryError) as err:
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from None


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Each tensor's (out, in) shape, or (n,), from the config; layer tensors by their name after "blk.N."."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return {"attn_norm.weight": (hidden,), "ffn_norm.weight": (hidden,), "attn_q.weight": (q, hidden),
            "attn_k.weight": (kv, hidden), "attn_v.weight": (kv, hidden), "attn_output.weight": (hidden, q),
            "ffn_gate.weight": (inter, hidden), "ffn_up.weight": (inter, hidden), "ffn_down.weight": (hidden, inter),
            "token_embd.weight": (config.vocab_size, hidden), "output.weight": (config.vocab_size, hidden),
            "output_norm.weight": (hidden,)}


def check_data_regions(reader: gguf.GGUFReader, path: Path) -> None:
    """Every tensor's bytes lie inside the file and apart from every other tensor's, as a
    writer lays them out (the gguf package checks neither)."""
    size = len(reader.data)
    regions = sorted((t.data_offset, t.data_offset + t.n_bytes, t.name) for t in reader.tensors)
    for (start, end, name), following in zip(regions, regions[1:] + [(size, size, None)]):
        if end > size:
            raise CheckpointError(f"{path}: tensor {name} ends at byte {end}, past the end of the file ({size})")
        if end > following[0]:
            raise CheckpointError(f"{path}: tensors {name} and {following[2]} overlap")


# GGUF's value types: their sizes in bytes (8: string, 9: array are read as such).
SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
MAX_ARRAY = 1 << 22        # items of one metadata array: real vocabularies and merge lists have < 1M
MAX_DIMS = 4


def check_structure(path: Path) -> None:
    """Walk the header, metadata and tensor table with every length and count checked against
    the bytes left, before the gguf package parses them: a corrupt count makes it build a
    Python object per claimed item, which takes minutes and gigabytes for a file of kilobytes."""
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        at = 0

        def take(fmt: str):
            nonlocal at
            size = struct.calcsize("<" + fmt)
            if at + size > len(data):
                raise CheckpointError(f"{path}: the header ends early, at byte {at}")
            values = struct.unpack_from("<" + fmt, data, at)
            at += size
            return values[0] if len(values) == 1 else values

        def string(what: str) -> None:
            nonlocal at
            length = take("Q")
            if length > len(data) - at:
                raise CheckpointError(f"{path}: {what} claims {length} bytes at byte {at}; {len(data) - at} are left")
            at += length

        def value(kind: int, what: str) -> None:
            nonlocal at
            if kind == 8:
                string(what)
            elif kind == 9:
                item, count = take("IQ")
                if count > MAX_ARRAY or count * SCALAR_BYTES.get(item, 8) > len(data) - at:
                    raise CheckpointError(f"{path}: {what} claims {count} items at byte {at}")
                if item in SCALAR_BYTES:
                    at += count * SCALAR_BYTES[item]
                else:
                    for _ in range(count):
                        value(item, what)
            elif kind in SCALAR_BYTES:
                at += SCALAR_BYTES[kind]
            else:
                raise CheckpointError(f"{path}: {what} has value type {kind}, which GGUF does not define")

        if take("4s") != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic)")
        version, tensor_count, kv_count = take("IQQ")
        if version not in (2, 3) or tensor_count > len(data) // 24 or kv_count > len(data) // 12:
            raise CheckpointError(f"{path}: GGUF version {version} with {tensor_count} tensors and {kv_count} "
                                  "metadata entries cannot be read")
        for i in range(kv_count):
            string(f"metadata key {i}")
            value(take("I"), f"metadata entry {i}")
        for i in range(tensor_count):
            string(f"tensor {i}'s name")
            dims = take("I")
            if not 1 <= dims <= MAX_DIMS:
                raise CheckpointError(f"{path}: tensor {i} has {dims} dimensions")
            take(f"{dims}QIQ")


def read_gguf(path: Path) -> tuple[ModelConfig, Weights, Tokenizer]:
    check_structure(path)
    reader = MappedReader(path)
    config = gguf_config(reader, str(path))
    tensors = {t.name: t for t in reader.tensors}
    check_data_regions(reader, path)
    shapes = expected_shapes(config)

    def get(name):
        if name not in tensors:
            raise CheckpointError(f"{path}: tensor {name} is missing")
        tensor = tensors[name]
        shape = tuple(int(d) for d in tensor.shape[::-1])                 # GGUF lists dimensions innermost first
        expected = shapes[name.split(".", 2)[-1] if name.startswith("blk.") else name]
        if shape != expected:
            raise CheckpointError(f"{path}: tensor {name} has shape {list(shape)}, the metadata makes it "
                                  f"{list(expected)}")
        return tensor
    layers = []
    for i in range(config.num_hidden_layers):
        parts = {}
        for short, meta in LAYER_NAMES.items():
            tensor = get(f"blk.{i}.{short}.weight")
            if short.endswith("norm"):
                parts[meta] = vector(tensor)
            elif short in ("attn_q", "attn_k"):
                heads = config.num_attention_heads if short == "attn_q" else config.num_key_value_heads
                parts[meta] = gguf_linear(tensor, q_k_row_order(tensor.data.shape[0], heads))
            else:
                parts[meta] = gguf_linear(tensor)
        layers.append(fuse_projections(Layer(**parts)))
    table = embedding_table(get("token_embd.weight"))
    output = gguf_linear(get("output.weight" if "output.weight" in tensors else "token_embd.weight"))
    weights = Weights(tok_embeddings=table, layers=tuple(layers), norm=vector(get("output_norm.weight")),
                      output=output)
    return config, weights, load_gguf_tokenizer(reader)
