"""ModelConfig: the hyper-parameters of a Llama-family checkpoint, read from its config.json.

Readable keys follow transformers' LlamaConfig / MistralConfig (4.x and 5.x spellings). A key
that would change the computation and that this engine does not implement is an error that
names it; keys that do not change the math (dropout, initializer_range, use_cache, ...) are
ignored.
"""
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ConfigError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """A RoPE frequency scaling, as transformers' modeling_rope_utils defines it."""
    rope_type: str                       # "linear" | "dynamic" | "llama3"
    factor: float
    low_freq_factor: float | None = None  # llama3 only
    high_freq_factor: float | None = None  # llama3 only
    original_max_position_embeddings: int | None = None  # llama3 only


@dataclass(frozen=True)
class ModelConfig:
    architecture: str            # "LlamaForCausalLM" | "MistralForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None

    @property
    def context_length(self) -> int:
        """The longest sequence the model computes exactly.

        max_position_embeddings, except: dynamic NTK scaling exists to run past it (the
        limit becomes max_position_embeddings * factor), and a Mistral sliding window, which
        this engine does not implement, is exact only while the sequence fits in the window.
        """
        length = self.max_position_embeddings
        if self.rope_scaling is not None and self.rope_scaling.rope_type == "dynamic":
            length = int(length * self.rope_scaling.factor)
        if self.sliding_window is not None:
            length = min(length, self.sliding_window)
        return length

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json in the model directory") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "ModelConfig":
        architecture = _architecture(raw, source)
        _reject_unsupported(raw, source)
        hidden, heads = _required(raw, "hidden_size", source), _required(raw, "num_attention_heads", source)
        rope_theta, rope_scaling = _rope(raw, source)
        config = cls(
            architecture=architecture,
            vocab_size=_required(raw, "vocab_size", source),
            hidden_size=hidden,
            intermediate_size=_required(raw, "intermediate_size", source),
            num_hidden_layers=_required(raw, "num_hidden_layers", source),
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or hidden // heads,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=_required(raw, "max_position_embeddings", source),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            sliding_window=raw.get("sliding_window") if architecture == "MistralForCausalLM" else None,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_ids(raw.get("eos_token_id")),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        )
        if config.num_attention_heads % config.num_key_value_heads:
            raise ConfigError(f"{source}: num_attention_heads ({heads}) must be a multiple of "
                              f"num_key_value_heads ({config.num_key_value_heads})")
        if config.head_dim % 2:
            raise ConfigError(f"{source}: head_dim must be even for RoPE, got {config.head_dim}")
        return config

    def to_hf_dict(self) -> dict:
        """The config.json transformers writes for this model (the inverse of from_dict)."""
        raw = {"architectures": [self.architecture], "model_type": ARCHITECTURES[self.architecture],
               "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
               "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
               "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
               "head_dim": self.head_dim, "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
               "rope_theta": self.rope_theta, "max_position_embeddings": self.max_position_embeddings,
               "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
               "mlp_bias": self.mlp_bias, "bos_token_id": self.bos_token_id,
               "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else
               (self.eos_token_ids[0] if self.eos_token_ids else None)}
        if self.rope_scaling is not None:
            raw["rope_scaling"] = {key: value for key, value in asdict(self.rope_scaling).items() if value is not None}
        if self.sliding_window is not None:
            raw["sliding_window"] = self.sliding_window
        if self.torch_dtype is not None:
            raw["torch_dtype"] = self.torch_dtype
        return raw


def _architecture(raw: dict, source: str) -> str:
    names = raw.get("architectures") or []
    known = [name for name in names if name in ARCHITECTURES]
    if len(names) != 1 or not known:
        raise ConfigError(f"{source}: architectures={names!r}; supported: {sorted(ARCHITECTURES)}")
    model_type = raw.get("model_type")
    if model_type is not None and model_type != ARCHITECTURES[known[0]]:
        raise ConfigError(f"{source}: model_type={model_type!r} does not match architecture {known[0]}")
    return known[0]


def _reject_unsupported(raw: dict, source: str) -> None:
    """Keys that would change the math and that the forward pass does not implement."""
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act={act!r}; only 'silu' (SwiGLU) is supported")
    quantization = raw.get("quantization_config") or {}
    if not isinstance(quantization, dict):
        raise ConfigError(f"{source}: quantization_config must be an object, got {json.dumps(quantization)[:40]}")
    method = quantization.get("quant_method", "gptq")
    if method != "gptq":
        raise ConfigError(f"{source}: quantization_config has quant_method={method!r}; only GPTQ is supported")
    partial = raw.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise ConfigError(f"{source}: partial_rotary_factor={partial}; only 1.0 is supported")


def _rope(raw: dict, source: str) -> tuple[float, RopeScaling | None]:
    """rope_theta and scaling from transformers 4.x (`rope_theta`, `rope_scaling`) or 5.x
    (`rope_parameters`, which holds both)."""
    params = dict(raw.get("rope_parameters") or {})
    if params and "rope_type" not in params and "type" not in params:
        raise ConfigError(f"{source}: rope_parameters must be one dict for all layers; "
                          "per-layer-type RoPE is not supported")
    params.update(raw.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"{source}: rope_scaling type {rope_type!r} is not supported; "
                          f"supported: {', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    factor = params.get("factor")
    if not isinstance(factor, (int, float)) or factor <= 0:
        raise ConfigError(f"{source}: rope_scaling.factor must be a positive number, got {factor!r}")
    if rope_type != "llama3":
        return theta, RopeScaling(rope_type, float(factor))
    missing = [k for k in ("low_freq_factor", "high_freq_factor") if k not in params]
    if missing:
        raise ConfigError(f"{source}: llama3 rope_scaling needs {', '.join(missing)}")
    original = params.get("original_max_position_embeddings", raw.get("max_position_embeddings"))
    return theta, RopeScaling("llama3", float(factor), float(params["low_freq_factor"]),
                              float(params["high_freq_factor"]), int(original))


def _required(raw: dict, key: str, source: str) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)
