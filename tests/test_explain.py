"""The audit trace: plain data, a printed table showing each non-neutral stage, a PNG."""
import json

import numpy as np

import llama_ref
from llama_ref import SamplingParams
from llama_ref.decoding.trace import explain, format_trace, plot_trace
from test_cli import run_cli
from test_sampling import independent_stages

PARAMS = SamplingParams(temperature=0.7, top_k=6, top_p=0.8, min_p=0.5, repetition_penalty=1.5, seed=5)
PROMPT = [1, 17, 90, 5, 250]


def test_the_trace_follows_each_stage_of_one_step(checkpoint):
    model = llama_ref.load_model(checkpoint("gqa"))
    trace = explain(model, PROMPT, PARAMS)
    # The same step by the independent re-implementation of the stages in test_sampling.
    logits = model.forward(PROMPT, 0, model.new_cache())[-1]
    stages = independent_stages(logits, PARAMS, PROMPT, [])
    assert [s.survivors for s in trace.stages] == [logits.size] + [len(p) for _, p in stages]
    for record, (name, p) in zip(trace.stages[1:], stages):
        expected = [p.get(i, 0.0) for i in trace.candidates]
        assert np.allclose(record.probs, expected, rtol=1e-9, atol=1e-12), name
    assert [s.active for s in trace.stages] == [True, True, False, True, True, True, True]
    counts = [len(p) for _, p in stages]
    assert counts[2] > counts[3] > counts[4] > counts[5] >= 1  # each filter removed something here
    assert trace.token_id in stages[-1][1] and trace.token_id in trace.candidates
    assert 0 <= trace.uniform < 1 and trace.seed == 5
    final = stages[-1][1]                      # the draw's interval: survivors' shares laid out by ascending id
    low = sum(q for i, q in final.items() if i < trace.token_id)
    assert np.allclose(trace.interval, (low, low + final[trace.token_id]), rtol=0, atol=1e-12)
    assert trace.interval[0] <= trace.uniform < trace.interval[1]
    json.dumps(trace.to_dict())

    table = format_trace(trace).splitlines()
    assert "u = " in table[0] and f"chosen {trace.token_id}" in table[0]
    for setting in ["repetition_penalty=1.5", "temperature=0.7", "top_k=6", "top_p=0.8", "min_p=0.5"]:
        assert setting in table[1]
    assert "frequency" not in table[1]          # neutral parameters are left out
    assert table[2].split()[1:] == [str(logits.size)] + [str(counts[0])] + [str(n) for n in counts[2:]]
    assert sum(line.startswith("* ") for line in table) == 1


def test_the_plot_is_written(checkpoint, tmp_path):
    model = llama_ref.load_model(checkpoint("gqa"))
    path = plot_trace(explain(model, PROMPT, PARAMS, step=2), tmp_path / "trace.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_the_explain_command(checkpoint, tmp_path):
    result = run_cli("explain", "--model", str(checkpoint("gqa")), "--prompt-ids", "1 17 90", "--temperature", "0.8",
                     "--top-k", "4", "--seed", "1", "--png", str(tmp_path / "x.png"))
    assert result.returncode == 0, result.stderr
    assert "top_k=4" in result.stdout and (tmp_path / "x.png").stat().st_size > 1000
    result = run_cli("explain", "--model", str(checkpoint("gqa")), "--prompt-ids", "1", "--max-new-tokens", "2",
                     "--step", "5")
    assert result.returncode == 2 and "step: the response ended before token 5" in result.stderr
