"""Linear layers: the model calls `linear(x)` without knowing how the weight is stored.

Every implementation maps x (n, in_features) float32 -> (n, out_features) float32 and
exposes `in_features` and `out_features`. Dense weights (fp32/fp16/bf16) live here;
quantized formats add their own classes with the same two attributes and call.
"""
import numpy as np

from .errors import CheckpointError
from .kernels import STORAGE_DTYPES, matmul
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
