"""Corrupt checkpoints (docs/reliability.md, "Corrupt checkpoints"): a safetensors file
truncated, with bits of its header flipped, or with a tensor's dtype, shape or offsets
rewritten. Every mutation must either be refused with a named CheckpointError or
ConfigError, or load and give the unmutated checkpoint's logits (when what changed was not
used). Any other exception, a crash or a hang fails."""
import json
import os
import shutil
import struct
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llama_ref
from llama_ref.errors import CheckpointError, ConfigError
from conftest import make_checkpoint

PROMPT = [5, 17, 99, 3, 250]
EXAMPLES = int(os.environ.get("CHECKPOINT_FUZZ_EXAMPLES", 200))
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "", "f32"]


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    directory = make_checkpoint(tmp_path_factory.mktemp("original"))
    model = llama_ref.load_model(directory)
    return directory, model.forward(PROMPT, 0, model.new_cache())


def header_of(data: bytes) -> tuple[int, dict]:
    length = struct.unpack("<Q", data[:8])[0]
    return length, json.loads(data[8:8 + length])


def with_header(data: bytes, header: dict) -> bytes:
    """The file with its header replaced (padded to keep the data where it was, when it fits)."""
    length = struct.unpack("<Q", data[:8])[0]
    text = json.dumps(header).encode()
    text += b" " * max(0, length - len(text))
    return struct.pack("<Q", len(text)) + text + data[8 + length:]


mutations = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 0.999)),
    st.tuples(st.just("flip header bit"), st.floats(0, 0.999), st.integers(0, 7)),
    st.tuples(st.just("header length"), st.sampled_from([0, 1, 7, 2**31, 2**63 - 1, 2**64 - 1])),
    st.tuples(st.just("dtype"), st.integers(0, 30), st.sampled_from(DTYPES)),
    st.tuples(st.just("shape"), st.integers(0, 30), st.lists(st.integers(-2, 2**40), max_size=4)),
    st.tuples(st.just("offsets"), st.integers(0, 30), st.lists(st.integers(-2, 2**62), min_size=0, max_size=3)),
    st.tuples(st.just("drop tensor"), st.integers(0, 30)),
)


def mutate(data: bytes, mutation) -> bytes:
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


def test_a_corrupt_safetensors_file_is_refused_by_name_or_loads_unchanged(original, tmp_path):
    source, expected = original
    target = tmp_path / "mutated"
    shutil.copytree(source, target)
    outcomes = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(mutation=mutations)
    def load(mutation):
        (target / "model.safetensors").write_bytes(mutate((source / "model.safetensors").read_bytes(), mutation))
        try:
            model = llama_ref.load_model(target)
        except (CheckpointError, ConfigError) as err:
            assert str(err), mutation
            outcomes[f"{mutation[0]}: refused"] += 1
            return
        np.testing.assert_array_equal(model.forward(PROMPT, 0, model.new_cache()), expected, err_msg=str(mutation))
        outcomes[f"{mutation[0]}: loads, same logits"] += 1
    load()
    print(f"{sum(outcomes.values())} mutations: " + ", ".join(f"{k} x {v}" for k, v in sorted(outcomes.items())))
    assert sum(v for k, v in outcomes.items() if k.endswith("refused")) >= EXAMPLES // 2
