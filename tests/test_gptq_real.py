"""Real GPTQ checkpoints: SmolLM2-135M-Instruct quantized by gptqmodel 7.7.0 on this CPU
(conftest.GPTQ_VARIANTS). Our logits against transformers running the NumPy-dequantized
weights in float32, and our greedy chat answer against gptqmodel's own."""
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import llama_ref
from llama_ref import SamplingParams
from llama_ref.kernels.gptq import dequantize_numpy, unpack_columns
from llama_ref.formats.safetensors import read_checkpoint
from conftest import GPTQ_VARIANTS, load_reference, relative_error
from oracles import gptqmodel_greedy

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]



def dequantized_checkpoint(gptq_dir, target):
    """The same model with every GPTQ Linear replaced by its NumPy-dequantized float32 weight."""
    tensors = read_checkpoint(gptq_dir)
    dense = {}
    for name, tensor in tensors.items():
        prefix, _, kind = name.rpartition(".")
        if kind == "qweight":
            zeros = unpack_columns(tensors[prefix + ".qzeros"].data).astype(np.float32) + 1   # format "gptq" = v1
            w = dequantize_numpy(tensor.data, zeros, tensors[prefix + ".scales"].to_float32(),
                                 tensors[prefix + ".g_idx"].data)
            dense[prefix + ".weight"] = np.ascontiguousarray(w.T)
        elif kind not in ("qzeros", "scales", "g_idx"):
            dense[name] = tensor.to_float32() if tensor.dtype in ("F16", "BF16", "F32") else np.asarray(tensor.data)
    target.mkdir()
    save_file(dense, str(target / "model.safetensors"))
    config = json.loads((gptq_dir / "config.json").read_text())
    config.pop("quantization_config")
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("variant", GPTQ_VARIANTS)
def test_real_gptq_logits_equal_transformers_on_the_dequantized_weights(variant, smollm2_gptq, tmp_path):
    model = llama_ref.load_model(smollm2_gptq(variant))
    prompt = list(model.chat(QUESTION, SamplingParams(max_new_tokens=0)).prompt_ids)
    reference = load_reference(dequantized_checkpoint(smollm2_gptq(variant), tmp_path / "dense"))
    with torch.no_grad():
        theirs = reference(torch.tensor([prompt])).logits[0].numpy()
    assert relative_error(model.forward(prompt, 0, model.new_cache()), theirs) <= 1e-4


@pytest.fixture(scope="module")
def gptqmodel_answers(smollm2_gptq, tmp_path_factory):
    """{variant: gptqmodel's greedy ids for QUESTION}, all from one process."""
    prompt = list(llama_ref.load_model(smollm2_gptq("sym")).chat(QUESTION, SamplingParams(max_new_tokens=0)).prompt_ids)
    answers = gptqmodel_greedy([(smollm2_gptq(v), prompt, 16) for v in GPTQ_VARIANTS], tmp_path_factory.mktemp("gen"))
    return dict(zip(GPTQ_VARIANTS, answers))


@pytest.mark.parametrize("variant", GPTQ_VARIANTS)
def test_real_gptq_greedy_answer_equals_gptqmodel_s(variant, smollm2_gptq, gptqmodel_answers):
    model = llama_ref.load_model(smollm2_gptq(variant))
    ours = model.chat(QUESTION, SamplingParams(temperature=0, max_new_tokens=16)).result().choices[0]
    their_ids = gptqmodel_answers[variant]
    our_ids = [e.token_id for e in ours.tokens]
    assert our_ids == their_ids[:len(our_ids)], (ours.text, model.tokenizer.decode(their_ids))
    assert "Paris" in ours.text
