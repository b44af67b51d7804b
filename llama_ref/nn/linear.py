"""Linear layers: the model calls `linear(x)` without knowing how the weight is stored.

Every storage implements the `Linear` protocol: dense fp32/fp16/bf16 weights (DenseLinear),
4-bit GPTQ and GGUF Q4 weights on the packed kernels (GPTQLinear, several of them possibly
sharing one FusedGPTQ), and GGUF Q8_0 blocks (GGUFLinear).
"""
import dataclasses
from typing import Protocol

import numpy as np

from ..errors import CheckpointError
from ..formats.gptq import PackedLayer
from ..formats.safetensors import DENSE_STORAGE, StoredTensor
from ..kernels import ggml, matmul, widen_numpy
from ..kernels.gptq import CODES_PER_WORD, dequantize_tile, gptq_matmul


class Linear(Protocol):
    """y = x Wᵀ + b:  x (n, in_features) float32 -> (n, out_features) float32."""
    name: str                       # the checkpoint's tensor name, for messages
    in_features: int
    out_features: int
    bias: np.ndarray | None         # (out_features,) float32
    fused: "FusedGPTQ | None"       # the packed matrix this Linear shares with others, if any

    def __call__(self, x: np.ndarray) -> np.ndarray: ...

    def dequantize(self) -> np.ndarray:
        """W (out_features, in_features) float32, inputs in the checkpoint's order."""


class DenseLinear:
    """y = x Wᵀ + b, W (out, in) stored as fp32, fp16 or bf16 and widened inside the kernel."""

    def __init__(self, weight: StoredTensor, bias: StoredTensor | None = None):
        if weight.dtype not in DENSE_STORAGE or weight.data.ndim != 2:
            raise CheckpointError(f"tensor {weight.name}: a dense linear weight must be a 2-D "
                                  f"F32/F16/BF16 tensor, got {weight.dtype} {list(weight.shape)}")
        self.name = weight.name
        self.storage = weight.dtype
        self.weight = weight.data                   # (out, in), stored dtype, memory-mapped
        self.bias = None if bias is None else bias.to_float32()  # (out,)
        self.out_features, self.in_features = weight.shape
        self.fused = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = matmul(x, self.weight, self.storage)    # (n, out)
        if self.bias is not None:
            y += self.bias
        return y

    def dequantize(self) -> np.ndarray:
        """W (out, in) float32."""
        return widen_numpy(self.weight, self.storage)


class GPTQLinear:
    """y = x W + b with W the 4-bit GPTQ weight (in, out), kept packed (see formats/gptq.py)."""

    def __init__(self, name: str, layer: PackedLayer, bias: np.ndarray | None = None):
        self.name = name
        self.layer = layer
        self.bias = bias                         # (out,) float32 or None
        self.in_features = layer.blocks.shape[1] * CODES_PER_WORD
        self.out_features = layer.out_features
        self.fused = None                        # the FusedGPTQ this Linear is part of, if any

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = packed_matmul(x, self.layer)[:, :self.out_features]
        if self.bias is not None:
            y += self.bias
        return y

    def dequantize(self) -> np.ndarray:
        """W (out, in) float32, inputs in the checkpoint's order."""
        layer = self.layer
        columns = layer.blocks.shape[0] * layer.blocks.shape[2]
        w = dequantize_tile(layer.blocks, layer.scales, layer.offsets, layer.group_starts, 0, columns,
                            layer.scale_storage, layer.with_min)[:, :self.out_features]   # (in, out), kernel order
        if layer.permutation is not None:
            restored = np.empty_like(w)
            restored[layer.permutation] = w
            w = restored
        return np.ascontiguousarray(w.T)


def packed_matmul(x: np.ndarray, layer: PackedLayer) -> np.ndarray:
    """x @ W for a packed 4-bit W.  Returns (n, out padded to 64)."""
    if layer.permutation is not None:
        x = x[:, layer.permutation]              # act-order: the rows' group order
    return gptq_matmul(np.ascontiguousarray(x, dtype=np.float32), layer.blocks, layer.scales, layer.offsets,
                       layer.group_starts, layer.scale_storage, layer.with_min)


class FusedGPTQ:
    """GPTQLinears that read the same input (q, k, v; gate, up) stored as one packed matrix,
    so that one kernel call streams them all: fewer calls, longer streams (5120-wide q, k, v:
    3 x 1.05 ms apart, measured on a 2-core EPYC). Each member keeps working alone, its arrays views into
    the shared ones."""

    def __init__(self, linears: list[GPTQLinear]):
        first = linears[0].layer
        offsets = "mins" if first.with_min else "zeros"      # the one of the two the layers hold
        blocks = np.concatenate([linear.layer.blocks for linear in linears])
        self.layer = dataclasses.replace(                                   # every member's padded columns
            first, blocks=blocks, scales=np.concatenate([linear.layer.scales for linear in linears]),
            **{offsets: np.concatenate([linear.layer.offsets for linear in linears])},
            out_features=blocks.shape[0] * blocks.shape[2])
        self.members, self.columns = [], []
        start = 0
        for linear in linears:
            stop = start + len(linear.layer.blocks)
            part = dataclasses.replace(linear.layer, blocks=self.layer.blocks[start:stop],
                                       scales=self.layer.scales[start:stop],
                                       **{offsets: self.layer.offsets[start:stop]})
            member = GPTQLinear(linear.name, part, linear.bias)
            member.fused = self
            self.members.append(member)
            self.columns.append(start * first.blocks.shape[2])
            start = stop

    @staticmethod
    def compatible(linears) -> bool:
        """Same kind of packed layer over the same inputs, grouped the same way."""
        if len(linears) < 2 or not all(isinstance(linear, GPTQLinear) for linear in linears):
            return False
        first = linears[0].layer
        return all(linear.layer.blocks.shape[1:] == first.blocks.shape[1:]
                   and linear.layer.scale_storage == first.scale_storage and linear.layer.with_min == first.with_min
                   and np.array_equal(linear.layer.group_starts, first.group_starts)
                   and (linear.layer.permutation is None) == (first.permutation is None)
                   and (first.permutation is None or np.array_equal(linear.layer.permutation, first.permutation))
                   for linear in linears[1:])

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        y = packed_matmul(x, self.layer)                                   # (n, all members' padded columns)
        outputs = []
        for member, start in zip(self.members, self.columns):
            part = y[:, start:start + member.out_features]
            outputs.append(part + member.bias if member.bias is not None else part)
        return outputs


def fuse(*linears) -> tuple:
    """The linears as members of one FusedGPTQ when they can share it, else unchanged."""
    return tuple(FusedGPTQ(list(linears)).members) if FusedGPTQ.compatible(linears) else linears


def project(x: np.ndarray, *linears) -> list[np.ndarray]:
    """[linear(x) for linear in linears], in one kernel call when they were fused together."""
    fused = linears[0].fused
    if fused is not None and list(linears) == fused.members:
        return fused(x)
    return [linear(x) for linear in linears]


class GGUFLinear:
    """y = x Wᵀ with W (out, in) in llama.cpp's Q8_0 block format, kept as stored: `data`
    (out, in / 32 * block bytes) uint8 (see kernels/ggml.py). Also an embedding table in any
    of the block formats, for its `rows`."""

    def __init__(self, name: str, data: np.ndarray, kind: str):
        self.name = name
        self.data = data
        self.kind = kind
        self.out_features = data.shape[0]
        self.in_features = data.shape[1] // ggml.BLOCK_BYTES[kind] * ggml.BLOCK
        self.bias = None
        self.fused = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ggml.matmul(x, self.data, self.kind)

    def rows(self, ids) -> np.ndarray:
        """Rows of W, dequantized (for an embedding table stored this way).  (len(ids), in) float32."""
        return ggml.dequantize_numpy(self.data[ids], self.kind)

    def dequantize(self) -> np.ndarray:
        """W (out, in) float32."""
        return ggml.dequantize_numpy(self.data, self.kind)

