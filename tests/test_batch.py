"""Continuous batching (decoding/batch.py, server/engine.py) and prefix reuse
(decoding/prefix.py): running beside other requests, joining late, or starting from a kept
prefix never changes an answer. Each request is compared with the same request run alone
through Model.generate."""
import asyncio
import json
import random
import shutil
import threading
import time

import httpx
import numba
import numpy as np
import pytest

import llama_ref
from llama_ref import SamplingParams
from llama_ref.decoding.batch import PREFILL_CHUNK, Batch, calls
from llama_ref.decoding.params import sampling_params
from llama_ref.kernels import SMALL_BATCH
from llama_ref.nn.transformer import Chunk
from llama_ref.server.engine import Engine
from llama_ref.tools.serve_bench import Workload, serve_bench, workload_requests
from conftest import make_checkpoint
from test_server import Server, ThreadServer, loaded, served_checkpoint

WORDS = "the a cat sat on mat and then it ran far away from home to see what was there".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return served_checkpoint(tmp_path_factory.mktemp("batch"), max_position_embeddings=1024)


@pytest.fixture(scope="module")
def model(model_dir):
    return llama_ref.load_model(model_dir)


def mixed_request(rng: random.Random) -> tuple[str, SamplingParams]:
    """A prompt of 3 to 600 tokens and a random mix of every sampling parameter."""
    words = rng.choice([3, 10, 40, 150, 350])
    prompt = " ".join(rng.choice(WORDS) for _ in range(words))
    params = dict(max_new_tokens=rng.randint(1, 24), seed=rng.randint(0, 10**6), n=rng.choice([1, 1, 1, 2]),
                  temperature=rng.choice([0.0, 0.7, 1.0, 1.5]), top_k=rng.choice([0, 5, 40]),
                  top_p=rng.choice([1.0, 0.9, 0.5]), min_p=rng.choice([0.0, 0.05]),
                  repetition_penalty=rng.choice([1.0, 1.3]), presence_penalty=rng.choice([0.0, 0.5]),
                  frequency_penalty=rng.choice([0.0, 0.4]), stop=tuple(rng.sample(["e", "th", "xq", "."], 2)),
                  logprobs=True, top_logprobs=rng.choice([0, 3]))
    if rng.random() < 0.15:
        params.update(response_format="json_object", max_new_tokens=30, stop=())
    return prompt, SamplingParams(**params)


def fingerprint(result):
    """What must not change: every choice's ids, text, finish reason and log-probabilities."""
    return [(tuple(t.token_id for t in c.tokens), c.text, c.finish_reason,
             tuple(t.logprob for t in c.tokens), tuple(t.top_logprobs for t in c.tokens)) for c in result.choices]


def test_chunks_are_grouped_so_that_no_row_depends_on_another_chunk():
    lengths = [1, 1, SMALL_BATCH + 1, 20, 1, 12, 1, PREFILL_CHUNK]
    groups = calls([Chunk(np.zeros(n, np.int64), 0, None) for n in lengths])
    assert sorted(len(c.tokens) for group in groups for c in group) == sorted(lengths)
    for group in groups:
        rows = sum(len(c.tokens) for c in group)
        assert rows <= SMALL_BATCH or len(group) == 1, [len(c.tokens) for c in group]


def test_a_batch_of_mixed_requests_equals_each_run_alone(model):
    """24 requests, half joining after the batch has started, two cancelled midway."""
    rng = random.Random(7)
    requests = [mixed_request(rng) for _ in range(24)]
    generations = [model.generate(prompt, params) for prompt, params in requests]
    batch = Batch(model)
    for generation in generations[:12]:
        batch.add(generation)
    cancelled = {generations[3], generations[14]}
    steps, widest = 0, 0
    while batch.generations:
        widest = max(widest, sum(len(g.chunks(None)) for g in batch.generations if not g.prefilling))
        batch.step()
        steps += 1
        if steps == 3:
            for generation in generations[12:]:
                batch.add(generation)
        if steps == 6:
            for generation in cancelled:
                generation.cancelled = True
            batch.step()
            steps += 1
            assert not cancelled & set(batch.generations), "a cancelled request was still in the batch a step later"
    assert widest >= 8, "the requests never decoded side by side"
    for generation, (prompt, params) in zip(generations, requests):
        if generation in cancelled:
            continue
        assert fingerprint(generation.result()) == fingerprint(model.generate(prompt, params).result()), params


def test_a_prompt_longer_than_a_chunk_is_prefilled_in_pieces_between_decodes(model):
    """A 600-token prompt takes three steps of prefill, while a running request keeps decoding."""
    long_prompt = " ".join(WORDS[i % len(WORDS)] for i in range(600))
    params = SamplingParams(max_new_tokens=8, temperature=0)
    running, joining = model.generate("the cat", params), model.generate(long_prompt, params)
    batch = Batch(model)
    batch.add(running)
    batch.step()
    batch.add(joining)
    produced = [len(batch.step().get(running, [])) for _ in range(3)]
    assert produced == [1, 1, 1] and joining.prefilling is False and joining.prefilled > 2 * PREFILL_CHUNK
    assert len(joining.events) == 1
    while batch.generations:
        batch.step()
    assert fingerprint(joining.result()) == fingerprint(model.generate(long_prompt, params).result())


def completion_body(i: int, rng: random.Random) -> dict:
    """One of mixed_request's requests as a /v1/completions body; every other one streamed."""
    prompt, params = mixed_request(rng)
    body = {name: getattr(params, name) for name in ("seed", "n", "temperature", "top_p", "top_k", "min_p",
                                                    "repetition_penalty", "presence_penalty", "frequency_penalty")}
    body.update(model="tiny", prompt=prompt, max_tokens=params.max_new_tokens, stop=list(params.stop), logprobs=3,
                stream=params.n == 1 and i % 2 == 0, response_format={"type": params.response_format})
    return body


def read(http: httpx.Client, url: str, body: dict, cancel_after: int | None = None):
    """Each choice's text, finish reason and token log-probabilities, from a whole body or a
    stream; None when dropped after `cancel_after` lines."""
    if not body["stream"]:
        choices = http.post(url, json=body).json()["choices"]
        return [(c["text"], c["finish_reason"], c["logprobs"]["token_logprobs"]) for c in choices]
    text, logprobs, finish = [], [], None
    with http.stream("POST", url, json=body) as response:
        for count, line in enumerate(response.iter_lines()):
            if cancel_after is not None and count >= cancel_after:
                return None
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            text.append(choice["text"])
            logprobs += choice["logprobs"]["token_logprobs"] if choice["logprobs"] else []
            finish = choice["finish_reason"] or finish
    return [("".join(text), finish, logprobs)]


def test_a_hundred_concurrent_requests_through_the_server_equal_their_runs_alone(model_dir, model):
    """16 clients; every tenth streamed request is dropped after a few events. Texts, finish
    reasons and log-probabilities are compared bit for bit."""
    widths = []

    def counted(forward, chunks):
        widths.append(len(chunks))
        return forward(chunks)
    served = ThreadServer(loaded(model_dir, counted), max_batch=8, max_queue=100)
    url = f"{served.url}/v1/completions"
    rng = random.Random(11)
    bodies = [completion_body(i, rng) for i in range(100)]
    answers = {}

    def client(indices):
        with httpx.Client(timeout=300) as http:
            for i in indices:
                answers[i] = read(http, url, bodies[i], cancel_after=4 if i % 10 == 0 and bodies[i]["stream"] else None)
    threads = [threading.Thread(target=client, args=(range(k, 100, 16),)) for k in range(16)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert served.state.engines["tiny"].in_flight == 0
    finally:
        served.stop()
    assert max(widths) >= 6, "the server never decoded requests side by side"
    finish = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}
    compared = 0
    for i, body in enumerate(bodies):
        if answers[i] is None:
            continue
        params = sampling_params(body, max_new_tokens=body["max_tokens"], logprobs=True, top_logprobs=3,
                                 response_format=body["response_format"]["type"], stop=tuple(body["stop"]))
        alone = model.generate(body["prompt"], params).result()
        assert answers[i] == [(c.text, finish[c.finish_reason], [t.logprob for t in c.tokens])
                              for c in alone.choices], body
        compared += 1
    assert compared >= 90


def test_a_chat_reuses_its_earlier_turns_and_answers_as_a_cold_run_bit_for_bit(model_dir, model):
    """Each turn re-sends the conversation; the whole prefill chunks of the turn before are
    reused (decoding/prefix.py), and the answer is the cold run's exactly."""
    served = ThreadServer(llama_ref.load_model(model_dir))
    engine = served.state.engines["tiny"]
    system = " ".join(WORDS[i % len(WORDS)] for i in range(300))
    messages = [{"role": "system", "content": system}]
    previous_prompt, reuses = 0, []
    try:
        for turn in range(4):
            question = " ".join(WORDS[(turn + i) % len(WORDS)] for i in range(90))
            messages.append({"role": "user", "content": f"Question {turn}: {question}"})
            body = {"model": "tiny", "messages": messages, "max_tokens": 12, "temperature": 0.8, "seed": turn,
                    "logprobs": True}
            before = engine.prefix.reused_tokens
            answer = httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=120).json()
            reuses.append(engine.prefix.reused_tokens - before)
            cold = model.chat(messages, SamplingParams(max_new_tokens=12, temperature=0.8, seed=turn)).result()
            choice = answer["choices"][0]
            assert choice["message"]["content"] == cold.choices[0].text
            assert [t["logprob"] for t in choice["logprobs"]["content"]] == [t.logprob for t in cold.choices[0].tokens]
            assert reuses[-1] == previous_prompt // PREFILL_CHUNK * PREFILL_CHUNK, (turn, reuses, previous_prompt)
            previous_prompt = answer["usage"]["prompt_tokens"]
            messages.append({"role": "assistant", "content": choice["message"]["content"]})
    finally:
        served.stop()
    assert max(reuses) >= 2 * PREFILL_CHUNK, reuses


def test_the_kv_budget_makes_requests_wait_and_refuses_one_that_can_never_fit(model_dir, model):
    per_token = llama_ref.nn.transformer.kv_bytes_per_token(model.config)
    budget_gb = 100 * per_token / (1 << 30)           # room for 100 positions
    served = ThreadServer(llama_ref.load_model(model_dir), kv_cache_gb=budget_gb, prefix_cache_mb=0)
    try:
        url = f"{served.url}/v1/completions"
        refused = httpx.post(url, json={"model": "tiny", "prompt": "the cat", "max_tokens": 120}, timeout=60)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"
        assert "--kv-cache-gb" in refused.json()["error"]["message"]
        bodies = [{"model": "tiny", "prompt": f"the cat {i}", "max_tokens": 60, "temperature": 0} for i in range(3)]
        results = {}

        def ask(i):
            results[i] = httpx.post(url, json=bodies[i], timeout=120).json()
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        peak = 0
        while any(thread.is_alive() for thread in threads):
            peak = max(peak, served.state.engines["tiny"].running_sequences)
            assert served.state.engines["tiny"].reserved <= budget_gb * (1 << 30)
            time.sleep(0.002)
        for thread in threads:
            thread.join()
        assert peak == 1, "two requests of 60+ positions ran at once in a budget of 100"
        for i, body in enumerate(bodies):
            alone = model.generate(body["prompt"], SamplingParams(max_new_tokens=60, temperature=0)).result()
            assert results[i]["choices"][0]["text"] == alone.choices[0].text
    finally:
        served.stop()


def test_bench_serve_sends_the_same_workload_and_counts_what_came_back(model_dir):
    """`llama-ref bench serve` against our server: with ignore_eos every request returns
    exactly its max_tokens, so the output count is known before the run."""
    served = ThreadServer(llama_ref.load_model(model_dir), max_batch=4)
    workload = Workload(requests=6, concurrency=3, seed=5, prompt_words=(4, 40), output_tokens=(3, 9))
    try:
        summary = serve_bench(served.url, "tiny", workload)
    finally:
        served.stop()
    assert workload_requests(workload) == workload_requests(workload)
    assert summary["failed"] == 0 and summary["requests"] == 6
    assert summary["output_tokens"] == sum(r.max_tokens for r in workload_requests(workload))
    for latency in ("ttft_ms", "itl_ms", "e2e_ms"):
        values = summary[latency]
        assert 0 < values["p50"] <= values["p90"] <= values["p99"], (latency, values)
    assert summary["ttft_ms"]["p99"] <= summary["e2e_ms"]["p99"]
    assert summary["output_tokens_per_s"] == pytest.approx(summary["output_tokens"] / summary["duration_s"])


def test_ignore_eos_runs_to_max_tokens_on_a_model_that_wants_to_stop(model_dir):
    def eos_first(forward, chunks):
        logits = forward(chunks)
        for rows in logits:
            rows[:, 2] = 1e4                      # </s> would win every step
        return logits
    served = ThreadServer(loaded(model_dir, eos_first))
    try:
        body = {"model": "tiny", "prompt": "the cat", "max_tokens": 7, "logprobs": 1}
        stops = httpx.post(f"{served.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
        runs = httpx.post(f"{served.url}/v1/completions", json={**body, "ignore_eos": True}, timeout=60).json()
        refused = httpx.post(f"{served.url}/v1/completions", timeout=60, json={
            **body, "ignore_eos": True, "response_format": {"type": "json_object"}})
    finally:
        served.stop()
    assert stops["finish_reason"] == "stop" and stops["logprobs"]["tokens"] == ["</s>"]
    choice = runs["choices"][0]
    assert choice["finish_reason"] == "length" and runs["usage"]["completion_tokens"] == 7
    assert "</s>" not in choice["logprobs"]["tokens"]
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "ignore_eos"


def test_bench_serve_on_the_command_line_prints_the_table_and_writes_json(model_dir, tmp_path, capsys):
    from llama_ref.cli import main
    served = ThreadServer(llama_ref.load_model(model_dir))
    try:
        status = main(["bench", "serve", "--base-url", served.url, "--served-model", "tiny", "--requests", "3",
                       "--concurrency", "2", "--json", str(tmp_path / "serve.json")])
    finally:
        served.stop()
    out = capsys.readouterr().out
    assert status == 0 and "| time to first token |" in out and "0 failed" in out
    summary = json.loads((tmp_path / "serve.json").read_text())[served.url]
    assert summary["requests"] == 3 and summary["workload"]["concurrency"] == 2
    assert main(["bench", "serve", "--base-url", served.url, "--requests", "0"]) == 2


def test_several_models_in_one_server_answer_each_as_alone(model_dir, model, tmp_path):
    """`serve --model PATH --model other=PATH2`: requests go to the model their `model` field
    names (or an alias of it), each model batched by its own engine."""
    other_dir = tmp_path / "other"
    make_checkpoint(other_dir, overrides=dict(vocab_size=32000, num_hidden_layers=1), seed=3)
    shutil.copy(model_dir / "tokenizer.model", other_dir)
    other = llama_ref.load_model(other_dir)
    running = Server(model_dir, "--model", f"other={other_dir}", "--alias", "second=other")
    try:
        names = [m["id"] for m in httpx.get(f"{running.url}/v1/models").json()["data"]]
        assert names == ["default", "other", "second", "tiny"]
        assert httpx.get(f"{running.url}/health").json()["models"] == ["other", "tiny"]
        asked = [("tiny", model), ("other", other), ("second", other)] * 2
        answers = {}

        def ask(i, name):
            body = {"model": name, "prompt": f"the cat {i}", "max_tokens": 16, "temperature": 0.9, "seed": i}
            answers[i] = httpx.post(f"{running.url}/v1/completions", json=body, timeout=120).json()
        threads = [threading.Thread(target=ask, args=(i, name)) for i, (name, _) in enumerate(asked)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for i, (name, expected) in enumerate(asked):
            alone = expected.generate(f"the cat {i}", SamplingParams(max_new_tokens=16, temperature=0.9, seed=i))
            assert answers[i]["choices"][0]["text"] == alone.result().choices[0].text, name
        missing = httpx.post(f"{running.url}/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=30)
        assert missing.status_code == 404 and "other, second, tiny" in missing.json()["error"]["message"]
    finally:
        running.stop()
    assert model.generate("the cat", SamplingParams(max_new_tokens=8, temperature=0)).result().choices[0].text != \
        other.generate("the cat", SamplingParams(max_new_tokens=8, temperature=0)).result().choices[0].text


def test_serve_loads_its_models_on_a_thread_that_ends(model_dir, monkeypatch):
    """The server's kernels run on its scheduler threads only (load_served says why: a thread
    that ran parallel loops and lives on would keep a pool of kernel workers)."""
    from llama_ref.server import state
    loaders = []

    def recording_load(path):
        loaders.append(threading.current_thread())
        return llama_ref.load_model(path)
    monkeypatch.setattr(state, "load_model", recording_load)
    models = state.load_served({"a": str(model_dir), "b": str(model_dir)})
    assert list(models) == ["a", "b"] and models["a"].tokenizer is not None
    assert len(set(loaders)) == 1 and loaders[0] is not threading.current_thread() and not loaders[0].is_alive()


def test_the_scheduler_runs_its_kernels_on_as_many_threads_as_its_creator_set(model, monkeypatch):
    """Numba counts threads per thread: a Ray replica sets its share of the cores, then makes
    its engines, whose scheduler threads must keep that share."""
    seen = []
    forward = model.forward_chunks
    monkeypatch.setattr(model, "forward_chunks", lambda chunks: seen.append(numba.get_num_threads()) or forward(chunks))

    async def run():
        engine = Engine(model)
        ticket = engine.admit(model.generate("the cat", SamplingParams(max_new_tokens=2)))
        [event async for event in engine.events(ticket)]
        engine.close()
    before = numba.get_num_threads()
    share = 1 if before > 1 else 2             # not the count this thread had (conftest may have set 1)
    numba.set_num_threads(share)
    try:
        asyncio.run(run())
    finally:
        numba.set_num_threads(before)
    assert seen and set(seen) == {share}
