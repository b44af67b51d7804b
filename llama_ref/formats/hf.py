"""HF checkpoint directories: config.json + safetensors, dense or GPTQ (a Linear stored as
qweight/qzeros/scales[/g_idx] becomes a GPTQLinear), read into the forward pass's Weights.

Every tensor the config implies must be present with the right shape; anything else in the
file is an error, except the few names known to be harmless.
"""
import json
import re
from pathlib import Path

from ..config import ModelConfig
from ..errors import CheckpointError
from ..nn.linear import DenseLinear, GPTQLinear
from ..nn.transformer import Layer, Weights, fuse_projections
from ..tokenizer import Tokenizer, has_tokenizer, load_tokenizer
from .gptq import GPTQConfig, find_gptq_config, prepare_layer
from .safetensors import StoredTensor, read_checkpoint

# HF name (per layer, after "model.layers.{i}.") -> Meta name
LAYER_NAMES = {
    "input_layernorm": "attention_norm",
    "self_attn.q_proj": "wq",
    "self_attn.k_proj": "wk",
    "self_attn.v_proj": "wv",
    "self_attn.o_proj": "wo",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "w1",
    "mlp.down_proj": "w2",
    "mlp.up_proj": "w3",
}
# Saved by older transformers versions; recomputed from the config, never read.
HARMLESS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name a dense checkpoint of this config holds, with its shape."""
    hidden, inter, d = config.hidden_size, config.intermediate_size, config.head_dim
    q_out, kv_out = config.num_attention_heads * d, config.num_key_value_heads * d
    per_layer = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q_out, hidden),
        "self_attn.k_proj.weight": (kv_out, hidden),
        "self_attn.v_proj.weight": (kv_out, hidden),
        "self_attn.o_proj.weight": (hidden, q_out),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    if config.attention_bias:
        per_layer.update({"self_attn.q_proj.bias": (q_out,), "self_attn.k_proj.bias": (kv_out,),
                          "self_attn.v_proj.bias": (kv_out,), "self_attn.o_proj.bias": (hidden,)})
    if config.mlp_bias:
        per_layer.update({"mlp.gate_proj.bias": (inter,), "mlp.up_proj.bias": (inter,),
                          "mlp.down_proj.bias": (hidden,)})
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden), "model.norm.weight": (hidden,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    for i in range(config.num_hidden_layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in per_layer.items()})
    return shapes


def gptq_shapes(prefix: str, out_features: int, in_features: int) -> tuple[dict, dict]:
    """(required, optional) tensors of a GPTQ Linear in place of `prefix.weight`; a shape of
    None is checked against the others when the layer is prepared (gptq.prepare_layer)."""
    required = {prefix + ".qweight": (in_features // 8, out_features), prefix + ".qzeros": None,
                prefix + ".scales": None}
    return required, {prefix + ".g_idx": (in_features,), prefix + ".bias": (out_features,)}


def check_tensors(tensors: dict[str, StoredTensor], config: ModelConfig, source: str) -> None:
    required, optional = expected_shapes(config), {}
    for prefix in quantized_prefixes(tensors):
        if prefix + ".weight" not in required:
            raise CheckpointError(f"{source}: tensor {prefix}.qweight: the config has no linear layer {prefix}")
        out_features, in_features = required.pop(prefix + ".weight")
        gptq_required, gptq_optional = gptq_shapes(prefix, out_features, in_features)
        required.update(gptq_required)
        optional.update({k: v for k, v in gptq_optional.items() if k not in required})
    for name, shape in required.items():
        if name not in tensors:
            raise CheckpointError(f"{source}: tensor {name} is missing")
    for name, shape in {**required, **optional}.items():
        if name in tensors and shape is not None and tensors[name].shape != shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {list(tensors[name].shape)}, "
                                  f"the config implies {list(shape)}")
    # With tied embeddings transformers ignores a stored lm_head.weight; so do we.
    tolerated = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = sorted(n for n in tensors if n not in required and n not in optional and n not in tolerated
                        and not HARMLESS.fullmatch(n))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]}{more}; "
                              "the config does not use it")


def quantized_prefixes(tensors) -> list[str]:
    return sorted(name[:-len(".qweight")] for name in tensors if name.endswith(".qweight"))


def build_weights(tensors: dict[str, StoredTensor], config: ModelConfig, gptq: GPTQConfig | None = None) -> Weights:
    def linear(prefix: str) -> DenseLinear | GPTQLinear:
        if prefix + ".qweight" not in tensors:
            return DenseLinear(tensors[prefix + ".weight"], tensors.get(prefix + ".bias"))
        layer = prepare_layer(prefix, tensors[prefix + ".qweight"], tensors[prefix + ".qzeros"],
                              tensors[prefix + ".scales"], tensors.get(prefix + ".g_idx"), gptq)
        bias = tensors[prefix + ".bias"].to_float32() if prefix + ".bias" in tensors else None
        # GPTQ-for-LLaMa wrote an all-zero bias for every layer; adding it would change nothing.
        return GPTQLinear(prefix, layer, bias if bias is not None and bias.any() else None)

    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        parts = {meta: tensors[p + hf + ".weight"].to_float32() if hf.endswith("layernorm") else linear(p + hf)
                 for hf, meta in LAYER_NAMES.items()}
        layers.append(fuse_projections(Layer(**parts)))
    embedding = tensors["model.embed_tokens.weight"].dense()
    output = DenseLinear(embedding) if config.tie_word_embeddings else linear("lm_head")
    return Weights(tok_embeddings=embedding, layers=tuple(layers),
                   norm=tensors["model.norm.weight"].to_float32(), output=output)


def load_hf(directory: Path) -> tuple[ModelConfig, Weights, Tokenizer | None]:
    """An HF checkpoint directory (single or sharded safetensors, dense or GPTQ) with its
    tokenizer when the directory has one (tokenizer.model or tokenizer.json)."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected an HF checkpoint directory or a .gguf file)")
    config = ModelConfig.from_json_file(directory / "config.json")
    tensors = read_checkpoint(directory)
    gptq = find_gptq_config(directory, json.loads((directory / "config.json").read_text()), tensors)
    if gptq is not None and not quantized_prefixes(tensors):
        raise CheckpointError(f"{gptq.source} says GPTQ, but {directory} holds no .qweight tensors")
    check_tensors(tensors, config, str(directory))
    tokenizer = load_tokenizer(directory) if has_tokenizer(directory) else None
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{directory}: the tokenizer has {tokenizer.vocab_size} ids but the model's "
                              f"vocab_size is {config.vocab_size}")
    return config, build_weights(tensors, config, gptq), tokenizer
