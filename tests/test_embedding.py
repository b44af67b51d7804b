"""Embeddings (llama_ref/embedding.py): against transformers' last hidden state, batched
against one at a time, through the server with the stock openai client, and on a small
retrieval task with the default model."""
import base64
import json
import threading

import httpx
import numpy as np
import openai
import pytest
import torch
import transformers

import llama_ref
from llama_ref.cli import main
from conftest import make_checkpoint, load_reference, relative_error
from test_server import ThreadServer, loaded, served_checkpoint

RNG = np.random.default_rng(5)
# 1 and 5 tokens run in shared calls of up to 32 rows, 40 in a call of its own, and 300 in
# two chunks (256 + 44) on the long-context checkpoint
LENGTHS = (1, 5, 40, 17, 3, 300)


def reference_vectors(directory, inputs, pooling: str, normalize: bool) -> list[np.ndarray]:
    """transformers' last_hidden_state (after the final norm) of each input alone, pooled."""
    reference = load_reference(directory)
    vectors = []
    for ids in inputs:
        with torch.no_grad():
            hidden = reference.model(torch.tensor([ids])).last_hidden_state[0].double().numpy()
        vector = hidden.mean(axis=0) if pooling == "mean" else hidden[-1]
        vectors.append(vector / np.linalg.norm(vector) if normalize else vector)
    return vectors


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory):
    """Random checkpoints with room for an input longer than a prefill chunk."""
    made = {}

    def get(name):
        if name not in made:
            heads = dict(mha={}, gqa=dict(num_attention_heads=8, num_key_value_heads=2))[name]
            made[name] = make_checkpoint(tmp_path_factory.mktemp(name), overrides=dict(max_position_embeddings=512,
                                                                                       **heads))
        return made[name]
    return get


@pytest.mark.parametrize("name", ["mha", "gqa"])
@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("normalize", [False, True])
def test_vectors_equal_transformers_pooled_last_hidden_state(long_checkpoint, name, pooling, normalize):
    inputs = [RNG.integers(3, 320, size=n).tolist() for n in LENGTHS]
    ours = llama_ref.load_model(long_checkpoint(name)).embed(inputs, pooling=pooling, normalize=normalize)
    assert ours.dtype == np.float32 and ours.shape == (len(inputs), 64)
    for ids, vector, theirs in zip(inputs, ours, reference_vectors(long_checkpoint(name), inputs, pooling, normalize)):
        assert relative_error(vector, theirs) <= 1e-4, len(ids)
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_batched_in_any_order_equals_one_at_a_time(long_checkpoint, pooling):
    model = llama_ref.load_model(long_checkpoint("gqa"))
    inputs = [RNG.integers(3, 320, size=n).tolist() for n in LENGTHS * 2]
    alone = np.stack([model.embed([ids], pooling=pooling)[0] for ids in inputs])
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(len(inputs))
        batched = model.embed([inputs[i] for i in order], pooling=pooling)
        np.testing.assert_array_equal(batched, alone[order])   # bit for bit, as decoding.batch promises


def test_smollm2_gguf_vectors_equal_transformers(smollm2_gguf, smollm2_hf_fp32):
    """Within the tolerance that the GGUF's logits hold against transformers (test_gguf.py)."""
    model = llama_ref.load_model(smollm2_gguf)
    texts = ["The capital of France is Paris.", "def fibonacci(n):", "Once upon a time, in a small village, "
             "there lived an old baker who woke before the sun every day."]
    inputs = [model.tokenizer.encode(text, bos=model.tokenizer.add_bos, eos=False) for text in texts]
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_hf_fp32), dtype=torch.float32).eval()
    for pooling in ("mean", "last"):
        ours = model.embed(texts, pooling=pooling, normalize=False)
        for ids, vector in zip(inputs, ours):
            with torch.no_grad():
                hidden = reference.model(torch.tensor([ids])).last_hidden_state[0].double().numpy()
            theirs = hidden.mean(axis=0) if pooling == "mean" else hidden[-1]
            assert relative_error(vector, theirs) <= 1e-5, (pooling, len(ids))


def test_inputs_are_tokenized_as_the_tokenizer_asks_and_ids_used_as_given(served):
    _, model = served
    ids = model.tokenizer.encode("hello there", bos=True, eos=False)
    assert ids[0] == model.tokenizer.bos_id and model.tokenizer.add_bos
    np.testing.assert_array_equal(model.embed("hello there"), model.embed([ids]))
    assert not np.allclose(model.embed([ids[1:]]), model.embed([ids]))
    assert model.embedding(["hello there", ids[1:]]).inputs == [ids, ids[1:]]


def test_dimensions_cut_and_renormalise_or_pad_with_zeros(long_checkpoint):
    model = llama_ref.load_model(long_checkpoint("mha"))
    inputs = [[5, 6, 7], [9]]
    full = model.embed(inputs, normalize=False)
    cut = model.embed(inputs, dimensions=40)
    np.testing.assert_allclose(cut, full[:, :40] / np.linalg.norm(full[:, :40], axis=1, keepdims=True), rtol=1e-6)
    np.testing.assert_array_equal(model.embed(inputs, normalize=False, dimensions=40), full[:, :40])
    padded = model.embed(inputs, dimensions=100)
    np.testing.assert_array_equal(padded[:, 64:], 0)
    np.testing.assert_allclose(padded[:, :64], model.embed(inputs), rtol=1e-6)


@pytest.mark.parametrize("inputs, kwargs, message", [
    ([], {}, "input: at least one input"),
    ("", {}, "input: an empty string"),
    (["a", ""], {}, r"input\[1\]: an empty string"),
    ([[1, 2], []], {}, r"input\[1\]: an input must hold at least one token"),
    ([[7]] * 2049, {}, "input: 2049 inputs; at most 2048"),
    ([list(range(3, 600))], {}, "input: 597 tokens do not fit in the model's context of 512"),
    ([[1, 2], [3, 320]], {}, r"input\[1\]: id 320 is outside the vocabulary 0..319"),
    ([[1, 2]], dict(pooling="cls"), "pooling: 'cls' is not one of mean, last"),
    ([[1, 2]], dict(dimensions=31), "dimensions: 31 is outside 32..65536"),
    ([[1, 2]], dict(dimensions=10**12), "dimensions: 1000000000000 is outside 32..65536"),
])
def test_bad_inputs_are_refused_naming_the_field(long_checkpoint, inputs, kwargs, message):
    with pytest.raises(llama_ref.LlamaRefError, match=message) as caught:
        llama_ref.load_model(long_checkpoint("mha")).embed(inputs, **kwargs)
    assert caught.value.param == message.split(":")[0].split("\\")[0]


@pytest.fixture(scope="module")
def served_dir(tmp_path_factory):
    return served_checkpoint(tmp_path_factory.mktemp("embed"), max_position_embeddings=512)


@pytest.fixture(scope="module")
def served(served_dir):
    model = llama_ref.load_model(served_dir)
    running = ThreadServer(model)
    yield running, model
    running.stop()


def test_the_openai_client_s_default_base64_call_and_float_call_return_the_same_vectors(served):
    server, model = served
    client = openai.OpenAI(base_url=server.url + "/v1/openai", api_key="unused", max_retries=0)
    texts = ["The cat sat on the mat.", "A much longer text about dogs, which bark, run and play all day."]
    default = client.embeddings.create(model="tiny", input=texts)            # the client asks for base64
    floats = client.embeddings.create(model="tiny", input=texts, encoding_format="float")
    expected = model.embed(texts)
    for response in (default, floats):
        assert [d.index for d in response.data] == [0, 1] and response.model == "tiny"
        vectors = np.array([d.embedding for d in response.data], dtype=np.float32)
        np.testing.assert_array_equal(vectors, expected)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-6)
        tokens = sum(len(model.tokenizer.encode(t, bos=True, eos=False)) for t in texts)
        assert response.usage.prompt_tokens == response.usage.total_tokens == tokens
    raw = httpx.post(server.url + "/v1/embeddings", json={"model": "tiny", "input": [[1, 450, 7483]],
                                                          "encoding_format": "base64", "dimensions": 48}).json()
    assert raw["object"] == "list" and raw["data"][0]["object"] == "embedding"
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(decoded, model.embed([[1, 450, 7483]], dimensions=48)[0])


@pytest.mark.parametrize("change, param", [
    (dict(input=""), "input"), (dict(input=["ok", ""]), "input"), (dict(input=[]), "input"),
    (dict(input=["x"] * 2049), "input"), (dict(input=[[5] * 600]), "input"), (dict(input=[[1, 32000]]), "input"),
    (dict(input=[1, -1]), "input"), (dict(encoding_format="float16"), "encoding_format"),
    (dict(dimensions=16), "dimensions"), (dict(dimensions=10**12), "dimensions"), (dict(input=[["a"]]), "input"), (dict(pooling="last"), "pooling"),
])
def test_bad_embedding_requests_are_400_naming_the_field(served, change, param):
    server, _ = served
    response = httpx.post(server.url + "/v1/openai/embeddings", json={"model": "tiny", "input": "hi", **change})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param or error["param"].startswith(param + "."), error
    assert error["message"].startswith(param), error


def test_an_embedding_beside_a_streaming_generation_is_the_same_and_leaves_it_unchanged(served, served_dir):
    """The embedding's chunks run in the same forward passes as the generation's decoding rows."""
    _, model = served
    kinds = []

    def record(forward, chunks):
        kinds.append({chunk.output for chunk in chunks})
        return forward(chunks)
    server = ThreadServer(loaded(served_dir, record))
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 60, "ignore_eos": True,
            "temperature": 0.8, "seed": 3, "stream": True}
    streamed, decoding = [], threading.Event()

    def stream():
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    streamed.append(line)
                    decoding.set()
    thread = threading.Thread(target=stream)
    try:
        thread.start()
        assert decoding.wait(60)
        texts = [f"text number {i} " * (i + 1) for i in range(12)]
        vectors = httpx.post(server.url + "/v1/embeddings", json={"model": "tiny", "input": texts,
                                                                  "encoding_format": "float"}, timeout=120).json()
        thread.join()
    finally:
        server.stop()
    assert {"hidden", "last"} in kinds, "no forward pass ran the embedding beside the decoding"
    got = np.array([d["embedding"] for d in vectors["data"]], dtype=np.float32)
    assert np.abs(got - model.embed(texts)).max() <= 1e-6
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in streamed)
    alone = model.generate("Once upon a time", llama_ref.SamplingParams(max_new_tokens=60, ignore_eos=True,
                                                                        temperature=0.8, seed=3)).result()
    assert text == alone.choices[0].text


def test_embed_on_the_command_line_prints_a_json_line_per_text(served, served_dir, capsys):
    _, model = served
    assert main(["embed", "--model", str(served_dir), "first text", "second", "--pooling", "last"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["index"] for line in lines] == [0, 1]
    np.testing.assert_array_equal(np.array([line["embedding"] for line in lines], dtype=np.float32),
                                  model.embed(["first text", "second"], pooling="last"))


# Written for this test: 30 passages on distinct topics and 10 questions, each about one of them.
PASSAGES = [
    "The Eiffel Tower is an iron lattice tower in Paris, finished in 1889.",
    "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar and oxygen.",
    "The Pacific Ocean is the largest and deepest ocean on Earth.",
    "Python is a programming language known for its readable syntax and large standard library.",
    "Mount Everest, on the border of Nepal and China, is the highest mountain above sea level.",
    "The human heart pumps blood through the body with four chambers.",
    "Bees collect nectar from flowers and make honey in their hives.",
    "The French Revolution began in 1789 with the storming of the Bastille.",
    "A violin is a string instrument played with a bow.",
    "Coffee beans are roasted seeds of the coffee plant, brewed into a hot drink.",
    "The Moon orbits the Earth about once every 27 days.",
    "Football, called soccer in America, is played by two teams of eleven players.",
    "Volcanoes erupt when molten rock called magma rises to the surface.",
    "The Great Wall of China was built over centuries to protect against invasions.",
    "Penguins are flightless birds that live mostly in the Southern Hemisphere.",
    "Bread is baked from dough made of flour, water and yeast.",
    "Electric cars run on batteries and produce no exhaust fumes.",
    "Shakespeare wrote plays such as Hamlet, Macbeth and Romeo and Juliet.",
    "Diamonds are made of carbon atoms arranged in a crystal lattice.",
    "The stock market lets people buy and sell shares of companies.",
    "Antibiotics are medicines that kill bacteria or stop them from growing.",
    "The Amazon rainforest is the largest tropical rainforest in the world.",
    "Chess is a board game for two players with sixteen pieces each.",
    "Rain forms when water vapour in clouds condenses into droplets.",
    "The Roman Empire was ruled from Rome and spread around the Mediterranean.",
    "Guitars usually have six strings and are played by plucking or strumming.",
    "Sharks are fish with skeletons made of cartilage instead of bone.",
    "Solar panels convert sunlight directly into electricity.",
    "The piano has 88 keys, black and white.",
    "Tea is made by pouring hot water over dried tea leaves.",
]
QUERIES = [("Which tower in Paris is made of iron?", 0), ("How do plants make sugar from sunlight?", 1),
           ("What is the tallest mountain in the world?", 4), ("How do bees make honey?", 6),
           ("When did the French Revolution start?", 7), ("What causes a volcano to erupt?", 12),
           ("Which birds cannot fly and live in the south?", 14), ("Who wrote Hamlet?", 17),
           ("What medicine fights bacteria?", 20), ("How many keys does a piano have?", 28)]


def top3_hits(queries: np.ndarray, passages: np.ndarray) -> int:
    """Queries whose own passage is among the 3 most cosine-similar (the vectors are normalised)."""
    top = np.argsort(-(queries @ passages.T), axis=1)[:, :3]
    return sum(answer in row for (_, answer), row in zip(QUERIES, top))


def test_retrieval_on_the_default_model_beats_shuffled_passages():
    """With the server's default, mean pooling. Measured on SmolLM2-135M-Instruct (AVX2 EPYC):
    8 of 10 in the top 3 (last pooling: 9 of 10); with the passages' vectors shuffled (5
    seeded permutations) 0-2."""
    model, pooling = llama_ref.load_model("default"), "mean"
    passages = model.embed(PASSAGES, pooling=pooling)
    queries = model.embed([question for question, _ in QUERIES], pooling=pooling)
    hits = top3_hits(queries, passages)
    shuffled = [top3_hits(queries, passages[np.random.default_rng(seed).permutation(len(PASSAGES))])
                for seed in range(5)]
    assert hits >= 6, hits
    assert np.mean(shuffled) <= hits / 2, (hits, shuffled)

