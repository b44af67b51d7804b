"""Load (docs/reliability.md, "Load"): many streaming clients with mixed parameters against
`llama-ref serve --max-batch 8 --max-queue 64` on a tiny model. Required: no failure; each
stream's concatenated deltas, finish reason and token count equal the same request
answered whole; the server's memory after all the requests within 5% of what it held after
the first 100.

The suite runs a short version; `make load` runs 32 clients for 2 minutes
(LOAD_CLIENTS, LOAD_SECONDS)."""
import json
import os
import random
import threading
import time

import httpx
import psutil
import pytest

from test_server import Server, served_checkpoint

CLIENTS = int(os.environ.get("LOAD_CLIENTS", 8))
SECONDS = float(os.environ.get("LOAD_SECONDS", 10))
FIRST = 100     # requests after which the server's memory is the baseline; a busy machine may need over SECONDS
WORDS = "the a cat sat on mat and then it ran far away from home to see what was there".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return served_checkpoint(tmp_path_factory.mktemp("load"), max_position_embeddings=1024)


def mixed_body(rng: random.Random) -> dict:
    """A streamed completion with a seeded mix of the sampling parameters."""
    body = {"model": "tiny", "prompt": " ".join(rng.choices(WORDS, k=rng.randint(1, 60))),
            "max_tokens": rng.randint(1, 48), "temperature": rng.choice([0, 0.7, 1.3]), "seed": rng.randint(0, 999),
            "stream": True, "stream_options": {"include_usage": True}}
    for name, values in [("top_p", [0.5, 0.9]), ("top_k", [5, 40]), ("min_p", [0.05]),
                         ("frequency_penalty", [0.5]), ("presence_penalty", [-0.5]), ("stop", [["the"], ["a", "ran"]]),
                         ("ignore_eos", [True])]:
        if rng.random() < 0.3:
            body[name] = rng.choice(values)
    return body


def streamed(http: httpx.Client, url: str, body: dict) -> tuple[str, str, int]:
    """(text, finish_reason, completion_tokens) of a streamed completion."""
    text, finish, usage, done = [], None, None, False
    with http.stream("POST", url, json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                text.append(choice["text"])
                finish = choice["finish_reason"] or finish
    if not done:
        raise RuntimeError("the stream ended without [DONE]")
    return "".join(text), finish, usage["completion_tokens"]


def whole(http: httpx.Client, url: str, body: dict) -> tuple[str, str, int]:
    response = http.post(url, json={**body, "stream": False, "stream_options": None})
    response.raise_for_status()
    answer = response.json()
    return answer["choices"][0]["text"], answer["choices"][0]["finish_reason"], answer["usage"]["completion_tokens"]


def test_streaming_clients_under_load_lose_nothing_and_leak_nothing(model_dir):
    server = Server(model_dir, "--max-batch", "8", "--max-queue", "64", "--no-access-log")
    url, process = server.url + "/v1/completions", psutil.Process(server.process.pid)
    done, failures, mismatches, memory = [], [], [], {}
    lock, deadline = threading.Lock(), time.monotonic() + SECONDS

    def client(k: int):
        rng = random.Random(k)
        with httpx.Client(timeout=120) as http:
            while time.monotonic() < deadline or (len(done) * 2 < 2 * FIRST and not failures):
                body = mixed_body(rng)
                try:
                    stream, answer = streamed(http, url, body), whole(http, url, body)
                except Exception as err:           # a failure of any kind is counted, never raised here
                    with lock:
                        failures.append(f"{type(err).__name__}: {err}")
                    continue
                with lock:
                    if stream != answer:
                        mismatches.append((body, stream, answer))
                    done.append(2)
                    if len(done) * 2 >= FIRST and "first" not in memory:
                        memory["first"] = process.memory_info().rss
    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        memory["at the end"] = process.memory_info().rss
    finally:
        server.stop()
    requests = sum(done)
    print(f"load: {CLIENTS} clients, {SECONDS:.0f} s, {requests} requests, {len(failures)} failures, "
          f"{len(mismatches)} streams unlike their whole answer, RSS {memory['first'] / 2**20:.0f} MB after {FIRST} "
          f"requests, {memory['at the end'] / 2**20:.0f} MB after {requests}")
    assert not failures, failures[:5]
    assert not mismatches, mismatches[:3]
    assert requests >= 60, requests
    assert memory["at the end"] <= 1.05 * memory["first"]
