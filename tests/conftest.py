"""Tiny random Llama checkpoints written by transformers, and transformers itself as the oracle.

Every checkpoint is made by `LlamaForCausalLM(config).save_pretrained(...)` (or Mistral), so
the files are exactly what transformers writes. Norm weights and biases are randomised too,
so a forward pass that skipped them could not pass.
"""
import numpy as np
import pytest
import torch
import transformers

SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
             rms_norm_eps=1e-5, initializer_range=0.2, bos_token_id=1, eos_token_id=2)

# name -> (architecture, config overrides, stored dtype, save_pretrained kwargs)
CASES = {
    "mha": ("llama", {}, torch.float32, {}),
    "gqa": ("llama", dict(num_attention_heads=8, num_key_value_heads=2), torch.float32, {}),
    "tied_theta1e6": ("llama", dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
                      torch.float32, {}),
    "rope_linear": ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
                    torch.float32, {}),
    # max_position_embeddings below the prompt length, so that dynamic NTK really rescales
    "rope_dynamic": ("llama", dict(max_position_embeddings=48,
                                   rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}),
                     torch.float32, {}),
    "rope_llama3": ("llama", dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
                                                   "rope_theta": 500000.0}),
                    torch.float32, {}),
    "fp16": ("llama", dict(num_key_value_heads=2), torch.float16, {}),
    "bf16": ("llama", dict(num_key_value_heads=2), torch.bfloat16, {}),
    "sharded": ("llama", {}, torch.float16, dict(max_shard_size="60KB")),
    "head_dim24": ("llama", dict(head_dim=24, num_key_value_heads=2), torch.float32, {}),
    "biases": ("llama", dict(attention_bias=True, mlp_bias=True), torch.float32, {}),
    "mistral": ("mistral", dict(num_key_value_heads=2, sliding_window=None), torch.float32, {}),
}


def make_checkpoint(directory, arch="llama", overrides=None, dtype=torch.float32, save_kwargs=None, seed=0):
    """Write a random transformers model to `directory` and return it."""
    torch.manual_seed(seed)
    config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[arch]
    config = config_cls(**{**SMALL, **(overrides or {})})
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.1)
    model.to(dtype).save_pretrained(directory, **(save_kwargs or {}))
    return directory


def load_reference(directory):
    """transformers' model from the saved files, computing in float32 (reloaded rather than
    cast so that no fp16-rounded RoPE buffer survives)."""
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> directory of that CASES entry, written once per session."""
    made = {}

    def get(name):
        if name not in made:
            arch, overrides, dtype, save_kwargs = CASES[name]
            made[name] = make_checkpoint(tmp_path_factory.mktemp(name), arch, overrides, dtype, save_kwargs)
        return made[name]
    return get


@pytest.fixture
def prompt():
    return np.random.default_rng(1234).integers(3, SMALL["vocab_size"], size=64)


def relative_error(ours, theirs) -> float:
    """max |ours - theirs| / max |theirs|"""
    theirs = np.asarray(theirs, dtype=np.float64)
    return float(np.abs(np.asarray(ours, dtype=np.float64) - theirs).max() / np.abs(theirs).max())
