"""Reading safetensors checkpoints as memory-mapped NumPy arrays, without copying.

The safetensors library's NumPy API copies every tensor into memory and cannot return
bf16 at all, so this module reads the (simple, specified) file layout itself: an 8-byte
little-endian header length, a JSON header mapping each name to dtype, shape and byte
offsets, then the raw little-endian data. Each tensor is a view into one np.memmap of its
file, so pages are read from disk only when the forward pass touches them and a 13B fp16
model costs no more resident memory than its file.

bf16 has no NumPy dtype: it is kept as its raw uint16 bit pattern, fp16 likewise (the
kernels widen both on the fly; see kernels/convert.py).
"""
import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..kernels import widen_numpy

# safetensors dtype -> the NumPy dtype its bytes are viewed as: the project's one dtype table
DTYPES = {"F32": np.float32, "F16": np.uint16, "BF16": np.uint16, "F64": np.float64,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
          "U8": np.uint8, "BOOL": np.bool_}
DENSE_STORAGE = ("F32", "F16", "BF16")   # the float storages the dense kernels widen (GGUF's names too)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as it lies in the file: `data` is a read-only view of the mapped bytes."""
    name: str
    dtype: str          # safetensors dtype name: "F32", "F16", "BF16", "I32", ...
    data: np.ndarray    # shape as stored; F16/BF16 as uint16 bit patterns

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    def dense(self) -> "StoredTensor":
        """This tensor, refused unless its storage is one the dense kernels widen."""
        if self.dtype not in DENSE_STORAGE:
            raise CheckpointError(f"tensor {self.name}: dtype {self.dtype}, where one of "
                                  f"{', '.join(DENSE_STORAGE)} is needed")
        return self

    def rows(self, ids) -> np.ndarray:
        """Rows of a 2-D tensor, widened: an embedding lookup.  (len(ids), columns) float32."""
        return widen_numpy(self.data[ids], self.dtype)

    def to_float32(self) -> np.ndarray:
        """A float32 copy: for the small tensors only (norms, biases)."""
        return widen_numpy(self.dense().data, self.dtype)


def read_safetensors(path: str | Path) -> dict[str, StoredTensor]:
    """Every tensor of one .safetensors file, memory-mapped, with its size checked."""
    path = Path(path)
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated: {file_size} bytes, no safetensors header")
        header_len = struct.unpack("<Q", prefix)[0]
        if 8 + header_len > file_size:
            raise CheckpointError(f"{path}: truncated: header claims {header_len} bytes, "
                                  f"file has {file_size}")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON object was expected)")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    mapped = np.memmap(path, dtype=np.uint8, mode="r") if file_size > data_start else None
    return {name: _view(path, mapped, data_start, file_size, name, info) for name, info in header.items()}


def _entry(path, name, info) -> tuple[str, tuple[int, ...], int, int]:
    """dtype, shape, begin, end of a header entry, each of the type and sign the format
    requires (a corrupt header may hold anything)."""
    def naturals(value, count=None) -> bool:
        return isinstance(value, list) and (count is None or len(value) == count) and \
            all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    if not (isinstance(info, dict) and isinstance(info.get("dtype"), str) and naturals(info.get("shape"))
            and naturals(info.get("data_offsets"), 2) and info["data_offsets"][0] <= info["data_offsets"][1]):
        raise CheckpointError(f"{path}: tensor {name}: a header entry needs a dtype, a shape of sizes and "
                              f"two ascending data_offsets, got {str(info)[:200]}")
    return info["dtype"], tuple(info["shape"]), *info["data_offsets"]


def _view(path, mapped, data_start, file_size, name, info) -> StoredTensor:
    dtype, shape, begin, end = _entry(path, name, info)
    if dtype not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has dtype {dtype}, which is not supported")
    np_dtype = np.dtype(DTYPES[dtype])
    if end - begin != math.prod(shape) * np_dtype.itemsize:
        raise CheckpointError(f"{path}: tensor {name}: {end - begin} bytes do not hold "
                              f"{dtype} {list(shape)}")
    if data_start + end > file_size:
        raise CheckpointError(f"{path}: truncated: tensor {name} ends at byte {data_start + end}, "
                              f"file has {file_size}")
    if end == begin:
        return StoredTensor(name, dtype, np.empty(shape, dtype=np_dtype))
    raw = mapped[data_start + begin:data_start + end]
    return StoredTensor(name, dtype, np.asarray(raw).view(np_dtype).reshape(shape))


def write_safetensors(path: Path, specs, make) -> None:
    """A safetensors file written tensor by tensor, so that no more than one tensor is in
    memory: the header first (offsets follow from the shapes), then each tensor's bytes as
    make(name, shape) returns them.  specs: [(name, safetensors dtype name, shape)]."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in specs:
        size = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)     # the data starts 8-byte aligned, as the library writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, dtype, shape in specs:
            data = make(name, shape)
            if data.shape != tuple(shape) or data.dtype.itemsize != np.dtype(DTYPES[dtype]).itemsize:
                raise ValueError(f"tensor {name}: made {data.dtype} {list(data.shape)}, declared {dtype} {list(shape)}")
            f.write(np.ascontiguousarray(data).tobytes())


def release_pages(view: np.ndarray) -> None:
    """Unmap the file pages under a view of a memory-mapped checkpoint once a copy of them has
    replaced it (they leave this process's resident size; the page cache keeps them). A no-op
    for arrays that are not file mappings."""
    top = view
    while isinstance(top.base, np.ndarray):
        top = top.base
    mapping = top.base           # the np.memmap that made the mapping holds the mmap object
    if not isinstance(mapping, mmap.mmap) or view.nbytes == 0:
        return
    start = (view.__array_interface__["data"][0] - top.__array_interface__["data"][0]
             + top.offset % mmap.ALLOCATIONGRANULARITY)
    page = mmap.PAGESIZE
    first, end = start // page * page, -(-(start + view.nbytes) // page) * page
    mapping.madvise(mmap.MADV_DONTNEED, first, min(end, len(mapping)) - first)


def read_checkpoint(directory: str | Path) -> dict[str, StoredTensor]:
    """All tensors of an HF checkpoint directory: sharded (model.safetensors.index.json),
    a single model.safetensors, or a directory holding exactly one .safetensors file."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.exists():
        return _read_sharded(directory, index)
    files = [directory / SINGLE_FILE] if (directory / SINGLE_FILE).exists() else sorted(directory.glob("*.safetensors"))
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise CheckpointError(f"{directory}: expected {SINGLE_FILE}, {INDEX_FILE} or exactly one "
                              f".safetensors file; found: {found}")
    return read_safetensors(files[0])


def _read_sharded(directory: Path, index: Path) -> dict[str, StoredTensor]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({err!r})") from None
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        if not (directory / shard).exists():
            raise CheckpointError(f"{index}: shard {shard} is missing from {directory}")
        tensors.update(read_safetensors(directory / shard))
    listed_elsewhere = [name for name, shard in weight_map.items() if name not in tensors]
    if listed_elsewhere:
        raise CheckpointError(f"{index}: tensor {listed_elsewhere[0]} is listed in shard "
                              f"{weight_map[listed_elsewhere[0]]} but is not in it")
    return tensors
