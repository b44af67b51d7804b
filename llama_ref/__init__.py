"""llama-ref: a reference inference engine for Llama-2-family models in NumPy and Numba."""
__version__ = "0.1.0"

from .config import ModelConfig
from .errors import CheckpointError, ConfigError, ContextLengthError, LlamaRefError
from .generation import Choice, Completion, Generation, TokenEvent
from .loader import load_model
from .model import KVCache, Model
from .sampling import Sampler, SamplingParams, SamplingParamsError, SamplingTrace

__all__ = ["CheckpointError", "Choice", "Completion", "ConfigError", "ContextLengthError", "Generation", "KVCache",
           "LlamaRefError", "Model", "ModelConfig", "Sampler", "SamplingParams", "SamplingParamsError",
           "SamplingTrace", "TokenEvent", "load_model"]
