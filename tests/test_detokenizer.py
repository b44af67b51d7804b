"""Incremental detokenization (docs/spec/sampling.md steps 11 and 14; vectors D1-D3)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from llama_ref.tokenizer import IncrementalDetokenizer, load_gguf_tokenizer
from conftest import CORPUS

FFFD = "\ufffd"


def stream(tokenizer, prompt_ids, generated_ids):
    """(deltas per token, final flush)"""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    return [detok.add(i) for i in generated_ids], detok.flush()


def full_text(tokenizer, prompt_ids, generated_ids) -> str:
    """What the generated ids add to the decoded prompt (decode is prefix-stable, base.py)."""
    prompt_text = tokenizer.decode(prompt_ids)
    text = tokenizer.decode(list(prompt_ids) + list(generated_ids))
    assert text.startswith(prompt_text.rstrip(FFFD))
    return text[len(prompt_text):]


def check_stream(tokenizer, prompt_ids, generated_ids):
    deltas, flushed = stream(tokenizer, prompt_ids, generated_ids)
    expected = full_text(tokenizer, prompt_ids, generated_ids)
    assert "".join(deltas) + flushed == expected
    if FFFD not in expected:
        assert FFFD not in flushed
    # A character split across tokens never reaches a delta as U+FFFD: no delta ends in one.
    # A U+FFFD inside a delta stands for bytes that later text proved invalid; a dangling
    # tail comes out only in the flush.
    for delta in deltas:
        assert not delta.endswith(FFFD), deltas
    for token_id, delta in zip(generated_ids, deltas):
        if tokenizer.is_special(token_id):
            assert delta == ""


@pytest.mark.parametrize("vocab", ["llama_tokenizers", "mistral_tokenizers"])
def test_corpus_streams_to_its_decoding(vocab, request):
    tokenizer = request.getfixturevalue(vocab)[0]
    prompt = tokenizer.encode("[INST] Say something [/INST]", bos=True, eos=False)
    for text in CORPUS:
        ids = tokenizer.encode(text, bos=False, eos=False)
        check_stream(tokenizer, prompt, ids)
        check_stream(tokenizer, [], ids)
        deltas, flushed = stream(tokenizer, [], ids)
        # SentencePiece writes spaces as "▁" (U+2581), so a literal "▁" comes back as a space.
        assert "".join(deltas) + flushed == text.replace("▁", " ")


@pytest.mark.parametrize("vocab", ["llama_tokenizers", "mistral_tokenizers"])
def test_random_ids_with_bytes_and_specials(vocab, request):
    tokenizer = request.getfixturevalue(vocab)[0]
    ids = st.one_of(st.integers(0, 2), st.integers(3, 258), st.integers(259, tokenizer.vocab_size - 1))

    @settings(max_examples=400, deadline=None)
    @given(st.lists(ids, max_size=8), st.lists(ids, max_size=24))
    def check(prompt, generated):
        check_stream(tokenizer, prompt, generated)
    check()


def test_utf8_sequences_split_across_byte_tokens(llama_tokenizers):
    tokenizer = llama_tokenizers[0]
    rng = np.random.default_rng(0)
    for text in ["😀", "中文", "€", "é", "🇫🇷", "a😀b"]:
        ids = tokenizer.encode(text, bos=False, eos=False)
        for _ in range(5):
            check_stream(tokenizer, list(rng.integers(259, 32000, size=3)), ids)


def test_d1_first_token_keeps_its_leading_space(llama_tokenizers):
    tokenizer = llama_tokenizers[0]
    prompt = tokenizer.encode("[INST] hi [/INST]", bos=True, eos=False)
    hello = tokenizer.encode(" Hello", bos=False, eos=False)
    assert [tokenizer.id_to_piece(i) for i in hello[-1:]] == ["▁Hello"]
    deltas, _ = stream(tokenizer, prompt, hello[-1:])
    assert deltas == [" Hello"]


def test_d2_emoji_from_byte_tokens(llama_tokenizers):
    tokenizer = llama_tokenizers[0]
    emoji = [3 + b for b in "😀".encode("utf-8")]
    assert [tokenizer.id_to_piece(i) for i in emoji] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    deltas, flushed = stream(tokenizer, tokenizer.encode("Look:", bos=True, eos=False), emoji)
    assert deltas == ["", "", "", "😀"] and flushed == ""


def test_d3_dangling_bytes_flush_one_fffd_each(llama_tokenizers):
    tokenizer = llama_tokenizers[0]
    prompt = tokenizer.encode("Look:", bos=True, eos=False)
    deltas, flushed = stream(tokenizer, prompt, [*tokenizer.encode(" ok", False, False)[-1:], 3 + 0xF0, 3 + 0x9F])
    assert deltas == [" ok", "", ""] and flushed == FFFD * 2


def test_special_tokens_add_no_text(llama_tokenizers):
    tokenizer = llama_tokenizers[0]
    prompt = tokenizer.encode("Hi", bos=True, eos=False)
    ids = tokenizer.encode("there", False, False)  # "▁there": the dummy prefix is the space
    deltas, flushed = stream(tokenizer, prompt, [*ids, tokenizer.eos_id])
    assert deltas[-1] == "" and "".join(deltas) == " there" and flushed == ""


def test_byte_level_bpe_stream(smollm2_gguf):
    tokenizer = load_gguf_tokenizer(smollm2_gguf)
    prompt = tokenizer.encode("<|im_start|>assistant\n", bos=False, eos=False)
    for text in CORPUS:
        check_stream(tokenizer, prompt, tokenizer.encode(text, bos=False, eos=False))
    ids = st.integers(0, tokenizer.vocab_size - 1)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(ids, max_size=6), st.lists(ids, max_size=20))
    def check(prompt, generated):
        check_stream(tokenizer, prompt, generated)
    check()
