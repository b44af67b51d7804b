"""A real trained Llama-architecture model: SmolLM2-135M-Instruct (GQA 9/3 heads, tied
embeddings, rope theta 1e5, byte-level BPE, ChatML), as an HF fp16 checkpoint."""
import numpy as np
import pytest
import torch
import transformers

import llama_ref
from conftest import load_reference, relative_error

pytestmark = pytest.mark.slow

QUESTION = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def chat_prompt(tokenizer) -> list[int]:
    """QUESTION as ids: the ChatML markers are control tokens, which encode() never makes
    from text, so they are asked for by id."""
    start, end = tokenizer.bos_id, tokenizer.eos_id
    return [start, *tokenizer.encode("user\nWhat is the capital of France?", bos=False, eos=False), end,
            *tokenizer.encode("\n", bos=False, eos=False), start,
            *tokenizer.encode("assistant\n", bos=False, eos=False)]


def test_logits_and_greedy_answer_match_transformers(smollm2_hf_fp16):
    model = llama_ref.load_model(smollm2_hf_fp16)
    prompt = chat_prompt(model.tokenizer)
    # transformers' tokenizer parses the markers out of the text; the ids must agree
    assert prompt == transformers.AutoTokenizer.from_pretrained(str(smollm2_hf_fp16)).encode(QUESTION)

    reference = load_reference(smollm2_hf_fp16)
    out = reference.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
    expected = out.sequences[0, len(prompt):].tolist()

    cache = model.new_cache()
    logits = model.forward(prompt, 0, cache)[-1]
    tokens = []
    for step in range(len(expected)):
        assert relative_error(logits, out.logits[step][0].numpy()) <= 1e-4, f"step {step}"
        tokens.append(int(np.argmax(logits)))
        if tokens[-1] == model.tokenizer.eos_id:
            break
        logits = model.forward([tokens[-1]], len(prompt) + step, cache)[-1]
    assert tokens == expected
    answer = model.tokenizer.decode(tokens)
    assert "Paris" in answer, answer
