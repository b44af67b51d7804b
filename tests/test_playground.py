"""The sampling playground: POST /v1/explain, the page at /playground driven in a real
browser (Debian's Chromium through Playwright), `llama-ref explain --html`, and tokens shown
as the text a person reads."""
import json
import os
import shutil

import httpx
import numpy as np
import pytest
import sentencepiece
import tokenizers
from playwright.sync_api import sync_playwright

import llama_ref
from llama_ref import SamplingParams
from llama_ref.decoding.trace import display_token
from llama_ref.server.thread import ThreadServer
from llama_ref.tools.assets import AssetError
from llama_ref.tokenizer import HFTokenizer, load_tokenizer
from llama_ref.tools.synth import llama2_tokenizer_model
from test_cli import run_cli
from test_server import openai_error, served_checkpoint

PROMPT = "The capital of France is"
PARAMS = dict(temperature=0.8, top_k=8, top_p=0.9, seed=7, max_tokens=6)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return served_checkpoint(tmp_path_factory.mktemp("playground"))


@pytest.fixture(scope="module")
def model(model_dir):
    return llama_ref.load_model(model_dir)


@pytest.fixture(scope="module")
def server(model):
    running = ThreadServer(model)
    yield running
    running.stop()


def traced(model, prompt, compare_profile=None, **request):
    """The events of generate(..., trace=True) for the request's parameters, run directly."""
    params = SamplingParams(**{k: v for k, v in request.items() if k != "max_tokens"},
                            max_new_tokens=request["max_tokens"])
    return list(model.generate(prompt, params, trace=True, compare_profile=compare_profile))


def byte_level_tokenizer():
    """A byte-level BPE (GPT-2's, SmolLM2's scheme) trained here by the tokenizers library, and ours on it."""
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["<|im_end|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["The capital of France is Paris. " * 20, "naïve café\n"], trainer)
    return bpe, HFTokenizer(bpe, bos=None, eos="<|im_end|>")


def test_tokens_are_shown_as_a_person_reads_them(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(llama2_tokenizer_model())
    spm = load_tokenizer(tmp_path)
    library = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    shown = {"▁Paris": "␣Paris", "<0xE2>": "<0xE2>", "<0x0A>": "\\n", "<0x09>": "\\t", "<0x00>": "<0x00>",
             "</s>": "</s>", "▁▁": "␣␣", "é": "é"}
    assert {piece: display_token(library.piece_to_id(piece), spm) for piece in shown} == shown
    # Byte-level pieces: "Ġ" is a space, "Ċ" a newline, "â" alone the byte 0xE2 (half a character).
    bpe, vocab = byte_level_tokenizer()
    pieces = {"ĠParis": "␣Paris", "â": "<0xE2>", "Ċ": "\\n", "<|im_end|>": "<|im_end|>"}
    ids = {piece: bpe.token_to_id(piece) for piece in pieces}
    assert None not in ids.values(), ids
    assert {piece: display_token(ids[piece], vocab) for piece in pieces} == pieces
    assert display_token(5) == "5"


def test_explain_is_the_trace_of_generate(server, model):
    body = httpx.post(server.url + "/v1/explain", json={"model": "tiny", "prompt": PROMPT, **PARAMS}).json()
    events = traced(model, PROMPT, **PARAMS)
    assert [step["token_id"] for step in body["steps"]] == [e.token_id for e in events]
    assert [step["trace"]["stages"] for step in body["steps"]] == \
        [json.loads(json.dumps(e.trace.to_dict()))["stages"] for e in events]
    assert body["text"] == "".join(e.delta for e in events) and body["seed"] == 7
    assert body["prompt"] == "<s>" + PROMPT and body["compare_profile"] is None     # special tokens shown
    assert body["steps"][0]["trace"]["labels"] == [display_token(i, model.tokenizer)
                                                   for i in events[0].trace.candidates]


def test_the_compared_profile_sees_the_same_logits_and_draw(server, model):
    """While the two profiles have chosen the same tokens, the compared trace is exactly what a
    run under that profile records at that step."""
    request = dict(PARAMS, repetition_penalty=1.3, max_tokens=12)
    body = httpx.post(server.url + "/v1/explain", json={"model": "tiny", "prompt": PROMPT, "profile": "reference",
                                                        "compare_profile": "llama.cpp", **request}).json()
    alone = traced(model, PROMPT, **dict(request, profile="llama.cpp"))
    checked = 0
    for step, event in zip(body["steps"], alone):
        compared = step["trace"]["compared"]
        assert compared["profile"] == "llama.cpp"
        assert compared["stages"] == json.loads(json.dumps(event.trace.to_dict()))["stages"]
        assert compared["uniform"] == event.trace.uniform and compared["token_id"] == event.token_id
        checked += 1
        if step["token_id"] != event.token_id:
            break
    assert checked >= 1


@pytest.mark.parametrize("change, param", [
    ({"temperature": 3}, "temperature"), ({"top_p": 1.5}, "top_p"), ({"max_tokens": 257}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "prompt"), ({"prompt": None}, "prompt"),
    ({"profile": "openai"}, "profile"), ({"compare_profile": "x"}, "compare_profile"),
    ({"compare_profile": "hf", "presence_penalty": 0.5}, "compare_profile"), ({"stop": ["a"] * 17}, "stop"),
    ({"unknown": 1}, "unknown"), ({"model": "nope"}, "model")])
def test_invalid_explain_requests_are_4xx_naming_the_field(server, change, param):
    body = {"model": "tiny", "prompt": PROMPT, **change}
    openai_error(httpx.post(server.url + "/v1/explain", json={k: v for k, v in body.items() if v is not None}),
                 404 if param == "model" else 400, param)


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium driven by Playwright (its own browser download cannot work here)."""
    executable = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(executable):
        raise AssetError("chromium: Debian's chromium package is not installed (make test installs it as root)")
    with sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=executable, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield launched
        launched.close()


def shown_step(page, profile: str) -> dict:
    """What the page shows for the selected step in `profile`'s panel."""
    panel = page.locator(f'.panel[data-profile="{profile}"]')
    stages = panel.locator("thead th[data-stage]")
    return {"settings": [stages.nth(i).get_attribute("data-stage") for i in range(stages.count())],
            "survivors": [int(text.split()[-2]) for text in stages.all_inner_texts()],
            "chosen": panel.locator(".panel-chosen").inner_text(),
            "chosen_row": int(panel.locator("tr.chosen").get_attribute("data-token-id")),
            "kept": {int(row.get_attribute("data-token-id")) for row in panel.locator("tbody tr").all()
                     if row.locator("td.cell").last.get_attribute("class").endswith("survivor")}}


def expected_step(trace, tokenizer) -> dict:
    active = [s for s in trace.stages if s.active]
    return {"settings": [s.stage for s in active], "survivors": [s.survivors for s in active],
            "chosen": display_token(trace.token_id, tokenizer), "chosen_row": trace.token_id,
            "kept": {i for i, z in zip(trace.candidates, active[-1].logits) if np.isfinite(z)}}


def test_the_page_shows_the_trace_of_generate(server, model, browser):
    page = browser.new_page()
    page.goto(server.url + "/playground")
    page.wait_for_function("document.getElementById('model').options.length > 0")
    page.fill("#prompt", PROMPT)
    for name in ["temperature", "top_k", "top_p", "seed", "max_tokens"]:
        page.fill(f"#{name}", str(PARAMS[name]))
    page.select_option("#compare_profile", "llama.cpp")
    page.click("#generate")
    page.wait_for_selector("#stepper:not([hidden])")
    events = traced(model, PROMPT, compare_profile="llama.cpp", **PARAMS)
    assert page.locator("#text .tok").count() == len(events)
    for step in [len(events) - 1, 2, 0]:
        page.fill("#step", str(step))                  # the slider
        trace = events[step].trace
        assert page.locator("#chosen").inner_text() == display_token(trace.token_id, model.tokenizer)
        assert page.locator("#text .tok.selected").get_attribute("data-step") == str(step)
        assert shown_step(page, "reference") == expected_step(trace, model.tokenizer)
        assert shown_step(page, "llama.cpp") == expected_step(trace.compared, model.tokenizer)
    # A rule broken on the page comes back as the API's message, naming the field.
    page.fill("#top_p", "1.5")
    page.click("#generate")
    page.wait_for_function("document.getElementById('error').textContent.includes('top_p')")
    page.close()


def test_explain_html_writes_the_same_view(model_dir, model, browser, tmp_path):
    html = tmp_path / "step.html"
    result = run_cli("explain", "--model", str(model_dir), "--prompt", PROMPT, "--temperature", "0.8", "--top-k", "8",
                     "--top-p", "0.9", "--seed", "7", "--max-new-tokens", "6", "--step", "2", "--html", str(html))
    assert result.returncode == 0, result.stderr
    events = traced(model, PROMPT, **PARAMS)
    assert f"chosen {events[2].token_id} {display_token(events[2].token_id, model.tokenizer)}" in result.stdout
    page = browser.new_page()
    page.goto(html.as_uri())
    assert page.locator("#controls").is_hidden()
    assert page.locator("#text .tok").count() == len(events)
    page.fill("#step", "2")
    assert shown_step(page, "reference") == expected_step(events[2].trace, model.tokenizer)
    page.close()
