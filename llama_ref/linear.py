"""Linear layers: the model calls `linear(x)` without knowing how the weight is stored.

Every implementation maps x (n, in_features) float32 -> (n, out_features) float32 and
exposes `in_features` and `out_features`. Dense weights (fp32/fp16/bf16) live here;
quantized formats add their own classes with the same two attributes and call.
"""
import numpy as np

from .errors import CheckpointError
from .gptq import PackedLayer
from .kernels import STORAGE_DTYPES, ggml, matmul, widen_numpy
from .kernels.gptq import CODES_PER_WORD, dequantize_tile, gptq_matmul
from .weights import StoredTensor


class DenseLinear:
    """y = x Wᵀ + b, W (out, in) stored as fp32, fp16 or bf16 and widened inside the kernel."""

    def __init__(self, weight: StoredTensor, bias: StoredTensor | None = None):
        if weight.dtype not in STORAGE_DTYPES or weight.data.ndim != 2:
            raise CheckpointError(f"tensor {weight.name}: a dense linear weight must be a 2-D "
                                  f"F32/F16/BF16 tensor, got {weight.dtype} {list(weight.shape)}")
        self.name = weight.name
        self.storage = weight.dtype
        self.weight = weight.data                   # (out, in), stored dtype, memory-mapped
        self.bias = None if bias is None else bias.to_float32()  # (out,)
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = matmul(x, self.weight, self.storage)    # (n, out)
        if self.bias is not None:
            y += self.bias
        return y

    def dequantize(self) -> np.ndarray:
        """W (out, in) float32."""
        return widen_numpy(self.weight, self.storage)


class GPTQLinear:
    """y = x W + b with W the 4-bit GPTQ weight (in, out), kept packed (see llama_ref/gptq.py)."""

    def __init__(self, name: str, layer: PackedLayer, bias: np.ndarray | None = None):
        self.name = name
        self.layer = layer
        self.bias = bias                         # (out,) float32 or None
        self.in_features = layer.blocks.shape[1] * CODES_PER_WORD
        self.out_features = layer.out_features

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.layer.permutation is not None:
            x = x[:, self.layer.permutation]     # act-order: the rows' group order
        layer = self.layer
        y = gptq_matmul(np.ascontiguousarray(x, dtype=np.float32), layer.blocks, layer.scales, layer.zeros,
                        layer.group_starts, layer.scale_storage, layer.with_min)[:, :self.out_features]
        if self.bias is not None:
            y += self.bias
        return y

    def dequantize(self) -> np.ndarray:
        """W (out, in) float32, inputs in the checkpoint's order."""
        layer = self.layer
        columns = layer.blocks.shape[0] * layer.blocks.shape[2]
        w = dequantize_tile(layer.blocks, layer.scales, layer.zeros, layer.group_starts, 0, columns,
                            layer.scale_storage, layer.with_min)[:, :self.out_features]   # (in, out), kernel order
        if layer.permutation is not None:
            restored = np.empty_like(w)
            restored[layer.permutation] = w
            w = restored
        return np.ascontiguousarray(w.T)


class GGUFLinear:
    """y = x Wᵀ with W (out, in) in one of llama.cpp's block formats (Q8_0, Q4_0, Q4_1), kept
    as stored: `data` (out, in / 32 * block bytes) uint8 (see kernels/ggml.py)."""

    def __init__(self, name: str, data: np.ndarray, kind: str):
        self.name = name
        self.data = data
        self.kind = kind
        self.out_features = data.shape[0]
        self.in_features = data.shape[1] // ggml.BLOCK_BYTES[kind] * ggml.BLOCK

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ggml.matmul(x, self.data, self.kind)

    def rows(self, ids) -> np.ndarray:
        """Rows of W, dequantized (for an embedding table stored this way).  (len(ids), in) float32."""
        return ggml.dequantize_numpy(self.data[ids], self.kind)

    def dequantize(self) -> np.ndarray:
        """W (out, in) float32."""
        return ggml.dequantize_numpy(self.data, self.kind)


Linear = DenseLinear | GPTQLinear | GGUFLinear
