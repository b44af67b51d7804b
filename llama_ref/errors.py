"""Errors a user can act on: each names the file, key or tensor at fault and the rule it broke.

An error about one input of a request or a call also carries that input's name as `param`
(the name the Python API uses, e.g. "top_p", "messages", "prompt"), so that the server and
the CLI report it without reading it back out of the message.
"""


class LlamaRefError(Exception):
    """Base class of every error llama-ref raises on purpose."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ConfigError(LlamaRefError, ValueError):
    """config.json asks for something this engine does not implement, or is malformed."""


class CheckpointError(LlamaRefError, ValueError):
    """A weight file is missing, truncated, or holds tensors that do not fit the config."""


class ContextLengthError(LlamaRefError, ValueError):
    """The tokens do not fit in the model's context or in the KV cache."""


class InputFileError(LlamaRefError, ValueError):
    """A file given as input (calibration or evaluation text) is missing or unreadable."""
