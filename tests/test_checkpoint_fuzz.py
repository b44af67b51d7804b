"""Corrupt checkpoints (docs/reliability.md, "Corrupt checkpoints"): a safetensors file, a
GGUF file's metadata and tensor table, and a GPTQ checkpoint's quantization config, each
truncated, bit-flipped or rewritten field by field. Every mutation must either be refused
with a named error (CheckpointError, ConfigError, or TokenizerError for a GGUF vocabulary),
or load and give the unmutated checkpoint's logits (when what changed was not used). Any
other exception fails; so does a crash, a load that runs past a minute, or one whose peak
resident size grows by more than 1.2 x the file's size + 200 MB."""
import faulthandler
import json
import mmap
import os
import shutil
import struct
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llama_ref
from llama_ref.errors import CheckpointError, ConfigError
from llama_ref.tokenizer import TokenizerError
from llama_ref.tools.bench import resident_bytes
from conftest import make_checkpoint
from test_gptq import write_gptq_checkpoint

PROMPT = [5, 17, 99, 3, 250]
EXAMPLES = int(os.environ.get("CHECKPOINT_FUZZ_EXAMPLES", 120))
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "", "f32"]
NAMED = (CheckpointError, ConfigError, TokenizerError)


def logits_of(path) -> np.ndarray:
    model = llama_ref.load_model(path)
    return model.forward(PROMPT, 0, model.new_cache(16))


def fuzz(strategy, write, target: Path, expected, size: int, label=lambda mutation: mutation[0]) -> Counter:
    """Load EXAMPLES mutations written by write(mutation), each within a minute and within
    1.2 x size + 200 MB of peak growth; one that loads must give expected(mutation)."""
    outcomes, peaks = Counter(), []

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=True)
    @given(mutation=strategy)
    def load(mutation):
        write(mutation)
        Path("/proc/self/clear_refs").write_text("5")    # resets VmHWM to the present size
        before = resident_bytes("VmRSS")
        faulthandler.dump_traceback_later(60, exit=True)
        try:
            logits = logits_of(target)
        except NAMED as err:
            assert str(err), mutation
            outcome = "refused"
        else:
            np.testing.assert_array_equal(logits, expected(mutation), err_msg=f"{mutation}: loads with other logits")
            outcome = "loads, same logits"
        finally:
            faulthandler.cancel_dump_traceback_later()
        peaks.append(resident_bytes("VmHWM") - before)
        assert peaks[-1] <= 1.2 * size + 200e6, f"{mutation}: resident size grew by {peaks[-1] / 1e6:.0f} MB"
        outcomes[f"{label(mutation)}: {outcome}"] += 1
    load()
    print(f"{sum(outcomes.values())} mutations, peak growth {max(peaks) / 1e6:.1f} MB: "
          + ", ".join(f"{k} x {v}" for k, v in sorted(outcomes.items())))
    assert sum(v for k, v in outcomes.items() if k.endswith("refused")) >= EXAMPLES // 3
    return outcomes


def test_the_peak_measure_sees_an_allocation_that_is_gone():
    """50 MB of fresh pages, touched and unmapped. Mapped directly: a malloc'd block may reuse
    resident memory that an earlier test of this worker freed to the heap, and add nothing."""
    Path("/proc/self/clear_refs").write_text("5")
    before = resident_bytes("VmRSS")
    block = mmap.mmap(-1, 50_000_000)
    block.write(b"\x01" * 50_000_000)
    block.close()
    assert resident_bytes("VmHWM") - before >= 45e6 > resident_bytes("VmRSS") - before


# safetensors

@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    directory = make_checkpoint(tmp_path_factory.mktemp("original"))
    return directory, logits_of(directory)


def header_of(data: bytes) -> tuple[int, dict]:
    length = struct.unpack("<Q", data[:8])[0]
    return length, json.loads(data[8:8 + length])


def with_header(data: bytes, header: dict) -> bytes:
    """The file with its header replaced (padded to keep the data where it was, when it fits)."""
    length = struct.unpack("<Q", data[:8])[0]
    text = json.dumps(header).encode()
    text += b" " * max(0, length - len(text))
    return struct.pack("<Q", len(text)) + text + data[8 + length:]


safetensors_mutations = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 0.999)),
    st.tuples(st.just("flip header bit"), st.floats(0, 0.999), st.integers(0, 7)),
    st.tuples(st.just("header length"), st.sampled_from([0, 1, 7, 2**31, 2**63 - 1, 2**64 - 1])),
    st.tuples(st.just("dtype"), st.integers(0, 30), st.sampled_from(DTYPES)),
    st.tuples(st.just("shape"), st.integers(0, 30), st.lists(st.integers(-2, 2**40), max_size=4)),
    st.tuples(st.just("offsets"), st.integers(0, 30), st.lists(st.integers(-2, 2**62), min_size=0, max_size=3)),
    st.tuples(st.just("drop tensor"), st.integers(0, 30)),
)


def mutate_safetensors(data: bytes, mutation) -> bytes:
    kind, *args = mutation
    length, header = header_of(data)
    names = sorted(name for name in header if name != "__metadata__")
    if kind == "truncate":
        return data[:int(args[0] * len(data))]
    if kind == "flip header bit":
        at = int(args[0] * (8 + length))
        return data[:at] + bytes([data[at] ^ (1 << args[1])]) + data[at + 1:]
    if kind == "header length":
        return struct.pack("<Q", args[0]) + data[8:]
    name = names[args[0] % len(names)]
    if kind == "drop tensor":
        del header[name]
    else:
        header[name][{"dtype": "dtype", "shape": "shape", "offsets": "data_offsets"}[kind]] = args[1]
    return with_header(data, header)


def test_a_corrupt_safetensors_file_is_refused_by_name_or_loads_unchanged(dense, tmp_path):
    source, expected = dense
    target = tmp_path / "mutated"
    shutil.copytree(source, target)
    data = (source / "model.safetensors").read_bytes()
    fuzz(safetensors_mutations, lambda m: (target / "model.safetensors").write_bytes(mutate_safetensors(data, m)),
         target, lambda m: expected, len(data))


# GGUF

def write_tiny_gguf(path: Path) -> Path:
    """A two-layer Llama GGUF with a SentencePiece vocabulary of 300 tokens and tensors of
    six types: F32, F16, Q4_0, Q4_1, Q8_0 and Q5_0 (dequantized at load)."""
    rng = np.random.default_rng(0)
    hidden, inter, heads, kv_heads, layers = 256, 512, 4, 2, 2
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [f"▁w{i}" for i in range(41)]
    types = [2, 3, 3] + [6] * 256 + [1] * 41
    kv = kv_heads * hidden // heads
    Q = gguf.GGMLQuantizationType
    shapes = {"token_embd.weight": ((len(tokens), hidden), Q.Q8_0), "output_norm.weight": ((hidden,), Q.F32),
              "output.weight": ((len(tokens), hidden), Q.F16)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_norm.weight": ((hidden,), Q.F32), f"blk.{i}.ffn_norm.weight": ((hidden,), Q.F32),
                       f"blk.{i}.attn_q.weight": ((hidden, hidden), Q.Q4_0), f"blk.{i}.attn_k.weight": ((kv, hidden), Q.Q4_1),
                       f"blk.{i}.attn_v.weight": ((kv, hidden), Q.Q8_0),
                       f"blk.{i}.attn_output.weight": ((hidden, hidden), Q.Q5_0),
                       f"blk.{i}.ffn_gate.weight": ((inter, hidden), Q.Q4_0),
                       f"blk.{i}.ffn_up.weight": ((inter, hidden), Q.F16), f"blk.{i}.ffn_down.weight": ((hidden, inter), Q.F32)})
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(len(tokens))])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, (shape, kind) in shapes.items():
        weights = (1 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else 0.05 * rng.standard_normal(shape))
        weights = weights.astype(np.float32)
        data = weights.astype(np.float16) if kind == Q.F16 else weights if kind == Q.F32 else \
            gguf.quants.quantize(weights, kind)
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_number_fields(path: Path) -> list[tuple[str, int, int]]:
    """(what, offset, bytes) of every number that gives the file its structure: the header's
    counts, each metadata entry's key length, value type, array length and string lengths,
    and each tensor's name length, dimension count, dimensions, type and data offset. Not
    the metadata values themselves: another value (an epsilon, a token score) makes another
    valid file, not a corrupt one."""
    reader = gguf.GGUFReader(path)
    base = reader.data.ctypes.data
    found = []
    fields = [(f"metadata {name}", field) for name, field in reader.fields.items()]
    fields += [(f"tensor {tensor.name}", tensor.field) for tensor in reader.tensors]
    for what, field in fields:
        values = set(field.data) if what.startswith("metadata") and not name_is_header(what) else set()
        for index, part in enumerate(field.parts):
            if part.dtype.kind in "iu" and part.dtype != np.uint8 and index not in values:
                found += [(what, part.ctypes.data - base + i * part.itemsize, part.itemsize) for i in range(part.size)]
    return found


def name_is_header(what: str) -> bool:
    """GGUF.version, GGUF.tensor_count, GGUF.kv_count: the reader's header fields, structure all of them."""
    return what.startswith("metadata GGUF.")


def gguf_flippable(path: Path) -> list[int]:
    """The header's byte offsets but those of the model's own metadata values (llama.*,
    general.*): a bit flipped in an epsilon or a layer count makes another model, not a
    corrupt file. Everything else (structure, names, the vocabulary) may be flipped."""
    reader = gguf.GGUFReader(path)
    base = reader.data.ctypes.data
    kept = set()
    for name, field in reader.fields.items():
        if name.startswith(("llama.", "general.")):
            for index in field.data:
                part = field.parts[index]
                start = part.ctypes.data - base
                kept.update(range(start, start + part.nbytes))
    return [i for i in range(reader.data_offset) if i not in kept]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return path, logits_of(path), gguf_number_fields(path), gguf_flippable(path)


gguf_mutations = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 0.999)),
    st.tuples(st.just("flip header bit"), st.floats(0, 0.999), st.integers(0, 7)),
    st.tuples(st.just("rewrite number"), st.floats(0, 0.999),
              st.one_of(st.sampled_from([0, 1, 2, 3, 31, 255, 2**31 - 1, 2**32 - 1, 2**40, 2**63 - 1, 2**64 - 1]),
                        st.integers(0, 2**64 - 1))),
)


def test_a_corrupt_gguf_file_is_refused_by_name_or_loads_unchanged(tiny_gguf, tmp_path):
    source, expected, numbers, flippable = tiny_gguf
    data = source.read_bytes()
    target = tmp_path / "mutated.gguf"

    def write(mutation):
        kind, where, *args = mutation
        if kind == "truncate":
            mutated = data[:int(where * len(data))]
        elif kind == "flip header bit":
            at = flippable[int(where * len(flippable))]
            mutated = data[:at] + bytes([data[at] ^ (1 << args[0])]) + data[at + 1:]
        else:
            _, at, size = numbers[int(where * len(numbers))]
            mutated = data[:at] + (args[0] % 2 ** (8 * size)).to_bytes(size, "little") + data[at + size:]
        target.write_bytes(mutated)

    def label(mutation):
        if mutation[0] != "rewrite number":
            return mutation[0]
        return "rewrite a number of the " + numbers[int(mutation[1] * len(numbers))][0].split()[0]
    fuzz(gguf_mutations, write, target, lambda m: expected, len(data), label)


# GPTQ configs

@pytest.fixture(scope="module")
def gptq(tmp_path_factory):
    """A GPTQ checkpoint (v1 zero points) and its logits read as v1 and as v2, which a valid
    config may also say."""
    root = tmp_path_factory.mktemp("gptq")
    dense = make_checkpoint(root / "dense", overrides=dict(hidden_size=128, intermediate_size=256, num_key_value_heads=2))
    directory, _ = write_gptq_checkpoint(dense, root / "gptq", group_size=32)
    config = json.loads((directory / "config.json").read_text())
    as_v2 = root / "as-v2"
    shutil.copytree(directory, as_v2)
    (as_v2 / "config.json").write_text(json.dumps({**config, "quantization_config": {
        **config["quantization_config"], "format": "gptq_v2"}}))
    return directory, {1: logits_of(directory), 2: logits_of(as_v2)}


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([4, 8, 3, 32, 64, 128, -1, 0]),
                   st.floats(allow_nan=True), st.text(max_size=8),
                   st.sampled_from(["gptq", "gptq_v2", "awq", "marlin", "GPTQ"]), st.lists(st.integers(), max_size=2),
                   st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
KEYS = ["bits", "group_size", "desc_act", "sym", "format", "checkpoint_format", "quant_method", "is_marlin_format",
        "w_bit", "q_group_size", "true_sequential", "damp_percent"]
gptq_mutations = st.one_of(
    st.tuples(st.just("set key"), st.sampled_from(["config.json", "quantize_config.json"]), st.sampled_from(KEYS), VALUES),
    st.tuples(st.just("drop key"), st.sampled_from(KEYS)),
    st.tuples(st.just("truncate JSON"), st.sampled_from(["config.json", "quantize_config.json"]), st.floats(0, 0.999)),
    st.tuples(st.just("replace config"), VALUES),
)


def test_a_corrupt_gptq_config_is_refused_by_name_or_loads_as_it_says(gptq, tmp_path):
    source, expected = gptq
    target = tmp_path / "mutated"
    config = json.loads((source / "config.json").read_text())
    quantization = config["quantization_config"]
    said = {}

    def write(mutation):
        kind, *args = mutation
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
        name, changed = "config.json", quantization
        if kind == "set key":
            name, key, value = args
            changed = {**quantization, key: value}
        elif kind == "drop key":
            changed = {k: v for k, v in quantization.items() if k != args[0]}
        elif kind == "replace config":
            changed = args[0]
        text = json.dumps(changed if name == "quantize_config.json" else {**config, "quantization_config": changed})
        if kind == "truncate JSON":
            name, text = args[0], text if args[0] == "config.json" else json.dumps(quantization)
            text = text[:int(args[1] * len(text))]
        (target / name).write_text(text)
        said["config"] = changed

    def as_said(mutation):
        """A config that loads says v1 or v2 zero points: "format", else "checkpoint_format"
        (docs/formats.md); no config at all means v1."""
        config = said["config"]
        return expected[2 if isinstance(config, dict) and (
            config.get("format") or config.get("checkpoint_format")) == "gptq_v2" else 1]
    fuzz(gptq_mutations, write, target, as_said, sum(f.stat().st_size for f in source.iterdir()))
