"""What the server does under faults and what it reports (docs/reliability.md): /metrics
against the requests sent, /ready, the access log, the API key and CORS, a SIGTERM drain,
hostile bodies, and model files that go away under it."""
import http.server
import json
import logging
import time
import os
import shutil
import signal
import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import llama_ref
from test_server import Server, ThreadServer, served_checkpoint, wait_until


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return served_checkpoint(tmp_path_factory.mktemp("reliable"), max_position_embeddings=4096)


@pytest.fixture(scope="module")
def model(model_dir):
    return llama_ref.load_model(model_dir)


def scrape(url: str) -> dict:
    """{(metric sample name, frozenset of labels): value} from /metrics."""
    text = httpx.get(url + "/metrics").text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_agree_with_the_requests_sent(model):
    server = ThreadServer(model)
    try:
        usages = []
        for i in range(3):
            body = {"model": "tiny", "messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 4 + i,
                    "temperature": 0, "ignore_eos": True}
            usages.append(httpx.post(server.url + "/v1/openai/chat/completions", json=body).json()["usage"])
        streamed = {"model": "tiny", "prompt": "once", "max_tokens": 6, "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}
        with httpx.stream("POST", server.url + "/v1/completions", json=streamed) as response:
            lines = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        usages.append(lines[-1]["usage"])
        assert httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "top_p": 7}
                          ).status_code == 400
        embedded = httpx.post(server.url + "/v1/embeddings", json={"model": "tiny", "input": ["a b", "c"]}).json()
        metrics = scrape(server.url)
    finally:
        server.stop()

    def value(name, **labels):
        return metrics[(name, frozenset(labels.items()))]
    assert value("llama_ref_requests_total", route="/v1/openai/chat/completions", status="200") == 3
    assert value("llama_ref_requests_total", route="/v1/completions", status="200") == 1
    assert value("llama_ref_requests_total", route="/v1/completions", status="400") == 1
    assert value("llama_ref_requests_total", route="/v1/embeddings", status="200") == 1
    assert value("llama_ref_generation_tokens_total") == sum(u["completion_tokens"] for u in usages) == 4 + 5 + 6 + 6
    assert value("llama_ref_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages) + \
        embedded["usage"]["prompt_tokens"]
    assert value("llama_ref_time_to_first_token_seconds_count") == 4
    assert value("llama_ref_inter_token_latency_seconds_count") == sum(u["completion_tokens"] - 1 for u in usages)
    assert value("llama_ref_request_duration_seconds_count", route="/v1/completions") == 2
    assert value("llama_ref_requests_waiting") == 0 and value("llama_ref_running_sequences") == 0
    assert value("llama_ref_batch_steps_total") >= 4 + 5 + 6 + 6


def test_the_access_log_has_one_json_line_per_request_and_no_content(model, caplog):
    server = ThreadServer(model)
    try:
        with caplog.at_level(logging.INFO, logger="llama_ref.access"):
            response = httpx.post(server.url + "/v1/completions", json={
                "model": "tiny", "prompt": "SECRET PROMPT", "max_tokens": 3, "ignore_eos": True, "user": "SECRET USER"})
            missing = httpx.post(server.url + "/v1/nowhere", json={})
            # A request's line is written once its response has gone out, which the client may see first.
            wait_until(lambda: len(access_lines(caplog)) == 2, "an access log line is missing")
    finally:
        server.stop()
    lines = access_lines(caplog)
    assert lines[0] == {**lines[0], "request_id": response.headers["x-request-id"], "method": "POST",
                        "route": "/v1/completions", "status": 200, "prompt_tokens": response.json()["usage"]
                        ["prompt_tokens"], "completion_tokens": 3}
    assert lines[0]["duration_ms"] > 0
    assert lines[1]["route"] == "unmatched" and lines[1]["status"] == missing.status_code == 404
    assert "SECRET" not in caplog.text


def access_lines(caplog) -> list[dict]:
    return [json.loads(record.getMessage()) for record in caplog.records if record.name == "llama_ref.access"]


def test_ready_turns_503_while_the_queue_is_full(model_dir):
    gate = threading.Event()

    def held(forward, chunks):
        gate.wait(60)
        return forward(chunks)
    model = llama_ref.load_model(model_dir)
    original = model.forward_chunks
    model.forward_chunks = lambda chunks: held(original, chunks)
    server = ThreadServer(model, max_batch=1, max_queue=1)
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    threads = [threading.Thread(target=httpx.post, args=(server.url + "/v1/completions",), kwargs=dict(
        json=body, timeout=60)) for _ in range(2)]
    try:
        assert httpx.get(server.url + "/ready").json() == {"status": "ready"}
        for thread in threads:
            thread.start()
        engine = server.state.engines["tiny"]
        wait_until(lambda: len(engine.waiting) == 1, "the second request never queued")
        busy = httpx.get(server.url + "/ready")
        assert busy.status_code == 503 and busy.json() == {"status": "busy"}
        gate.set()
        for thread in threads:
            thread.join()
        assert httpx.get(server.url + "/ready").status_code == 200
    finally:
        gate.set()
        server.stop()


def test_the_api_key_comes_from_a_file_and_is_compared_whole(model_dir, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key\n")
    server = Server(model_dir, "--api-key-file", str(key_file))
    try:
        url, body = server.url + "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 1}
        for header in [None, "Bearer s3cret", "Bearer s3cret-key-and-more", "s3cret-key", "Basic s3cret-key"]:
            headers = {"authorization": header} if header else {}
            assert httpx.post(url, json=body, headers=headers).status_code == 401, header
        assert httpx.post(url, json=body, headers={"authorization": "Bearer s3cret-key"}).status_code == 200
        assert httpx.get(server.url + "/health").status_code == 200     # outside /v1: no key needed
    finally:
        server.stop()
    assert "s3cret" not in server.output()


def test_cors_only_for_the_origins_given(model):
    server = ThreadServer(model, cors_origins=("http://teach.example",))
    plain = ThreadServer(model)
    preflight = {"origin": "http://teach.example", "access-control-request-method": "POST"}
    try:
        allowed = httpx.options(server.url + "/v1/completions", headers=preflight)
        assert allowed.headers["access-control-allow-origin"] == "http://teach.example"
        other = httpx.options(server.url + "/v1/completions", headers={**preflight, "origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        assert "access-control-allow-origin" not in httpx.options(plain.url + "/v1/completions",
                                                                  headers=preflight).headers
    finally:
        server.stop()
        plain.stop()


def test_sigterm_lets_the_streams_in_flight_finish_and_refuses_new_connections(model_dir, model):
    server = Server(model_dir, "--shutdown-timeout", "60")
    body = {"model": "tiny", "prompt": "once upon a time", "max_tokens": 1500, "ignore_eos": True, "stream": True,
            "temperature": 0}
    events, started = [], threading.Event()

    def stream():
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()
    thread = threading.Thread(target=stream)
    thread.start()
    try:
        assert started.wait(60)
        server.process.send_signal(signal.SIGTERM)
        in_flight = len(events)
        wait_until(lambda: refused(server.url), "the server kept accepting connections while draining")
        thread.join(120)
        assert server.process.wait(timeout=60) == 0
    finally:
        if server.process.poll() is None:
            server.process.kill()
    assert in_flight < 100, "the stream had nearly finished before the signal: nothing was drained"
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    assert events[-1] == "[DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
    alone = model.generate("once upon a time", llama_ref.SamplingParams(max_new_tokens=1500, ignore_eos=True,
                                                                        temperature=0)).result()
    assert "".join(c["choices"][0]["text"] for c in chunks) == alone.choices[0].text
    assert "Traceback" not in server.output()


def refused(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 503
    except httpx.TransportError:
        return True


@pytest.mark.parametrize("content, expect", [
    (b'{"model": "tiny", "prompt": "\xff\xfe bad utf-8"}', 400),
    (b'{"model": "tiny", "prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400),
    (json.dumps({"model": "tiny", "prompt": "x", "stop": ["s"] * 10_000}).encode(), 400),
    (json.dumps({"model": "tiny", "prompt": "x", "stop": "s" * 1_000_000}).encode(), 400),
    (json.dumps({"model": "tiny", "prompt": "x", "logit_bias": {str(i): 1 for i in range(50_000)}}).encode(), 400),
    (b"\x00" * 1000, 400),
])
def test_hostile_bodies_get_a_4xx_and_the_server_goes_on(model, content, expect):
    server = ThreadServer(model)
    try:
        response = httpx.post(server.url + "/v1/completions", content=content,
                              headers={"content-type": "application/json"}, timeout=60)
        assert response.status_code == expect, response.text[:300]
        assert "error" in response.json()
        assert httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}
                          ).status_code == 200
    finally:
        server.stop()


@pytest.mark.parametrize("how", ["unlinked", "renamed over"])
def test_the_server_keeps_answering_when_its_model_files_go_away(model_dir, tmp_path, how):
    """The weights are memory-mapped: the mapping keeps the old file's pages alive."""
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    model = llama_ref.load_model(copy)
    body = {"model": "tiny", "prompt": "the same prompt", "max_tokens": 8, "temperature": 0}
    server = ThreadServer(model)
    try:
        before = httpx.post(server.url + "/v1/completions", json=body).json()["choices"][0]["text"]
        for weights in copy.glob("*.safetensors"):
            if how == "unlinked":
                os.unlink(weights)
            else:
                replacement = weights.with_suffix(".new")
                replacement.write_bytes(b"\0" * weights.stat().st_size)
                os.replace(replacement, weights)
        after = httpx.post(server.url + "/v1/completions", json=body).json()["choices"][0]["text"]
    finally:
        server.stop()
    assert after == before


def test_a_failing_webhook_is_retried_with_backoff_and_blocks_no_one(model):
    arrivals = []

    class FailsTwice(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            arrivals.append(time.monotonic())
            self.send_response(500 if len(arrivals) <= 2 else 200)
            self.end_headers()

        def log_message(self, *args):
            pass
    receiver = http.server.HTTPServer(("127.0.0.1", 0), FailsTwice)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    server = ThreadServer(model)
    try:
        body = {"input": "hi", "max_new_tokens": 3, "webhook": f"http://127.0.0.1:{receiver.server_port}/"}
        assert httpx.post(server.url + "/v1/inference/tiny", json=body).json()["inference_status"]["status"] == "queued"
        wait_until(lambda: len(arrivals) == 1, "the webhook was never called")
        answered = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert answered.status_code == 200 and len(arrivals) == 1      # answered during the backoff
        wait_until(lambda: len(arrivals) == 3, "the webhook was not retried")
    finally:
        server.stop()
        receiver.shutdown()
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert 0.9 <= gaps[0] <= 1.9 and 1.9 <= gaps[1] <= 2.9, gaps
