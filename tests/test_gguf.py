"""GGUF: the block-quantized kernels against gguf.quants.dequantize, the Q/K row
un-permutation against llama.cpp's converter, and SmolLM2's GGUF against transformers."""
import gguf
import numpy as np
import pytest
import torch
import transformers

import llama_ref
from llama_ref.formats.gguf_file import q4_layer, q_k_row_order
from llama_ref.kernels import ggml
from llama_ref.nn.linear import GPTQLinear
from conftest import relative_error

KINDS = ["Q8_0", "Q4_0", "Q4_1"]


def quantized(rng, out_features, in_features, kind):
    w = rng.standard_normal((out_features, in_features)).astype(np.float32) * 0.1
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType[kind])   # (out, row bytes) uint8


@pytest.mark.parametrize("kind", KINDS)
def test_numpy_dequantization_equals_gguf_quants(kind):
    data = quantized(np.random.default_rng(0), 37, 96, kind)
    expected = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind])
    assert np.array_equal(ggml.dequantize_numpy(data, kind), expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 3, 32, 40])
def test_kernels_equal_gguf_dequantize_then_matmul(kind, n):
    rng = np.random.default_rng(1)
    data = quantized(rng, 75, 160, kind)
    x = rng.standard_normal((n, 160)).astype(np.float32)
    expected = x.astype(np.float64) @ gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind]).T
    if kind in ggml.MATMUL_KINDS:
        assert relative_error(ggml.matmul(x, data, kind), expected) <= 1e-5
        assert relative_error(ggml.matmul_small(x, data, kind), expected) <= 1e-5
    else:   # the loader runs Q4 linears through the 4-bit GPTQ kernels, re-laid out
        layer = GPTQLinear("w", q4_layer(data, kind))
        assert relative_error(layer(x), expected) <= 1e-5
        np.testing.assert_allclose(layer.dequantize(), gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind]),
                                   rtol=1e-6, atol=1e-7)


def llama_cpp_permute(w, n_heads):
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rotate-half rows -> interleaved rows."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("heads, head_dim", [(9, 64), (3, 64), (4, 8)])
def test_q_k_rows_are_put_back_in_hf_order(heads, head_dim):
    w = np.random.default_rng(2).standard_normal((heads * head_dim, 5))
    assert np.array_equal(llama_cpp_permute(w, heads)[q_k_row_order(heads * head_dim, heads)], w)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, smollm2_hf_fp32):
    """Ours on the GGUF; transformers on its own float32 dequantization of the same GGUF."""
    ours = llama_ref.load_model(smollm2_gguf)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_hf_fp32), dtype=torch.float32).eval()
    return ours, theirs


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_smollm2_gguf_greedy_tokens_and_logits_equal_transformers(smollm2, prompt):
    ours, theirs = smollm2
    ids = ours.tokenizer.encode(prompt, bos=ours.tokenizer.add_bos, eos=False)
    with torch.no_grad():
        out = theirs.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=64, min_new_tokens=64,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    their_tokens = out.sequences[0, len(ids):].tolist()
    eos = list({*ours.config.eos_token_ids, ours.tokenizer.eos_id})
    cache = ours.new_cache()
    logits = ours.forward(ids, 0, cache)[-1]
    for step, token in enumerate(their_tokens):
        # Measured at most 2.8e-6 over the three prompts' 64 steps (AVX2 EPYC, 2 threads).
        assert relative_error(logits, out.logits[step][0].numpy()) <= 1e-5, f"step {step}"
        logits[eos] = -np.inf   # min_new_tokens=64 keeps transformers from choosing end-of-sequence
        assert int(np.argmax(logits)) == token, f"step {step}"
        logits = ours.forward([token], len(ids) + step, cache)[-1]


def test_the_default_model_is_smollm2_and_answers(smollm2_gguf):
    model = llama_ref.load_model("default")
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    answer = model.chat([{"role": "user", "content": "What is the capital of France?"}],
                        llama_ref.SamplingParams(temperature=0, max_new_tokens=12)).result().choices[0]
    assert "Paris" in answer.text
