"""Replicas on Ray Serve (llama_ref/deploy/ray_serve.py): a local Ray cluster with 2 replicas
of the default model behind one endpoint; 16 concurrent streaming clients; one conversation
kept on one replica; a replica killed mid-load."""
import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import ray
from ray import serve

from llama_ref.deploy.ray_serve import REPLICA_HEADER, build_app
from llama_ref.server import ServerSettings
from llama_ref.server.thread import free_port
from llama_ref.tools.assets import default_model
from test_cli import run_cli

pytestmark = pytest.mark.slow
APP = "llama-ref"


def test_serve_ray_starts_a_cluster_answers_and_stops_on_sigterm(tmp_path):
    """`llama-ref serve --ray` as a user runs it (before the module's own cluster starts)."""
    assert "--autoscale '3:1': expected MIN:MAX" in run_cli("serve", "--ray", "--autoscale", "3:1").stderr
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "llama_ref.cli", "serve", "--ray", "--replicas", "1",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None and time.monotonic() < deadline, "serve --ray did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        text, replica, end = chat(f"http://127.0.0.1:{port}", QUESTIONS[0], stream=True)
        assert text and replica and end["finish_reason"] in ("stop", "length")
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 0


@pytest.fixture(scope="module")
def endpoint():
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(ServerSettings(), {"default": str(default_model())}, replicas=2, cpus_per_replica=1),
                  name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def chat(url: str, question: str, stream: bool, max_tokens: int = 12, **extra) -> tuple[str, str, dict]:
    """(the answer's text, the replica that gave it, the finish or error) of one chat request."""
    body = {"model": "default", "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": max_tokens, "stream": stream, **extra}
    with httpx.Client(timeout=300) as client:
        if not stream:
            response = client.post(url + "/v1/chat/completions", json=body)
            data = response.json()
            if response.status_code != 200:
                return "", response.headers.get(REPLICA_HEADER, ""), data
            return data["choices"][0]["message"]["content"], response.headers[REPLICA_HEADER], \
                {"finish_reason": data["choices"][0]["finish_reason"]}
        with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return "", "", json.loads(response.read())
            text, end = [], {}
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    end = event
                    continue
                for choice in event["choices"]:
                    text.append(choice["delta"].get("content") or "")
                    if choice.get("finish_reason"):
                        end = {"finish_reason": choice["finish_reason"]}
            return "".join(text), response.headers[REPLICA_HEADER], end


def in_parallel(calls) -> list:
    results = [None] * len(calls)

    def run(i, call):
        try:
            results[i] = call()
        except Exception as err:          # reported by the test, not lost on its thread
            results[i] = err
    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(thread.is_alive() for thread in threads), "a client hung"
    failures = [result for result in results if isinstance(result, Exception)]
    if failures:
        raise failures[0]
    return results


QUESTIONS = [f"In one sentence, what is {thing}?" for thing in [
    "the Moon", "a violin", "Paris", "rain", "a library", "the Nile", "a bicycle", "bread", "a volcano", "winter",
    "a lighthouse", "chess", "the ocean", "a forest", "coffee", "a comet"]]


def test_sixteen_streaming_clients_on_two_replicas_get_the_whole_answers(endpoint):
    streamed = in_parallel([lambda q=q: chat(endpoint, q, stream=True) for q in QUESTIONS])
    whole = in_parallel([lambda q=q: chat(endpoint, q, stream=False) for q in QUESTIONS])
    for question, (text, replica, end), (whole_text, whole_replica, whole_end) in zip(QUESTIONS, streamed, whole):
        assert end.get("finish_reason") in ("stop", "length"), (question, end)
        assert text == whole_text and text, question
    assert len({replica for _, replica, _ in streamed}) == 2, "one replica served every request"
    # Affinity is a preference: under load Ray falls back to the other replica when the preferred
    # one does not answer its queue-length probe in time (docs/scale-out.md).
    kept = sum(a[1] == b[1] for a, b in zip(streamed, whole))
    print(f"{kept} of {len(QUESTIONS)} conversations on the same replica for both requests")


def test_the_turns_of_one_chat_stay_on_one_replica_and_every_route_answers(endpoint):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    replicas = set()
    with httpx.Client(timeout=120) as client:
        for turn in range(3):
            response = client.post(endpoint + "/v1/chat/completions", json={
                "model": "default", "messages": conversation, "temperature": 0, "max_tokens": 8})
            assert response.status_code == 200, response.text
            replicas.add(response.headers[REPLICA_HEADER])
            conversation += [response.json()["choices"][0]["message"], {"role": "user", "content": "Another."}]
        assert len(replicas) == 1
        assert client.get(endpoint + "/v1/models").json()["data"][0]["id"] == "default"
        native = client.post(endpoint + "/v1/inference/default", json={"input": "The capital of France is",
                                                                        "max_new_tokens": 4, "temperature": 0})
        assert native.status_code == 200 and native.json()["num_tokens"] == 4
        assert "llama_ref_requests_total" in client.get(endpoint + "/metrics").text
        bad = client.post(endpoint + "/v1/chat/completions", json={"model": "default", "messages": [], "top_p": 2})
        assert bad.status_code == 400 and bad.json()["error"]["param"]


def running_replicas() -> int:
    replicas = serve.status().applications[APP].deployments["Replica"].replica_states
    return replicas.get("RUNNING", 0)


def test_a_replica_killed_mid_load_gives_clean_errors_and_comes_back(endpoint):
    long = dict(max_tokens=400, ignore_eos=True)
    calls = [lambda q=q: chat(endpoint, q, stream=True, **long) for q in QUESTIONS[:8]]
    results, killed = [], []

    def kill_one_replica():
        time.sleep(3)                       # the streams have started
        victim = chat(endpoint, QUESTIONS[0], stream=False, max_tokens=1)[1]
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#Replica#{victim}", namespace="serve"), no_restart=True)
        killed.append(victim)
    killer = threading.Thread(target=kill_one_replica)
    killer.start()
    results = in_parallel(calls)
    killer.join()
    assert killed
    broken = [end for _, replica, end in results if "finish_reason" not in end]
    assert broken, "no request was cut by the kill"
    print(f"killed {killed[0]}: {len(broken)} of {len(results)} streams ended by an error, the rest whole")
    for end in broken:                      # an error event or a 503 body, never a hang or a bare 500
        assert end["error"]["code"] == "replica_failed" and "replica" in end["error"]["message"], end
    deadline = time.monotonic() + 300
    while running_replicas() < 2:
        assert time.monotonic() < deadline, "the killed replica did not come back"
        time.sleep(1)
    after = in_parallel([lambda q=q: chat(endpoint, q, stream=True) for q in QUESTIONS[8:]])
    assert all(end.get("finish_reason") for _, _, end in after), after
