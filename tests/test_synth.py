"""The synthetic GPTQ writer: a standard file the safetensors library reads, in the real shape."""
import json

import numpy as np
from safetensors import safe_open

import llama_ref
from llama_ref.kernels.gptq import unblock_columns
from llama_ref.nn.linear import GPTQLinear
from llama_ref.tools.synth import SHAPES, write_synthetic_gptq


def test_a_synthetic_llama_2_7b_layer_is_a_standard_gptq_checkpoint(tmp_path):
    directory = write_synthetic_gptq(tmp_path / "synth", "llama-2-7b", layers=1)
    assert not (tmp_path / "synth.partial").exists()
    config = json.loads((directory / "config.json").read_text())
    assert config["hidden_size"] == SHAPES["llama-2-7b"]["hidden_size"] and config["num_hidden_layers"] == 1
    model = llama_ref.load_model(directory)
    wq = model.weights.layers[0].wq
    assert isinstance(wq, GPTQLinear) and (wq.in_features, wq.out_features) == (4096, 4096)
    with safe_open(directory / "model.safetensors", "np") as f:   # the library reads what we wrote
        assert len(list(f.keys())) == 3 + 2 + 7 * 4   # embed, norm, lm_head; 2 norms; 7 linears
        qweight = f.get_tensor("model.layers.0.mlp.down_proj.qweight")
        assert qweight.shape == (11008 // 8, 4096)
        assert np.array_equal(qweight.view(np.uint32), unblock_columns(model.weights.layers[0].w2.layer.blocks, 4096))
    assert model.tokenizer.encode("Hello", bos=True, eos=False) == [1, 15043]   # Llama-2's vocabulary
    logits = model.forward([1, 450, 7483], 0, model.new_cache(8))
    assert np.isfinite(logits).all() and logits.std() > 0.1


def test_the_synth_command_refuses_an_existing_directory(tmp_path):
    from test_cli import run_cli
    result = run_cli("synth", "--shape", "llama-2-7b", "--layers", "1", str(tmp_path))
    assert result.returncode == 2 and "already exists" in result.stderr


def test_a_synthetic_fp16_source_is_what_transformers_reads(tmp_path):
    import torch
    import transformers
    directory = write_synthetic_gptq(tmp_path / "fp16", "llama-2-7b", layers=1, dense=True)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ours = llama_ref.load_model(directory)
    assert ours.weights.layers[0].w2.storage == "F16"
    ids = [1, 450, 7483]
    with torch.no_grad():
        expected = theirs(torch.tensor([ids])).logits[0].numpy()
    logits = ours.forward(ids, 0, ours.new_cache(8))
    assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max()
