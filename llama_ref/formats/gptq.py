"""GPTQ checkpoints: which variant a directory holds, and its packed layers made ready for
the kernels (kernels/gptq.py). The formats are described in docs/formats.md.

Variants read:
- AutoGPTQ, gptqmodel, transformers/optimum: quantize_config.json, quant_config.json or
  config.json's quantization_config, with `format` (gptqmodel) or `checkpoint_format`
  (AutoGPTQ): "gptq" = v1, the stored zero point is zero - 1; "gptq_v2" stores it as is.
  Everything else in those files is tolerated.
- GPTQ-for-LLaMa's 2023 files (pygmalion-13b-4bit-128g): no config at all, no g_idx, fp32
  scales, all-zero biases. Without a config: 4 bits, v1, the group size from the shapes.

Decisions:
- v1 nibble 0xF (a zero point of 0 stored as -1, which the packers of the time also spilled
  into the higher nibbles): read as zero = 16, that is nibble + 1 with no wrap, as
  GPTQ-for-LLaMa's CUDA kernel, exllama and AutoGPTQ's qlinear_cuda read it, the kernels
  these files were made for. A checkpoint that holds such a nibble gets a warning.
- g_idx missing or all zero: row i is in group i // group_size (exllama does the same).
- act-order (any other g_idx): rows are sorted by group once at load, codes repacked, and
  x is permuted the same way at every call, so each group is one contiguous run of rows.
- The packed words are copied once at load into the kernels' blocked layout (64 output
  columns per contiguous block) and the file's mapped pages are released, so the copy does
  not add to the resident size.
"""
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, ConfigError
from ..kernels.gptq import CODES_PER_WORD, block_columns, block_groups, pack_rows, unpack_columns, unpack_rows
from .safetensors import DENSE_STORAGE, StoredTensor, release_pages

CONFIG_FILES = ("quantize_config.json", "quant_config.json")
FORMATS = {"gptq": 1, "gptq_v2": 2}


@dataclass(frozen=True)
class GPTQConfig:
    bits: int = 4
    group_size: int = -1        # -1: one group spanning the whole input
    desc_act: bool = False      # informational: g_idx says what the rows really are
    sym: bool = True            # informational: the zero points are stored either way
    version: int = 1            # 1: stored zero = zero - 1 ("gptq"); 2: stored as is ("gptq_v2")
    source: str = ""

    @classmethod
    def from_dict(cls, raw: dict, source: str) -> "GPTQConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: must be a JSON object, got {json.dumps(raw)[:40]}")
        method = raw.get("quant_method", "gptq")
        if method != "gptq":
            raise ConfigError(f"{source}: quant_method={method!r}; only GPTQ checkpoints are supported")
        if raw.get("is_marlin_format"):
            raise ConfigError(f"{source}: is_marlin_format=true; the Marlin repacking is not supported")
        fmt = raw.get("format") or raw.get("checkpoint_format") or "gptq"
        if not isinstance(fmt, str) or fmt not in FORMATS:
            raise ConfigError(f"{source}: format={fmt!r}; supported: {', '.join(FORMATS)}")
        bits = raw.get("bits", raw.get("w_bit", 4))
        if bits != 4:
            raise ConfigError(f"{source}: bits={bits}; only 4-bit GPTQ is supported")
        group_size = raw.get("group_size", raw.get("q_group_size", -1))
        if not isinstance(group_size, int) or not (group_size == -1 or (group_size > 0 and group_size % 8 == 0)):
            raise ConfigError(f"{source}: group_size={group_size!r}; must be -1 or a positive multiple of 8")
        return cls(bits, group_size, bool(raw.get("desc_act", False)), bool(raw.get("sym", True)), FORMATS[fmt], source)


def find_gptq_config(directory: Path, raw_config: dict, tensor_names) -> GPTQConfig | None:
    """The directory's GPTQ config (quantize_config.json, quant_config.json, then config.json's
    quantization_config); a legacy default when only the tensors say GPTQ; None when dense."""
    for name in CONFIG_FILES:
        if (directory / name).exists():
            try:
                return GPTQConfig.from_dict(json.loads((directory / name).read_text()), str(directory / name))
            except json.JSONDecodeError as err:
                raise ConfigError(f"{directory / name}: not valid JSON ({err})") from None
    if raw_config.get("quantization_config") is not None:
        return GPTQConfig.from_dict(raw_config["quantization_config"], f"{directory / 'config.json'}: quantization_config")
    if any(name.endswith(".qweight") for name in tensor_names):
        return GPTQConfig(source=f"{directory} (no quantization config: GPTQ-for-LLaMa defaults, v1 zero points)")
    return None


@dataclass(frozen=True)
class PackedLayer:
    """One quantized Linear in the kernels' order and layout (see kernels/gptq.py). Each group
    has either a zero point (GPTQ: W = scale · (code - zero)) or a min (GGUF Q4_0/Q4_1:
    W = scale · code + min): exactly one of `zeros` and `mins` is set."""
    blocks: np.ndarray         # (out/64, in/8, 64) uint32, rows sorted by group, columns padded to 64
    scales: np.ndarray         # (out/64, groups, 64) as stored: fp16/bf16 bits (uint16) or float32
    scale_storage: str         # "F16" | "BF16" | "F32"
    zeros: np.ndarray | None   # (out/64, groups, 64) uint8, the true zero points
    mins: np.ndarray | None    # (out/64, groups, 64) uint16, fp16 bits of each group's min
    group_starts: np.ndarray   # (groups + 1,) int64, multiples of 8
    permutation: np.ndarray | None  # (in,) input rows in kernel order; None when already in order
    out_features: int

    def __post_init__(self):
        if (self.zeros is None) == (self.mins is None):
            raise ValueError("PackedLayer: exactly one of zeros and mins must be given")

    @property
    def with_min(self) -> bool:
        return self.mins is not None

    @property
    def offsets(self) -> np.ndarray:
        """What the kernels take beside the scales: the zero points, or the mins (with_min)."""
        return self.zeros if self.mins is None else self.mins


def group_index(g_idx: np.ndarray | None, in_features: int, groups: int, group_size: int) -> np.ndarray:
    """The group of each input row: g_idx when it says something, else i // group_size."""
    if g_idx is not None and g_idx.any():
        return g_idx.astype(np.int64)
    size = group_size if group_size > 0 else -(-in_features // groups)
    return np.arange(in_features) // size


def prepare_layer(prefix: str, qweight: StoredTensor, qzeros: StoredTensor, scales: StoredTensor,
                  g_idx: StoredTensor | None, config: GPTQConfig) -> PackedLayer:
    """Check the shapes, decode the zero points, and sort act-order rows by group."""
    rows, out = qweight.shape
    in_features, groups = rows * CODES_PER_WORD, scales.shape[0]
    if qweight.dtype != "I32" or qzeros.dtype != "I32":
        raise CheckpointError(f"{prefix}: qweight and qzeros must be int32, got {qweight.dtype} and {qzeros.dtype}")
    if qzeros.shape != (groups, out // CODES_PER_WORD) or scales.shape != (groups, out):
        raise CheckpointError(f"{prefix}: qzeros {list(qzeros.shape)} and scales {list(scales.shape)} do not fit "
                              f"qweight {list(qweight.shape)} (expected [{groups}, {out // 8}] and [{groups}, {out}])")
    if config.group_size > 0 and groups != -(-in_features // config.group_size):
        raise CheckpointError(f"{prefix}: scales has {groups} groups; group_size {config.group_size} over "
                              f"{in_features} inputs makes {-(-in_features // config.group_size)}")
    if g_idx is not None and g_idx.shape != (in_features,):
        raise CheckpointError(f"{prefix}: g_idx has shape {list(g_idx.shape)}, expected [{in_features}]")
    group_of_row = group_index(None if g_idx is None else g_idx.data, in_features, groups, config.group_size)
    if group_of_row.min() < 0 or group_of_row.max() >= groups:
        raise CheckpointError(f"{prefix}: g_idx refers to group {int(group_of_row.max())}, but there are {groups}")
    stored = unpack_columns(qzeros.data)
    if config.version == 1 and (stored == 15).any():
        warnings.warn(f"{prefix}: v1 zero point nibble 0xF (a zero point of 0 written as -1, which also corrupts "
                      "the higher nibbles of its word); read as 16, as GPTQ-for-LLaMa's CUDA kernel and exllama do",
                      stacklevel=2)
    zeros = stored + np.uint8(1 if config.version == 1 else 0)
    counts = np.bincount(group_of_row, minlength=groups)
    group_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    if (group_starts % CODES_PER_WORD).any():
        raise CheckpointError(f"{prefix}: groups of {counts.tolist()[:4]}... rows; every group must be a multiple "
                              "of 8 rows")
    words = qweight.data.view(np.uint32)
    permutation = None
    if (np.diff(group_of_row) < 0).any():
        permutation = np.argsort(group_of_row, kind="stable")
        words = pack_rows(unpack_rows(qweight.data)[permutation]).view(np.uint32)
    blocks = block_columns(words)
    release_pages(qweight.data)          # the blocked copy replaces the mapped file pages
    if scales.dtype not in DENSE_STORAGE:
        raise CheckpointError(f"{prefix}: scales must be F16, BF16 or F32, got {scales.dtype}")
    return PackedLayer(blocks, block_groups(scales.data, len(blocks)), scales.dtype, block_groups(zeros, len(blocks)),
                       None, group_starts, permutation, out)
