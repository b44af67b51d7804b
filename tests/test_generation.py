"""The generation loop: stop vectors S1-S8, detokenization vectors D1-D4, n = 2 (N1-N2),
determinism, usage, and greedy + repetition penalty against transformers' generate()."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import llama_ref
from llama_ref import SamplingParams
from llama_ref.errors import ContextLengthError
from llama_ref.decoding.params import SamplingParamsError
from llama_ref.decoding.stopping import find_stop, stop_prefix_length
from llama_ref.tokenizer.base import Tokenizer
from conftest import load_reference

EOS_ID = 1


class PieceTokenizer(Tokenizer):
    """A vocabulary of whole text pieces: decode is concatenation. Id 0 is BOS, 1 is EOS."""

    def __init__(self, pieces):
        self.pieces = ["<s>", "</s>", *pieces]
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = 0, EOS_ID, None, None
        self.add_bos, self.chat_template = True, None

    @property
    def vocab_size(self):
        return len(self.pieces)

    def encode_text(self, text):
        return [self.pieces.index(text)]

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids if not self.is_special(i))

    def is_special(self, token_id):
        return token_id < 2

    def id_to_piece(self, token_id):
        return self.pieces[token_id]

    def token_bytes(self, token_id):
        return b"" if self.is_special(token_id) else self.pieces[token_id].encode()


class ScriptedModel:
    """Duck-typed Model whose logits make greedy sampling emit `script` after any prompt."""

    def __init__(self, tokenizer, script, context_length=64):
        self.tokenizer = tokenizer
        self.script = list(script)
        self.config = SimpleNamespace(vocab_size=tokenizer.vocab_size, eos_token_ids=(EOS_ID,),
                                      context_length=context_length, rope_scaling=None)

    def new_cache(self, max_seq_len=None):
        return SimpleNamespace(generated=0, copy=lambda: SimpleNamespace(generated=0))

    def forward_chunks(self, chunks):
        rows = [np.zeros((len(chunk.tokens), self.config.vocab_size), dtype=np.float32) for chunk in chunks]
        for logits, chunk in zip(rows, chunks):
            logits[-1, self.script[chunk.cache.generated]] = 10.0
            chunk.cache.generated += 1
        return rows


def scripted(pieces, **params):
    """Generate greedily through a model scripted to emit `pieces` (texts, or ids for specials)."""
    tokenizer = PieceTokenizer(sorted({p for p in pieces if isinstance(p, str)} | {"Q", "##", "#x"}))
    ids = [p if isinstance(p, int) else tokenizer.pieces.index(p) for p in pieces]
    model = ScriptedModel(tokenizer, ids)
    prompt = params.pop("prompt", ["Q"])
    return llama_ref.Model.generate(model, [0] + [tokenizer.pieces.index(p) for p in prompt],
                                          SamplingParams(temperature=0, **params))


# --- stop vectors --------------------------------------------------------------------------

@pytest.mark.parametrize("name, pieces, params, text, finish, n_tokens", [
    ("S1", ["Hello", " #", "##", " more"], dict(stop=["###"]), "Hello ", "stop_sequence", 3),
    ("S2", ["a", "ENDx", "b"], dict(stop=["END"]), "a", "stop_sequence", 2),
    ("S3", ["x", "abcd", "y"], dict(stop=["abcd", "bc"]), "xa", "stop_sequence", 2),
    ("S4", ["Hi", "###"], dict(stop=["###"], max_new_tokens=2), "Hi", "stop_sequence", 2),
    ("S5", [EOS_ID], dict(max_new_tokens=1), "", "eos_token", 1),
    ("length", ["a", "b", "c"], dict(max_new_tokens=2), "ab", "length", 2),
])
def test_stop_vectors(name, pieces, params, text, finish, n_tokens):
    result = scripted(pieces, **params).result()
    choice = result.choices[0]
    assert (choice.text, choice.finish_reason, len(choice.tokens)) == (text, finish, n_tokens), name
    assert result.completion_tokens == n_tokens and result.total_tokens == result.prompt_tokens + n_tokens


def test_s6_streamed_deltas_never_show_a_stop_string_that_then_matched():
    events = list(scripted(["The", " <", "/ans", "wer> tail"], stop=["</answer>"]))
    assert [e.delta for e in events] == ["The", " ", "", ""]
    assert [e.text for e in events] == ["The", " <", "/ans", "wer> tail"]   # token texts stay whole
    assert events[-1].finish_reason == "stop_sequence"


def test_s8_a_stop_string_in_the_prompt_or_across_its_end_is_not_a_stop():
    choice = scripted(["#x", "Q"], stop=["###", "Q##"], prompt=["Q", "##"], max_new_tokens=2).result().choices[0]
    assert (choice.text, choice.finish_reason) == ("#xQ", "length")


def test_max_new_tokens_zero_generates_nothing_and_finishes_with_length():
    generation = scripted(["a"], max_new_tokens=0)
    assert list(generation) == []
    assert generation.result().choices[0].finish_reason == "length"


def test_the_context_limits_the_response_and_a_prompt_too_long_is_an_error():
    tokenizer = PieceTokenizer(["a"])
    model = ScriptedModel(tokenizer, [2] * 10, context_length=5)
    choice = llama_ref.Model.generate(model, [0, 2, 2], SamplingParams(temperature=0)).result().choices[0]
    assert (len(choice.tokens), choice.finish_reason) == (2, "length")
    with pytest.raises(ContextLengthError, match="prompt: 6 tokens do not fit in the model's context of 5"):
        llama_ref.Model.generate(model, [0] * 6, SamplingParams())
    with pytest.raises(SamplingParamsError, match="stop: stop strings need the model's tokenizer"):
        llama_ref.Model.generate(SimpleNamespace(tokenizer=None, config=model.config), [0],
                                       SamplingParams(stop=["x"]))


def reference_stop(pieces, stops):
    """Independent rule: after each token, look for every stop anywhere in the whole text;
    at the first token where one occurs, cut at the occurrence that ends earliest."""
    text = ""
    for count, piece in enumerate(pieces, 1):
        text += piece
        found = [(text.find(s) + len(s), i, text.find(s)) for i, s in enumerate(stops) if s in text]
        if found:
            return text[:min(found)[2]], "stop_sequence", count
    return text, "length", len(pieces)


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.text("ab#\n", min_size=1, max_size=4), min_size=1, max_size=10),
       stops=st.lists(st.text("ab#\n", min_size=1, max_size=4), min_size=1, max_size=3))
def test_stop_strings_streaming_agrees_with_an_independent_rule(pieces, stops):
    events = list(scripted(pieces, stop=stops, max_new_tokens=len(pieces)))
    text, finish, count = reference_stop(pieces, stops)
    assert (events[-1].finish_reason, len(events)) == (finish, count)
    sent = ""
    for event in events:   # every delta lies before the cut: no part of the matched stop is ever sent
        sent += event.delta
        assert text.startswith(sent)
    assert sent == text


def test_find_stop_and_hold_back_rules():
    assert find_stop("xabcd", ("abcd", "bc"), 4) == 2           # earliest end wins (S3)
    assert find_stop("xbcab", ("abc", "cab"), 2) == 2              # only "cab" has arrived
    assert find_stop("a##b", ("##",), 1) is None                 # an old match is not new
    assert stop_prefix_length("The </ans", ("</answer>",)) == 5
    assert stop_prefix_length("abab", ("abx", "babx")) == 3


# --- detokenization vectors with the real Llama-2 vocabulary -------------------------------

def llama_scripted(tokenizer, prompt_text, script, **params):
    model = ScriptedModel(tokenizer, script, context_length=256)
    model.config.eos_token_ids = (tokenizer.eos_id,)
    model.config.vocab_size = tokenizer.vocab_size
    prompt = tokenizer.encode(prompt_text, bos=True, eos=False)
    return llama_ref.Model.generate(model, prompt, SamplingParams(temperature=0, **params))


def _byte_piece(tokenizer, byte):
    return next(i for i in range(tokenizer.vocab_size) if tokenizer.id_to_piece(i) == f"<0x{byte:02X}>")


def test_d1_the_first_token_keeps_its_leading_space(llama_tokenizers):
    tokenizer = llama_tokenizers[0]
    hello = tokenizer.encode_text("Hello")
    assert tokenizer.id_to_piece(hello[0]) == "▁Hello"
    events = list(llama_scripted(tokenizer, "[INST] hi [/INST]", hello + [tokenizer.eos_id]))
    assert events[0].text == " Hello" and events[0].delta == " Hello"


def test_d2_d4_bytes_wait_for_the_whole_character_and_eos_is_a_special_event(llama_tokenizers):
    tokenizer = llama_tokenizers[0]
    emoji = [_byte_piece(tokenizer, b) for b in "😀".encode()]
    events = list(llama_scripted(tokenizer, "hi", emoji + [tokenizer.eos_id]))
    assert [e.text for e in events] == ["", "", "", "😀", "</s>"]
    eos = events[-1]
    assert (eos.token_id, eos.special, eos.delta, eos.finish_reason) == (tokenizer.eos_id, True, "", "eos_token")
    assert "".join(e.delta for e in events) == "😀"


def test_d3_a_dangling_partial_character_is_flushed_as_replacement_characters(llama_tokenizers):
    tokenizer = llama_tokenizers[0]
    partial = [_byte_piece(tokenizer, b) for b in "😀".encode()[:2]]
    generation = llama_scripted(tokenizer, "hi", [tokenizer.encode_text("ok")[0]] + partial, max_new_tokens=3)
    events = list(generation)
    assert [e.delta for e in events] == [" ok", "", "\ufffd\ufffd"]
    assert generation.result().choices[0].text == " ok\ufffd\ufffd"


# --- a tiny random model: n = 2, determinism, repetition penalty vs transformers ------------

PROMPT = [1, 17, 90, 5, 250, 33, 7]


@pytest.fixture(scope="module")
def tiny(checkpoint):
    return llama_ref.load_model(checkpoint("gqa"))


def ids(choice):
    return [e.token_id for e in choice.tokens]


def test_n1_choice_i_of_two_equals_n_1_with_seed_plus_i(tiny):
    params = dict(temperature=0.8, top_p=0.95, max_new_tokens=12)
    both = tiny.generate(PROMPT, SamplingParams(n=2, seed=41, **params)).result()
    first = tiny.generate(PROMPT, SamplingParams(seed=41, **params)).result().choices[0]
    second = tiny.generate(PROMPT, SamplingParams(seed=42, **params)).result().choices[0]
    assert ids(both.choices[0]) == ids(first) and ids(both.choices[1]) == ids(second)
    assert ids(first) != ids(second)
    for ours, alone in [(both.choices[0], first), (both.choices[1], second)]:
        assert np.allclose([e.logprob for e in ours.tokens], [e.logprob for e in alone.tokens], atol=1e-5)
    assert both.completion_tokens == len(first.tokens) + len(second.tokens)


def test_n2_greedy_gives_two_identical_choices(tiny):
    result = tiny.generate(PROMPT, SamplingParams(temperature=0, n=2, max_new_tokens=10)).result()
    assert ids(result.choices[0]) == ids(result.choices[1]) and result.choices[0].seed is None


def test_streamed_and_not_streamed_are_the_same_tokens(tiny):
    params = SamplingParams(temperature=1.1, top_k=40, seed=7, max_new_tokens=16, top_logprobs=3)
    streamed = list(tiny.generate(PROMPT, params))
    folded = tiny.generate(PROMPT, params).result().choices[0]
    assert [e.token_id for e in streamed] == ids(folded)
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0][1] >= e.logprob - 1e-12 for e in streamed)


def test_greedy_with_repetition_penalty_equals_transformers_generate(tiny, checkpoint):
    # A prompt ending in the model's own greedy continuation, so that penalising prompt ids matters.
    plain = ids(tiny.generate(PROMPT, SamplingParams(temperature=0, max_new_tokens=12)).result().choices[0])
    prompt = PROMPT + plain
    ours = tiny.generate(prompt, SamplingParams(temperature=0, repetition_penalty=1.3, max_new_tokens=40))
    reference = load_reference(checkpoint("gqa"))
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([prompt]), do_sample=False, repetition_penalty=1.3,
                                    max_new_tokens=40, eos_token_id=2, pad_token_id=0)[0, len(prompt):].tolist()
    assert ids(ours.result().choices[0]) == theirs
    unpenalised = tiny.generate(prompt, SamplingParams(temperature=0, max_new_tokens=40)).result().choices[0]
    assert ids(unpenalised) != theirs   # the penalty changes this sequence


def test_a_text_prompt_gets_one_bos(llama_tokenizers):
    tokenizer = llama_tokenizers[0]
    model = ScriptedModel(tokenizer, [tokenizer.eos_id], context_length=256)
    model.config.vocab_size = tokenizer.vocab_size
    generation = llama_ref.Model.generate(model, "<s> hi", SamplingParams(temperature=0))
    assert generation.prompt_ids == [tokenizer.bos_id, *tokenizer.encode_text("<s> hi")]
    assert generation.prompt_ids.count(tokenizer.bos_id) == 1   # typed "<s>" is text
