"""JSON mode: the closing rule against Python's json module, the token bytes the grammar
engine sees against the tokenizers, and seeded generations that always parse."""
import json

import pytest
from hypothesis import given, settings, strategies as st

import llama_ref
from llama_ref import SamplingParams
from llama_ref.decoding.constrained import closing_text
from llama_ref.tools.synth import llama2_tokenizer_model
from llama_ref.tokenizer import load_gguf_tokenizer
from conftest import CORPUS, make_checkpoint

values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False,
                                                                                           allow_infinity=False)
                      | st.text(max_size=6), lambda children: st.lists(children, max_size=3)
                      | st.dictionaries(st.text(max_size=4), children, max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(obj=st.dictionaries(st.text(max_size=4), values, max_size=3), indent=st.sampled_from([None, 1]),
       ascii_only=st.booleans())
def test_every_prefix_of_a_json_object_closes_into_valid_json(obj, indent, ascii_only):
    text = json.dumps(obj, indent=indent, ensure_ascii=ascii_only)
    for end in range(len(text) + 1):
        prefix = text[:end]
        closed = prefix + closing_text(prefix)
        assert isinstance(json.loads(closed), dict), (prefix, closed)
    assert closing_text(text) == ""


def test_token_bytes_spell_the_text(llama_tokenizers, smollm2_gguf):
    spm = llama_tokenizers[0]
    bpe = load_gguf_tokenizer(smollm2_gguf)
    for text in CORPUS[:-1]:
        ids = spm.encode_text(text)
        if "▁" in text:   # SentencePiece stores a literal "▁" as the space marker itself
            text = text.replace("▁", " ")
        assert b"".join(spm.token_bytes(i) for i in ids) == (" " + text if text else "").encode(), text
        ids = bpe.encode_text(text)
        assert b"".join(bpe.token_bytes(i) for i in ids).decode("utf-8", "replace") == bpe.decode(ids), text
    assert spm.token_bytes(spm.eos_id) == b"" and spm.token_bytes(spm.encode_text("\n")[-1]) == b"\n"


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory):
    directory = make_checkpoint(tmp_path_factory.mktemp("json"), overrides=dict(vocab_size=32000))
    (directory / "tokenizer.model").write_bytes(llama2_tokenizer_model())
    return llama_ref.load_model(directory)


def test_json_mode_always_gives_a_json_object_that_ends_with_eos(tiny_with_tokenizer):
    model = tiny_with_tokenizer
    for seed in range(50):
        params = SamplingParams(seed=seed, temperature=1.0, max_new_tokens=24 + seed % 16, response_format="json_object")
        choice = model.chat([{"role": "user", "content": "Give me JSON"}], params).result().choices[0]
        assert isinstance(json.loads(choice.text), dict), (seed, choice.text)
        assert choice.finish_reason == "eos_token", (seed, choice.text)


def test_json_mode_greedy_is_constrained_too(tiny_with_tokenizer):
    choice = tiny_with_tokenizer.generate("x", SamplingParams(temperature=0, max_new_tokens=12,
                                                              response_format="json_object")).result().choices[0]
    assert isinstance(json.loads(choice.text), dict) and choice.finish_reason == "eos_token"
