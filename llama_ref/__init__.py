"""llama-ref: a reference inference engine for Llama-2-family models in NumPy and Numba."""
__version__ = "0.1.0"

from .api import Model, load_model
from .config import ModelConfig
from .decoding.generation import Choice, Completion, Generation, TokenEvent
from .decoding.params import SamplingParams, SamplingParamsError
from .decoding.sampling import Sampler
from .decoding.trace import SamplingTrace
from .errors import CheckpointError, ConfigError, ContextLengthError, LlamaRefError
from .nn.transformer import KVCache

__all__ = ["CheckpointError", "Choice", "Completion", "ConfigError", "ContextLengthError", "Generation", "KVCache",
           "LlamaRefError", "Model", "ModelConfig", "Sampler", "SamplingParams", "SamplingParamsError",
           "SamplingTrace", "TokenEvent", "load_model"]
