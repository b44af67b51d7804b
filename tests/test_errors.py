"""Every broken checkpoint and over-long input gets an error that names what is wrong."""
import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

import llama_ref
from llama_ref import CheckpointError, ConfigError, ContextLengthError
from llama_ref.formats.safetensors import read_safetensors


@pytest.fixture
def copy_of(checkpoint, tmp_path):
    def copy(name):
        target = tmp_path / name
        shutil.copytree(checkpoint(name), target)
        return target
    return copy


def edit_config(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_missing_shard(copy_of):
    directory = copy_of("sharded")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    os.remove(directory / victim)
    with pytest.raises(CheckpointError, match=f"shard {victim} is missing"):
        llama_ref.load_model(directory)


def test_truncated_file_names_the_tensor(copy_of):
    directory = copy_of("mha")
    path = directory / "model.safetensors"
    os.truncate(path, path.stat().st_size - 10)
    with pytest.raises(CheckpointError, match="truncated: tensor .* ends at byte"):
        llama_ref.load_model(directory)


def test_truncated_header(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes((1000).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="truncated: header claims 1000 bytes"):
        read_safetensors(path)


def test_wrong_shape_names_tensor_and_shapes(copy_of):
    directory = copy_of("mha")
    edit_config(directory, intermediate_size=100)
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.gate_proj.weight has shape \[172, 64\], "
                                              r"the config implies \[100, 64\]"):
        llama_ref.load_model(directory)


def test_missing_and_unexpected_tensors(tmp_path, copy_of):
    directory = copy_of("mha")
    tensors = {name: np.array(t.data) for name, t in read_safetensors(directory / "model.safetensors").items()}
    save_file({k: v for k, v in tensors.items() if k != "model.norm.weight"}, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match="tensor model.norm.weight is missing"):
        llama_ref.load_model(directory)
    save_file({**tensors, "model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)},
              str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor model.layers.0.mlp.extra.weight"):
        llama_ref.load_model(directory)
    # an old transformers' saved RoPE buffer is known to be harmless
    save_file({**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(8, np.float32)},
              str(directory / "model.safetensors"))
    assert llama_ref.load_model(directory).config.num_hidden_layers == 2


def test_unknown_architecture(copy_of):
    directory = copy_of("mha")
    edit_config(directory, architectures=["FalconForCausalLM"])
    with pytest.raises(ConfigError, match="FalconForCausalLM"):
        llama_ref.load_model(directory)


def test_unsupported_rope_type(copy_of):
    directory = copy_of("mha")
    edit_config(directory, rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ConfigError, match="rope_scaling type 'yarn' is not supported"):
        llama_ref.load_model(directory)


def test_no_weights_and_not_a_directory(tmp_path, copy_of):
    directory = copy_of("mha")
    os.remove(directory / "model.safetensors")
    with pytest.raises(CheckpointError, match="found: none"):
        llama_ref.load_model(directory)
    with pytest.raises(CheckpointError, match="not a directory"):
        llama_ref.load_model(tmp_path / "nowhere")


def test_prompt_longer_than_context(checkpoint):
    model = llama_ref.load_model(checkpoint("mha"))
    context = model.config.context_length
    with pytest.raises(ContextLengthError, match=f"{context + 1} tokens do not fit in the model's context of {context}"):
        model.forward(np.zeros(context + 1, dtype=np.int64), 0, model.new_cache())
    cache = model.new_cache()
    model.forward(np.zeros(context, dtype=np.int64), 0, cache)
    with pytest.raises(ContextLengthError, match="do not fit"):
        model.forward([5], context, cache)


def test_cache_limits_and_gaps(checkpoint):
    model = llama_ref.load_model(checkpoint("mha"))
    cache = model.new_cache(max_seq_len=8)
    with pytest.raises(ContextLengthError, match="KV cache of 8 positions"):
        model.forward(np.zeros(9, dtype=np.int64), 0, cache)
    with pytest.raises(ContextLengthError, match="start_pos=3"):
        model.forward([1], 3, cache)
    with pytest.raises(ContextLengthError, match="max_seq_len=100000"):
        model.new_cache(max_seq_len=100000)


def test_token_ids_outside_vocabulary(checkpoint):
    model = llama_ref.load_model(checkpoint("mha"))
    with pytest.raises(ValueError, match="tokens: id 320 is outside the vocabulary 0..319"):
        model.forward([1, 320], 0, model.new_cache())
