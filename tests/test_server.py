"""The HTTP server, started for real (`llama-ref serve` in a subprocess on a loopback port) and
driven by the official openai client and by raw HTTP."""
import http.server
import json
import re
import subprocess
import sys
import tempfile
import threading
import time

from pathlib import Path

import asyncio

import httpx
import numpy as np
import openai
import pytest

import llama_ref
from llama_ref.decoding.params import RULES
from llama_ref.server import thread
from llama_ref.server.thread import free_port
from llama_ref.server.native import native_stream
from llama_ref.server.openai import token_logprob
from llama_ref.server.schemas import ChatRequest, NativeRequest, sampling_field
from llama_ref.tokenizer import SentencePieceTokenizer
from llama_ref.tools.synth import llama2_tokenizer_model
from conftest import make_checkpoint


class Server:
    def __init__(self, model_dir, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llama_ref.cli", "serve", "--model", str(model_dir), "--port", str(self.port),
             "--served-model-name", "tiny", "--alias", "default=tiny", *args],
            stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
            if self.process.poll() is not None:
                raise RuntimeError(self.output())
        raise RuntimeError("the server did not start")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self):
        """Stop the server; no request may have failed on its side (see no_server_errors)."""
        try:
            no_server_errors(self.url)
        finally:
            self.process.terminate()
            self.process.wait(timeout=30)
        assert "Traceback" not in self.output(), self.output()


def no_server_errors(url: str) -> None:
    """The server's own count of requests that failed on its side (a 500, or an exception in
    a stream whose 200 had already gone out): the logs, at warning level, show neither."""
    health = httpx.get(url + "/health").json()
    assert health["server_errors"] == 0, health


class ThreadServer(thread.ThreadServer):
    """The in-process server, whose stop() also checks that it counted no 5xx of its own."""

    def stop(self, check: bool = True):
        try:
            if check:
                no_server_errors(self.url)
        finally:
            super().stop()


def wait_until(condition, failure: str, timeout: float = 60.0) -> None:
    """Poll a condition of the server's state; no sleep stands in for an event."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.01)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return served_checkpoint(tmp_path_factory.mktemp("served"))


def served_checkpoint(directory, **overrides):
    """A random checkpoint with Llama-2's vocabulary and tokenizer.model."""
    make_checkpoint(directory, overrides=dict(vocab_size=32000, **overrides))
    (directory / "tokenizer.model").write_bytes(llama2_tokenizer_model())
    return directory


@pytest.fixture(scope="module")
def server(model_dir):
    running = Server(model_dir, "--price-per-mtoken", "0.2", *[f"--alias={name}=tiny" for name in SEED_MODELS])
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1/openai", api_key="unused", max_retries=0)


SEED_MODELS = ["Gryphe/MythoMax-L2-13b", "01-ai/Yi-34B-Chat", "meta-llama/Llama-2-70b-chat-hf"]

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi 😀"}]


def test_chat_completion_fields(client):
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, seed=3)
    choice = response.choices[0]
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = response.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and 1 <= usage.completion_tokens <= 12
    assert usage.model_extra["estimated_cost"] == pytest.approx(usage.total_tokens * 0.2 / 1e6)


@pytest.mark.parametrize("extra", [dict(), dict(stop=["e", " the"]), dict(temperature=0), dict(extra_body={"top_k": 5, "min_p": 0.05}, top_p=0.8)])
def test_streamed_content_equals_the_non_streamed_content(client, extra):
    kwargs = dict(model="default", messages=MESSAGES, max_tokens=24, seed=11, **extra)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    for stop in extra.get("stop", []):
        assert stop not in content


def not_json(constant):
    raise ValueError(f"{constant} is not JSON")


def test_n_2_choice_0_equals_n_1_and_logprobs(client):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=10, seed=5, temperature=0.9)
    both = client.chat.completions.create(n=2, **kwargs)
    one = client.chat.completions.create(**kwargs)
    assert both.choices[0].message.content == one.choices[0].message.content
    assert both.usage.completion_tokens > one.usage.completion_tokens
    scored = client.chat.completions.create(logprobs=True, top_logprobs=3, **kwargs)
    content = scored.choices[0].logprobs.content
    assert len(content) == scored.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    streamed = [c for c in client.chat.completions.create(logprobs=True, top_logprobs=3, stream=True, **kwargs)
                if c.choices and c.choices[0].logprobs]
    assert [t.logprob for c in streamed for t in c.choices[0].logprobs.content] == [t.logprob for t in content]
    filtered = dict(kwargs, logprobs=True, top_logprobs=5)             # more than top_k 2 keeps
    content = client.chat.completions.create(**filtered, extra_body={"top_k": 2}).choices[0].logprobs.content
    assert all(1 <= len(t.top_logprobs) <= 2 for t in content)
    streamed = [json.loads(line[len("data: "):], parse_constant=not_json) for line in httpx.post(
        f"{client.base_url}chat/completions", json={**filtered, "top_k": 2, "stream": True}).text.splitlines()
        if line.startswith("data: {")]                                  # strict JSON: no -Infinity
    assert all(1 <= len(t["top_logprobs"]) <= 2 for c in streamed if c["choices"] and c["choices"][0]["logprobs"]
               for t in c["choices"][0]["logprobs"]["content"])


def test_json_mode_through_the_openai_client(client):
    """20 seeded requests on random weights: every answer parses and finishes with stop (the
    JSON-mode suite, test_constrained, runs the constraint itself on many more)."""
    for seed in range(20):
        kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=20 + seed % 20, seed=seed,
                      response_format={"type": "json_object"})
        whole = client.chat.completions.create(**kwargs)
        assert isinstance(json.loads(whole.choices[0].message.content), dict), whole.choices[0].message.content
        assert whole.choices[0].finish_reason == "stop"
        if seed < 5:
            streamed = client.chat.completions.create(stream=True, **kwargs)
            assert "".join(c.choices[0].delta.content or "" for c in streamed) == whole.choices[0].message.content


def masked(event: dict) -> dict:
    """An event with the values that vary per run replaced by their types."""
    return {k: masked(v) if isinstance(v, dict) else [masked(x) if isinstance(x, dict) else type(x).__name__ for x in v]
            if isinstance(v, list) else v if k in ("object", "role", "finish_reason", "special") or v is None
            else type(v).__name__ for k, v in event.items()}


def test_raw_sse_bytes_have_the_documented_shapes(server):
    native = httpx.post(f"{server.url}/v1/inference/tiny", json={"input": "hi", "max_new_tokens": 2, "stream": True,
                                                                 "temperature": 0}).text
    assert native.endswith("\n\n") and "\r" not in native
    events = [json.loads(block[len("data: "):]) for block in native.strip().split("\n\n")]
    assert [masked(e) for e in events] == [
        {"token": {"id": "int", "text": "str", "logprob": "float", "special": False}, "generated_text": None,
         "details": None},
        {"token": {"id": "int", "text": "str", "logprob": "float", "special": events[1]["token"]["special"]},
         "generated_text": "str", "details": {"finish_reason": events[1]["details"]["finish_reason"],
                                              "generated_tokens": "int", "input_tokens": "int", "seed": None}}]
    chat = httpx.post(f"{server.url}/v1/openai/chat/completions", json={
        "model": "tiny", "messages": MESSAGES, "max_tokens": 1, "stream": True, "temperature": 0,
        "stream_options": {"include_usage": True}}).text
    blocks = chat.strip().split("\n\n")
    assert blocks[-1] == "data: [DONE]"
    chunks = [masked(json.loads(block[len("data: "):])) for block in blocks[:-1]]
    head = {"id": "str", "object": "chat.completion.chunk", "created": "int", "model": "str"}
    assert chunks[0] == {**head, "choices": [{"index": "int", "delta": {"role": "assistant", "content": "str"},
                                              "logprobs": None, "finish_reason": None}]}
    finish = chunks[-2]["choices"][0]["finish_reason"]
    assert finish in ("stop", "length") and chunks[-2] == {
        **head, "choices": [{"index": "int", "delta": {}, "logprobs": None, "finish_reason": finish}]}
    assert chunks[-1] == {**head, "choices": [], "usage": {"prompt_tokens": "int", "completion_tokens": "int",
                                                           "total_tokens": "int", "estimated_cost": "float"}}


def test_completions_with_echo(client):
    whole = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, seed=2, echo=True)
    assert whole.choices[0].text.startswith("Once upon a time")
    streamed = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, seed=2, echo=True,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_models(client):
    assert {m.id for m in client.models.list()} == {"tiny", "default", *SEED_MODELS}


def curl(url, body):
    return subprocess.run(["curl", "-sS", url, "-H", "Content-Type: application/json", "-d", body],
                          capture_output=True, text=True, check=True, timeout=120).stdout


def test_the_seeds_openai_curl_examples_run_verbatim(server):
    """Each curl command of the provider's chat docs, run by bash as written, the URL changed."""
    text = (Path(__file__).parent / "data" / "seed_curl_commands.sh").read_text()
    commands = re.findall(r"""^curl "https://[^"]+/v1/openai/chat/completions".*?\n\s*\}'""", text, re.DOTALL | re.M)
    assert len(commands) == 6
    for command in commands:
        command = re.sub(r'"https://[^"]+/v1/openai', f'"{server.url}/v1/openai', command, count=1)
        out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=True, timeout=120,
                             env={"PATH": "/usr/bin:/bin", "DEEPINFRA_TOKEN": "unused"}).stdout
        model = re.search(r'"model": "([^"]+)"', command).group(1)
        if '"stream": true' in command:
            events = out.strip().split("\n\n")
            assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])
            chunks = [json.loads(e[6:]) for e in events[:-1]]
            assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"]
            assert all(c["object"] == "chat.completion.chunk" and c["model"] == model for c in chunks)
        else:
            response = json.loads(out)
            assert response["object"] == "chat.completion" and response["model"] == model
            assert response["choices"][0]["message"]["role"] == "assistant"


def test_the_seeds_native_curl_examples(server):
    # The seed page cuts both bodies off before their closing brace; completed here.
    url = server.url + "/v1/inference/meta-llama/Llama-2-70b-chat-hf"
    response = json.loads(curl(url, '{\n     "input": "[INST] Just say hi! [/INST] "\n}'))
    assert response["inference_status"]["tokens_input"] == response["num_input_tokens"] > 0
    events = curl(url, '{\n     "input": "[INST] Just say hi! [/INST] ",\n     "stream": true\n}').strip().split("\n\n")
    assert all(e.startswith("data: {") for e in events) and json.loads(events[-1][6:])["details"] is not None


def sse_events(response) -> list[dict]:
    lines = [line for line in response.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    return [json.loads(line[len("data: "):]) for line in lines]


def test_native_route_streamed_and_not(server):
    body = {"input": "[INST] Just say hi! [/INST] ", "max_new_tokens": 16, "seed": 4}
    whole = httpx.post(f"{server.url}/v1/inference/tiny", json=body).json()
    assert set(whole) == {"request_id", "inference_status", "results", "num_tokens", "num_input_tokens"}
    assert whole["inference_status"]["status"] == "succeeded"
    stream = httpx.post(f"{server.url}/v1/inference/tiny", json={**body, "stream": True})
    events = sse_events(stream)
    assert all(set(e["token"]) == {"id", "text", "logprob", "special"} for e in events)
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    assert last["generated_text"] == whole["results"][0]["generated_text"]
    assert last["details"]["generated_tokens"] == len(events) == whole["num_tokens"]
    assert last["details"]["seed"] == 4 and last["details"]["finish_reason"] in ("eos_token", "length", "stop_sequence")


def test_webhook_gets_the_final_body(server):
    received = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass
    receiver = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        body = {"input": "hi", "max_new_tokens": 5, "seed": 9, "webhook": f"http://127.0.0.1:{receiver.server_port}/"}
        reply = httpx.post(f"{server.url}/v1/inference/tiny", json=body).json()
        assert reply["inference_status"]["status"] == "queued"
        deadline = time.time() + 60
        while not received and time.time() < deadline:
            time.sleep(0.1)
        direct = httpx.post(f"{server.url}/v1/inference/tiny", json={**body, "webhook": None}).json()
        assert received[0]["request_id"] == reply["request_id"]
        assert received[0]["results"] == direct["results"]
    finally:
        receiver.shutdown()
    bad = httpx.post(f"{server.url}/v1/inference/tiny", json={**body, "webhook": "ftp://x"})
    assert bad.status_code == 400 and "webhook" in bad.json()["error"]


def test_request_bounds_come_from_the_parameter_rules_and_only_narrow_them():
    native = NativeRequest.model_json_schema()["properties"]
    assert native["top_k"]["maximum"] == RULES["top_k"].high
    assert native["top_p"]["exclusiveMinimum"] == RULES["top_p"].low
    assert native["repetition_penalty"]["minimum"] == RULES["repetition_penalty"].low
    chat = ChatRequest.model_json_schema()["properties"]
    assert chat["temperature"]["maximum"] == 2 < RULES["temperature"].high      # OpenAI's own range
    assert chat["top_k"]["maximum"] == 999 < RULES["top_k"].high
    with pytest.raises(ValueError, match=r"temperature: \[0, 101\] is wider than its rule \[0, 100\]"):
        sampling_field("temperature", high=101)


def openai_error(response, status, param):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"], error
    return error


@pytest.mark.parametrize("change, param", [
    (dict(temperature=3), "temperature"), (dict(top_p=0), "top_p"), (dict(n=3), "n"),
    (dict(max_tokens=-1), "max_tokens"), (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(seed=-1), "seed"), (dict(unknown_field=1), "unknown_field"), (dict(stop=[""]), "stop"),
    (dict(stop=[str(i) for i in range(17)]), "stop"), (dict(stream=True, n=2), "n"),
    (dict(messages=[]), "messages"), (dict(messages=[{"role": "assistant", "content": "x"}]), "messages"),
    (dict(response_format={"type": "xml"}), "response_format.type"),
])
def test_invalid_chat_requests_are_4xx_naming_the_field(server, change, param):
    body = {"model": "tiny", "messages": MESSAGES, **change}
    openai_error(httpx.post(f"{server.url}/v1/openai/chat/completions", json=body), 400, param)


@pytest.mark.parametrize("change, field", [
    (dict(temperature=101), "temperature"), (dict(top_p=1.5), "top_p"), (dict(top_k=100_000), "top_k"),
    (dict(min_p=-0.1), "min_p"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(num_responses=3), "num_responses"), (dict(seed=2**63), "seed"), (dict(stop=["x"] * 17), "stop"),
    (dict(typo=True), "typo"), (dict(input=None), "input"), (dict(response_format={"type": "yaml"}), "response_format"),
])
def test_invalid_native_requests_are_4xx_naming_the_field(server, change, field):
    response = httpx.post(f"{server.url}/v1/inference/tiny", json={"input": "hi", **change})
    assert response.status_code == 400 and field in response.json()["error"], response.text
    assert response.json()["error_type"] == "validation"


def test_unknown_model_context_overflow_and_malformed_bodies(server):
    error = openai_error(httpx.post(f"{server.url}/v1/chat/completions", json={"model": "gpt-4", "messages": MESSAGES}),
                         404, "model")
    assert error["code"] == "model_not_found"
    long = {"model": "tiny", "messages": [{"role": "user", "content": "word " * 400}], "max_tokens": None}
    error = openai_error(httpx.post(f"{server.url}/v1/chat/completions", json=long), 400, "prompt")
    assert error["code"] == "context_length_exceeded"
    bad = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400
    native = httpx.post(f"{server.url}/v1/inference/tiny", json={"input": "hi", "num_responses": 2, "stream": True})
    assert native.status_code == 400 and "num_responses" in native.json()["error"]


def test_api_key(model_dir):
    guarded = Server(model_dir, "--api-key", "sesame")
    try:
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2}
        assert httpx.post(f"{guarded.url}/v1/chat/completions", json=body).status_code == 401
        wrong = httpx.post(f"{guarded.url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer x"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        right = httpx.post(f"{guarded.url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer sesame"})
        assert right.status_code == 200
    finally:
        guarded.stop()


def loaded(model_dir, change=None):
    """A fresh Model of the served checkpoint whose forward_chunks (which every forward pass
    goes through) is wrapped: change(original, chunks) -> [logits (n, vocab) per chunk]."""
    model = llama_ref.load_model(model_dir)
    if change is not None:
        original = model.forward_chunks
        model.forward_chunks = lambda *args: change(original, *args)
    return model


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory):
    """The served model with a 4096-token context: room for a long generation."""
    return served_checkpoint(tmp_path_factory.mktemp("long"), max_position_embeddings=4096)


def test_a_client_that_leaves_stops_its_generation(long_model_dir):
    """EOS masked and no max_new_tokens: only cancellation ends this generation early."""
    def without_eos(forward, *args):
        logits = forward(*args)
        for rows in logits:
            rows[:, 2] = -np.inf                    # </s>, the checkpoint's and the tokenizer's EOS
        return logits
    model = loaded(long_model_dir, without_eos)
    served = ThreadServer(model)
    try:
        body = {"input": "Tell me a long story", "max_new_tokens": None, "stream": True, "seed": 1}
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", f"{served.url}/v1/inference/tiny", json=body) as response:
                events = 0
                for line in response.iter_lines():
                    events += line.startswith("data: ")
                    if events == 3:
                        break
        wait_until(lambda: served.state.engines["tiny"].in_flight == 0, "the generation did not stop", timeout=300)
        room = 4096 - len(model.tokenizer.encode(body["input"], bos=True, eos=False))
        assert 3 <= served.state.engines["tiny"].generated_tokens < room // 4, (served.state.engines["tiny"].generated_tokens, room)
    finally:
        served.stop()


def test_queue_full_is_503_and_queued_clients_get_their_own_answers(model_dir):
    """One request runs (held inside its prefill), one waits, the third is refused."""
    release = threading.Event()

    def held(forward, *args):
        assert release.wait(timeout=60)
        return forward(*args)
    served = ThreadServer(loaded(model_dir, held), max_batch=1, max_queue=1)
    try:
        def body(i):
            return {"model": "tiny", "messages": [{"role": "user", "content": f"Count to {i}"}], "max_tokens": 20,
                    "seed": i}
        results = {}

        def ask(i):
            results[i] = httpx.post(f"{served.url}/v1/chat/completions", json=body(i), timeout=120)
        threads = [threading.Thread(target=ask, args=(i,)) for i in (1, 2)]
        for t in threads:
            t.start()
        wait_until(lambda: served.state.engines["tiny"].in_flight == 2, "two requests were not admitted")
        refused = httpx.post(f"{served.url}/v1/chat/completions", json=body(3), timeout=30)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "overloaded"
        release.set()
        for t in threads:
            t.join()
        for i in (1, 2):
            alone = httpx.post(f"{served.url}/v1/chat/completions", json=body(i), timeout=120).json()
            assert results[i].json()["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"]
    finally:
        release.set()
        served.stop()


def test_a_failure_on_the_server_side_is_counted_and_fails_the_check(model_dir):
    def broken(forward, *args):
        raise RuntimeError("a bug in the forward pass")
    served = ThreadServer(loaded(model_dir, broken))
    try:
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4}
        whole = httpx.post(f"{served.url}/v1/chat/completions", json=body)
        assert whole.status_code == 500 and whole.json()["error"]["type"] == "server_error"
        streamed = httpx.post(f"{served.url}/v1/chat/completions", json={**body, "stream": True})
        last = json.loads(streamed.text.strip().split("\n\n")[-1][len("data: "):])   # the 200 had gone out
        assert last["error"]["code"] == "internal_error" and "a bug in the forward pass" in last["error"]["message"]
        native = httpx.post(f"{served.url}/v1/inference/tiny", json={"input": "hi", "stream": True})
        assert json.loads(native.text.strip()[len("data: "):])["error_type"] == "internal"
        wait_until(lambda: served.state.server_errors == 3, "the broken streams were not counted")
        with pytest.raises(AssertionError, match="assert 3 == 0"):
            no_server_errors(served.url)
    finally:
        served.stop(check=False)


def test_a_body_over_the_limit_gets_413_at_once(model_dir):
    served = ThreadServer(llama_ref.load_model(model_dir), max_body_bytes=100_000)
    try:
        url = f"{served.url}/v1/chat/completions"
        big = b'{"model": "tiny", "messages": [{"role": "user", "content": "' + b"x" * 64_000_000 + b'"}]}'
        started = time.monotonic()
        declared = httpx.post(url, content=big, headers={"content-type": "application/json"}, timeout=60)
        chunked = httpx.post(url, content=iter([big[i:i + 65536] for i in range(0, 1_000_000, 65536)]),
                             headers={"content-type": "application/json"}, timeout=60)
        assert time.monotonic() - started < 20
        for response in (declared, chunked):
            assert response.status_code == 413, response.text
            error = response.json()["error"]
            assert error["code"] == "payload_too_large" and "request body: at most 100000 bytes" in error["message"]
        native = httpx.post(f"{served.url}/v1/inference/tiny", content=big[:200_000], timeout=60)
        assert native.status_code == 413 and "--max-body-bytes" in native.json()["error"]
        fits = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 90_000}], "max_tokens": 1}
        assert httpx.post(url, json=fits, timeout=60).status_code == 400     # read whole: too long for the context
    finally:
        served.stop()


def test_the_native_stream_builds_its_last_event_from_the_events_alone(model_dir):
    """The worker thread may still be inside the generation when its last event arrives, so
    the stream must not ask the generation for its result on the event loop."""
    generation = llama_ref.load_model(model_dir).generate("hi", llama_ref.SamplingParams(max_new_tokens=5, seed=2))
    events = list(generation)

    def result():
        raise AssertionError("generation.result() called by the stream")
    generation.result = result

    async def replay():
        for event in events:
            yield event

    async def collect():
        return [json.loads(chunk) async for chunk in native_stream(generation, replay())]
    last = asyncio.run(collect())[-1]
    assert last["generated_text"] == "".join(e.delta for e in events)
    assert last["details"]["generated_tokens"] == len(events) == 5
    assert last["details"]["input_tokens"] == len(generation.prompt_ids)


def test_logprob_bytes_are_the_token_s_own():
    """Llama-2's vocabulary, read by hand: id 229 is the byte piece <0xE2> (ids 3-258 are the
    bytes 0x00-0xFF), id 2 is </s>."""
    tokenizer = SentencePieceTokenizer(llama2_tokenizer_model())
    [paris] = tokenizer.encode_text("Paris")                # "▁Paris": the dummy prefix gives the space
    assert token_logprob(tokenizer, 229, -1.0) == {"token": "\\xe2", "logprob": -1.0, "bytes": [0xE2]}
    assert token_logprob(tokenizer, paris, -0.5)["bytes"] == list(b" Paris")
    assert token_logprob(tokenizer, 2, -2.0) == {"token": "</s>", "logprob": -2.0, "bytes": None}


def test_logprob_bytes_join_up_into_the_content(model_dir):
    """A model made to answer "€ Paris" with the euro sign spelled by three byte pieces
    (E2 82 AC: Llama-2 ids 3 + byte) must report each piece's own byte."""
    script = iter([3 + 0xE2, 3 + 0x82, 3 + 0xAC, 3681, 2])             # 3681 is "▁Paris", 2 is </s>

    def scripted(forward, *args):
        logits, token = forward(*args), next(script)
        for rows in logits:
            rows[:, token] = 1e4
        return logits
    served = ThreadServer(loaded(model_dir, scripted))
    try:
        body = {"model": "tiny", "messages": MESSAGES, "temperature": 0, "logprobs": True, "top_logprobs": 2}
        choice = httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
        tokens = choice["logprobs"]["content"]
        assert choice["message"]["content"] == "€ Paris"
        assert [t["bytes"] for t in tokens] == [[0xE2], [0x82], [0xAC], list(b" Paris"), None]
        assert [t["token"] for t in tokens] == ["\\xe2", "\\x82", "\\xac", " Paris", "</s>"]
        assert tokens[0]["top_logprobs"][0]["bytes"] == [0xE2]
    finally:
        served.stop()


@pytest.mark.slow
def test_the_default_model_served_answers_the_banner_s_question():
    """What `make run` starts, asked what its banner shows."""
    served = Server("default")
    try:
        answer = httpx.post(f"{served.url}/v1/openai/chat/completions", timeout=120, json={
            "model": "default", "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}).json()
        assert "Paris" in answer["choices"][0]["message"]["content"]
    finally:
        served.stop()
