"""The forward pass against transformers' LlamaForCausalLM / MistralForCausalLM in float32."""
from dataclasses import replace

import numpy as np
import pytest
import torch

import llama_ref
from llama_ref.nn.transformer import Chunk, forward
from conftest import CASES, SMALL, load_reference, relative_error

# Past max_position_embeddings dynamic NTK depends on the length of each forward call, in
# transformers as here (see llama_ref/nn/rope.py), so chunked and full forwards differ by design.
STATIC_ROPE = [name for name in CASES if name != "rope_dynamic"]


def reference_logits(directory, tokens) -> np.ndarray:
    with torch.no_grad():
        return load_reference(directory)(torch.tensor(np.asarray(tokens))[None]).logits[0].numpy()


@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers(checkpoint, prompt, name):
    model = llama_ref.load_model(checkpoint(name))
    ours = model.forward(prompt, 0, model.new_cache())
    theirs = reference_logits(checkpoint(name), prompt)
    assert ours.dtype == np.float32 and ours.shape == (64, SMALL["vocab_size"])
    assert relative_error(ours, theirs) <= 1e-4


@pytest.mark.parametrize("name", CASES)
def test_greedy_decoding_matches_generate(checkpoint, prompt, name):
    """64 greedy tokens through our KV cache equal transformers' generate(do_sample=False),
    and so do the logits of every step."""
    reference = load_reference(checkpoint(name))
    out = reference.generate(torch.tensor(prompt)[None], max_new_tokens=64, do_sample=False,
                             eos_token_id=None, pad_token_id=0, return_dict_in_generate=True,
                             output_logits=True)
    expected = out.sequences[0, len(prompt):].tolist()
    assert len(expected) == 64

    model = llama_ref.load_model(checkpoint(name))
    cache = model.new_cache()
    logits = model.forward(prompt, 0, cache)[-1]
    tokens = []
    for step in range(64):
        assert relative_error(logits, out.logits[step][0].numpy()) <= 1e-4, f"step {step}"
        tokens.append(int(np.argmax(logits)))
        logits = model.forward([tokens[-1]], len(prompt) + step, cache)[-1]
    assert tokens == expected


@pytest.mark.parametrize("name", STATIC_ROPE)
def test_decoding_through_cache_equals_full_recompute(checkpoint, name):
    model = llama_ref.load_model(checkpoint(name))
    tokens = np.random.default_rng(7).integers(0, SMALL["vocab_size"], size=96)
    full = model.forward(tokens, 0, model.new_cache())
    cache = model.new_cache()
    model.forward(tokens[:64], 0, cache)
    stepped = np.concatenate([model.forward(tokens[p:p + 1], p, cache) for p in range(64, 96)])
    assert relative_error(stepped, full[64:]) <= 1e-5


@pytest.mark.parametrize("name", STATIC_ROPE)
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill_equals_one_pass(checkpoint, prompt, name, chunk):
    model = llama_ref.load_model(checkpoint(name))
    whole = model.forward(prompt, 0, model.new_cache())
    cache = model.new_cache()
    pieces = [model.forward(prompt[s:s + chunk], s, cache) for s in range(0, len(prompt), chunk)]
    assert relative_error(np.concatenate(pieces), whole) <= 1e-5


def test_dynamic_rope_is_chunk_independent_within_original_length(checkpoint):
    """Below max_position_embeddings dynamic NTK is plain RoPE, so chunking cannot matter."""
    model = llama_ref.load_model(checkpoint("rope_dynamic"))
    tokens = np.arange(3, 3 + 48)
    whole = model.forward(tokens, 0, model.new_cache())
    cache = model.new_cache()
    pieces = [model.forward(tokens[s:s + 5], s, cache) for s in range(0, 48, 5)]
    assert relative_error(np.concatenate(pieces), whole) <= 1e-5


def test_rope_scaling_changes_the_logits(checkpoint, prompt):
    """Guards the scaled cases against passing vacuously: the same weights with the scaling
    dropped from our config are far from transformers' logits."""
    for name in ["rope_linear", "rope_dynamic", "rope_llama3"]:
        model = llama_ref.load_model(checkpoint(name))
        unscaled = replace(model.config, rope_scaling=None, max_position_embeddings=256)
        ours = forward(unscaled, model.weights, [Chunk(np.asarray(prompt), 0, model.new_cache())])[0]
        assert relative_error(ours, reference_logits(checkpoint(name), prompt)) > 1e-3, name


def test_batch_of_two_equals_two_separate_sequences(checkpoint):
    """n = 2 decodes both choices in one batch after one shared prefill (KVCache.copy)."""
    model = llama_ref.load_model(checkpoint("gqa"))
    prompt = [3, 17, 5, 99, 42]
    shared = model.new_cache(16)
    model.forward(prompt, 0, shared)
    caches = [shared, shared.copy()]
    steps = [(7, 8), (11, 2), (30, 30)]
    batched = [model.forward_batch([[a], [b]], len(prompt) + t, caches)[:, 0] for t, (a, b) in enumerate(steps)]
    for row in range(2):
        cache = model.new_cache(16)
        model.forward(prompt, 0, cache)
        alone = [model.forward([pair[row]], len(prompt) + t, cache)[0] for t, pair in enumerate(steps)]
        assert relative_error(np.stack([b[row] for b in batched]), np.stack(alone)) <= 1e-5


def test_a_fresh_cache_holds_memory_only_for_the_positions_written():
    """A 13B layer's shape (40 heads x 4096 positions x 128: 2 MB a head), four layers, 16
    positions written: about 16 x 128 x 4 bytes a head become resident, not each head's 2 MB
    (as when the allocation is given transparent huge pages; then the whole cache is)."""
    from types import SimpleNamespace
    from llama_ref.nn.transformer import KVCache
    from llama_ref.tools.bench import resident_bytes
    config = SimpleNamespace(num_hidden_layers=4, num_key_value_heads=40, head_dim=128)
    before = resident_bytes("VmRSS")
    cache = KVCache(config, 4096)                                   # 2 x 336 MB
    rng = np.random.default_rng(0)
    for layer in range(4):
        kv = rng.standard_normal((16, 40, 128)).astype(np.float32)
        keys, values = cache.update(layer, 0, kv, kv)
        np.testing.assert_array_equal(keys[:, :16], kv.transpose(1, 0, 2))
    assert resident_bytes("VmRSS") - before < 2 * 4 * 40 * 2 * 4096 + 8e6    # two pages a head, + slack
    assert not cache.k[:, :, 16:].any() and not cache.v[:, :, 16:].any()
    twin = cache.copy(positions=16)
    np.testing.assert_array_equal(twin.k[:, :, :16], cache.k[:, :, :16])
    twin.k[0, 0, 0, 0] = 5.0
    assert cache.k[0, 0, 0, 0] != 5.0
