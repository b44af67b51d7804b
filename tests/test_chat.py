"""Chat formats against Meta's formula on the sentencepiece library, transformers'
apply_chat_template, mistral-common and the published strings (docs/spec/sampling.md §15, §17)."""
import pytest
import tokenizers
import transformers
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

import llama_ref
from llama_ref import SamplingParams
from llama_ref.decoding.chat import ChatFormatError, format_chat, native_text, render_template
from llama_ref.tokenizer import load_tokenizer
from conftest import make_checkpoint

B_INST, E_INST, B_SYS, E_SYS = "[INST]", "[/INST]", "<<SYS>>\n", "\n<</SYS>>\n\n"

# §15.2: the Llama-2-chat template of the hub's tokenizer_config.json, verbatim.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ "
    "raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if "
    "loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if "
    "message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] "
    "== 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


DIALOGS = {
    "1 turn": [user("What is the capital of France?")],
    "1 turn + system": [system("Be brief."), user("Hi")],
    "2 turns": [user("Hello"), assistant("Hi there, how can I help?"), user("Tell me a joke.")],
    "2 turns + system": [system("You are a helpful assistant"), user("Hello"), assistant(" Hi there "),
                         user("Who are you?")],
    "3 turns": [user("a"), assistant("b"), user("  c  "), assistant("\nd\n"), user("e\n")],
    "3 turns + system": [system("  S  "), user("  u1  "), assistant("   a1   "), user("u2"), assistant("a2"),
                         user("u3\n")],
}


def meta_chat_ids(dialog, sp):
    """Meta's llama/generation.py chat_completion, written again on the sentencepiece library."""
    if dialog[0]["role"] == "system":
        dialog = [{"role": "user", "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}] + dialog[2:]
    ids = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        ids += [sp.bos_id()] + sp.encode(f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ")
        ids += [sp.eos_id()]
    return ids + [sp.bos_id()] + sp.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}")


def hf_render(messages, template=LLAMA2_TEMPLATE):
    """transformers' apply_chat_template on a tokenizer that only carries the special tokens."""
    vocab = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=vocab, bos_token="<s>", eos_token="</s>",
                                                     unk_token="<unk>")
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)


@pytest.mark.parametrize("name", DIALOGS)
def test_llama2_ids_equal_meta_s_formula_on_the_sentencepiece_library(name, llama_tokenizers):
    ours, library, _ = llama_tokenizers
    prompt = format_chat(DIALOGS[name], ours, chat_format="llama-2")
    assert list(prompt.ids) == meta_chat_ids(DIALOGS[name], library)


@pytest.mark.parametrize("name", DIALOGS)
def test_llama2_text_equals_transformers_apply_chat_template(name, llama_tokenizers):
    prompt = format_chat(DIALOGS[name], llama_tokenizers[0], chat_format="llama-2")
    assert prompt.text == hf_render(DIALOGS[name])


@pytest.mark.parametrize("name", DIALOGS)
def test_c8_the_text_form_tokenized_at_its_special_tokens_gives_the_per_turn_ids(name, llama_tokenizers):
    """transformers tokenizes the rendered string, cutting it at "<s>"/"</s>": Llama-2's
    tokenizer.json normalizer prepends "▁" to each piece between them, exactly as Meta's
    per-turn SentencePiece calls add their dummy prefix, so the ids agree."""
    ours, _, hf_backend = llama_tokenizers
    prompt = format_chat(DIALOGS[name], ours, chat_format="llama-2")
    splitting = tokenizers.Tokenizer.from_str(hf_backend._tok.to_str())
    splitting.encode_special_tokens = False
    assert splitting.encode(prompt.text, add_special_tokens=False).ids == list(prompt.ids)


def test_c1_c2_c3_texts(llama_tokenizers):
    tok = llama_tokenizers[0]
    assert format_chat([user("Hi")], tok, chat_format="llama-2").text == "<s>[INST] Hi [/INST]"
    assert format_chat([system("Be brief."), user("Hi")], tok, chat_format="llama-2").text == \
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"
    assert format_chat(DIALOGS["3 turns + system"][:3] + [user("u2\n")], tok, chat_format="llama-2").text == \
        "<s>[INST] <<SYS>>\n  S  \n<</SYS>>\n\n  u1 [/INST] a1 </s><s>[INST] u2 [/INST]"


def test_c5_a_trailing_assistant_message_is_rejected(llama_tokenizers):
    with pytest.raises(ChatFormatError, match=r"messages\[1\].role: the conversation must end with a user or tool "
                                              "message \\(the model answers next\\), not assistant"):
        format_chat([user("Hi"), assistant("Yo")], llama_tokenizers[0])


def test_c6_control_tags_are_text_by_default_and_rejected_on_request(llama_tokenizers):
    tok = llama_tokenizers[0]
    messages = [user("say [INST] and <<SYS>>")]
    prompt = format_chat(messages, tok, chat_format="llama-2")
    assert prompt.ids.count(tok.bos_id) == 1 and tok.decode(prompt.ids) == "[INST] say [INST] and <<SYS>> [/INST]"
    with pytest.raises(ChatFormatError, match=r"messages\[0\].content: contains '\[INST\]'; special tags are not "
                                              "allowed as part of the prompt"):
        format_chat(messages, tok, reject_control_strings=True)


def test_c7_a_literal_eos_in_content_is_text(llama_tokenizers):
    tok = llama_tokenizers[0]
    prompt = format_chat([user("end with </s> please")], tok, chat_format="llama-2")
    assert tok.eos_id not in prompt.ids and "</s>" in tok.decode(prompt.ids)


def test_the_seeds_native_text_forms():
    assert native_text([user("first question"), assistant("first answer"), user("second question"),
                        assistant("second answer"), user("final question")]) == (
        "[INST] first question [/INST] first answer</s><s>[INST] second question [/INST] second answer</s><s>"
        "[INST] final question [/INST]")
    assert native_text([system("your system prompt goes here"), user("first question")]) == \
        "[INST] <<SYS>>\nyour system prompt goes here\n<</SYS>>\n\nfirst question [/INST]"


def test_a_system_message_in_the_middle_joins_the_next_user_turn_and_tool_results_are_user_side(llama_tokenizers):
    tok = llama_tokenizers[0]
    middle = [user("q1"), assistant("a1"), system("Now answer in French."), user("q2")]
    assert format_chat(middle, tok, chat_format="llama-2").text == \
        "<s>[INST] q1 [/INST] a1 </s><s>[INST] <<SYS>>\nNow answer in French.\n<</SYS>>\n\nq2 [/INST]"
    tools = [user("What is 6*7?"), assistant("calling calculator"), {"role": "tool", "content": "42"},
             user("thanks, so?")]
    assert format_chat(tools, tok, chat_format="llama-2").text == \
        "<s>[INST] What is 6*7? [/INST] calling calculator </s><s>[INST] Tool result: 42\n\nthanks, so? [/INST]"
    assert format_chat(tools[:3], tok, chat_format="chatml").text.endswith(
        "<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n")


def test_mistral_ids_equal_mistral_common(mistral_tokenizers, mistral_spm_model):
    reference = MistralTokenizer.from_file(str(mistral_spm_model))
    kinds = {"user": UserMessage, "assistant": AssistantMessage, "system": SystemMessage}
    for name in ["1 turn", "2 turns", "2 turns + system", "3 turns"]:
        dialog = DIALOGS[name]
        expected = reference.encode_chat_completion(ChatCompletionRequest(
            messages=[kinds[m["role"]](content=m["content"]) for m in dialog])).tokens
        assert list(format_chat(dialog, mistral_tokenizers[0], chat_format="mistral").ids) == expected, name


def test_y1_chatml_and_a1_airoboros(llama_tokenizers):
    tok = llama_tokenizers[0]
    assert format_chat([user("Hi!")], tok, chat_format="chatml").text == \
        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    airoboros = format_chat([user("hi")], tok, chat_format="airoboros")
    assert airoboros.text == "<s>A chat.\nUSER: hi\nASSISTANT: "
    assert list(airoboros.ids) == tok.encode("A chat.\nUSER: hi\nASSISTANT: ", bos=True, eos=False)
    assert "USER:" in airoboros.stop


def test_the_model_s_own_template_renders_as_transformers(smollm2_hf_fp16):
    """SmolLM2-135M-Instruct's ChatML template (with its default system prompt)."""
    ours = load_tokenizer(smollm2_hf_fp16)
    theirs = transformers.AutoTokenizer.from_pretrained(str(smollm2_hf_fp16))
    for name in ["1 turn", "2 turns", "2 turns + system", "3 turns"]:
        dialog = DIALOGS[name]
        prompt = format_chat(dialog, ours)
        text = theirs.apply_chat_template(dialog, tokenize=False, add_generation_prompt=True)
        assert prompt.text == text, name
        assert list(prompt.ids) == theirs(text, add_special_tokens=False)["input_ids"], name


def test_a_hand_written_template_renders_as_transformers(llama_tokenizers):
    tok = llama_tokenizers[0]
    for name, dialog in DIALOGS.items():
        assert render_template(LLAMA2_TEMPLATE, dialog, tok) == hf_render(dialog), name
    with pytest.raises(ChatFormatError, match="chat template: Conversation roles must alternate"):
        render_template(LLAMA2_TEMPLATE, [user("a"), user("b")], tok)


@pytest.mark.parametrize("messages, kwargs, message", [
    ([], {}, "messages: at least one message is needed"),
    ([{"role": "bot", "content": "x"}], {}, "messages[0].role: must be one of system, user, assistant, tool, got 'bot'"),
    ([{"role": "user", "content": None}], {}, "messages[0].content: must be a string or a list of text parts, got NoneType"),
    ([user("a"), user("b")], {}, "messages[1].role: a user message cannot follow a user message"),
    ([assistant("a"), user("b")], {}, "messages[0].role: an assistant message cannot follow the start"),
    ([user("a"), {"role": "tool", "content": "1"}], {}, "messages[1].role: a tool message cannot follow a user"),
    ([user("a"), assistant("b"), system("c")], {}, "messages[2]: a system message must be followed by a user"),
    ([user("a")], {"chat_format": "vicuna"}, "chat_format: must be one of llama-2, mistral, chatml, airoboros, "
                                             "template, got 'vicuna'"),
    ([user("a")], {"chat_format": "template"}, "chat_format: 'template' needs a chat template"),
])
def test_rejections_name_the_message_and_the_rule(llama_tokenizers, messages, kwargs, message):
    with pytest.raises(ChatFormatError) as err:
        format_chat(messages, llama_tokenizers[0], **kwargs)
    assert message in str(err.value)


def test_content_with_a_template_control_token_is_refused(smollm2_hf_fp16):
    with pytest.raises(ChatFormatError, match=r"messages\[0\].content: contains '<\|im_end\|>', a control token"):
        format_chat([user("x<|im_end|>")], load_tokenizer(smollm2_hf_fp16))


def test_model_chat_generates_from_the_formatted_prompt(tmp_path, mistral_spm_model):
    directory = make_checkpoint(tmp_path / "m", overrides=dict(vocab_size=32000))
    (directory / "tokenizer.model").write_bytes(mistral_spm_model.read_bytes())
    model = llama_ref.load_model(directory)
    dialog = DIALOGS["2 turns + system"]
    generation = model.chat(dialog, SamplingParams(temperature=0, max_new_tokens=3))
    assert generation.prompt_ids == list(format_chat(dialog, model.tokenizer, chat_format="llama-2").ids)
    assert len(generation.result().choices[0].tokens) <= 3
    airoboros = model.chat(dialog, SamplingParams(stop=["END"], max_new_tokens=1), chat_format="airoboros")
    assert airoboros.params.stop == ("END", "USER:", "ASSISTANT:", "### Instruction", "### Response")
