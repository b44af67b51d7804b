"""llama-ref: a reference inference engine for Llama-2-family models in NumPy and Numba."""
from .config import ModelConfig
from .errors import CheckpointError, ConfigError, ContextLengthError, LlamaRefError
from .loader import load_model
from .model import KVCache, Model
from .sampling import Sampler, SamplingParams, SamplingParamsError

__all__ = ["CheckpointError", "ConfigError", "ContextLengthError", "KVCache", "LlamaRefError",
           "Model", "ModelConfig", "Sampler", "SamplingParams", "SamplingParamsError", "load_model"]
