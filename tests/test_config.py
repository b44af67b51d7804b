"""ModelConfig: both transformers spellings, defaults, and refusals that name the key."""
import json

import pytest

from llama_ref import ConfigError, ModelConfig
from llama_ref.config import RopeScaling

LLAMA2_7B = {  # meta-llama/Llama-2-7b-hf config.json as transformers 4.x wrote it
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
    "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000,
}


def test_llama2_config_reads_with_defaults():
    config = ModelConfig.from_dict(LLAMA2_7B)
    assert (config.head_dim, config.num_key_value_heads, config.rope_theta, config.rope_scaling) == (128, 32, 10000.0,
                                                                                                   None)
    assert (config.bos_token_id, config.eos_token_ids, config.context_length) == (1, (2,), 4096)


def test_kv_heads_default_to_heads_and_eos_list_is_kept():
    raw = {k: v for k, v in LLAMA2_7B.items() if k != "num_key_value_heads"}
    config = ModelConfig.from_dict({**raw, "eos_token_id": [2, 7]})
    assert config.num_key_value_heads == 32 and config.eos_token_ids == (2, 7)


def test_transformers_5_rope_parameters_and_4x_rope_scaling_agree():
    v5 = ModelConfig.from_dict({**LLAMA2_7B, "rope_scaling": None,
                                "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}})
    v4 = ModelConfig.from_dict({**LLAMA2_7B, "rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert v5 == v4 and v5.rope_scaling == RopeScaling("linear", 4.0) and v5.rope_theta == 1e6


def test_llama3_scaling_defaults_original_length_to_max_positions():
    config = ModelConfig.from_dict({**LLAMA2_7B, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}})
    assert config.rope_scaling.original_max_position_embeddings == 4096


def test_dynamic_scaling_extends_the_context_and_sliding_window_caps_it():
    dynamic = ModelConfig.from_dict({**LLAMA2_7B, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    assert dynamic.context_length == 8192
    mistral = ModelConfig.from_dict({**LLAMA2_7B, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
                                     "max_position_embeddings": 32768, "sliding_window": 4096})
    assert mistral.context_length == 4096


@pytest.mark.parametrize("change, words", [
    ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
    ({"architectures": []}, "architectures"),
    ({"model_type": "mistral"}, "model_type"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "'yarn'"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "'longrope'"),
    ({"rope_scaling": {"type": "linear"}}, "factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"quantization_config": {"quant_method": "awq"}}, "quantization_config"),
    ({"num_key_value_heads": 5}, "num_key_value_heads"),
    ({"hidden_size": "4096"}, "hidden_size"),
    ({"vocab_size": None}, "vocab_size"),
])
def test_unsupported_or_malformed_keys_are_named(change, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[")):
        ModelConfig.from_dict({**LLAMA2_7B, **change})


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    assert ModelConfig.from_json_file(tmp_path / "config.json").hidden_size == 4096
