"""The benchmark's machinery (not its numbers): the synthetic Q4_0 GGUF that llama.cpp reads,
one measurement in a fresh process, and the report."""
import os
import subprocess
import sys
import time

import gguf
import numpy as np

import llama_ref
from llama_ref.tools.bench import format_report, others_cpu_seconds, run_once
from llama_ref.tools.synth import Q4_0_BYTES, write_synthetic_q4_0_gguf

PARENT_BALLAST = 2e9    # bytes: above the worker's own peak on a tiny model (about 0.5 GB)


def test_the_synthetic_q4_0_gguf_has_the_shape_and_weights_of_a_trained_model(tmp_path):
    path = write_synthetic_q4_0_gguf(tmp_path / "q4_0.gguf", "llama-2-7b", layers=1)
    assert not (tmp_path / "q4_0.gguf.partial").exists()
    reader = gguf.GGUFReader(path)
    tensor = {t.name: t for t in reader.tensors}["blk.0.ffn_down.weight"]
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_0 and tensor.data.shape == (4096, 11008 // 32 * Q4_0_BYTES)
    weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    assert weights.shape == (4096, 11008) and 0.01 < weights.std() < 0.04
    model = llama_ref.load_model(path)
    assert model.tokenizer.encode("Hello", bos=True, eos=False) == [1, 15043]   # Llama-2's vocabulary
    logits = model.forward([1, 450, 7483], 0, model.new_cache(8))
    assert np.isfinite(logits).all() and logits.std() > 0.1


def test_one_measurement_runs_in_a_fresh_process_and_reports_its_cost(checkpoint):
    """The peak RSS is the worker's own, even when the process that starts it is larger: a
    spawned child's getrusage inherits its parent's peak, and a test process may hold GBs."""
    ballast = np.ones(int(PARENT_BALLAST // 8))                 # touched: resident in this process
    result = run_once("ours", checkpoint("gqa"), threads=2)
    del ballast
    assert result["decode_tok_s"] > 0 and result["prefill_tok_s"] > 0 and result["load_s"] > 0
    assert result["batch_decode_tok_s"] > 0
    assert 50e6 < result["peak_rss"] < PARENT_BALLAST and result["others_cores"] >= 0


def test_other_processes_cpu_counts_user_processes_but_not_kernel_threads_or_the_excluded():
    """A busy process beside the run is seen; kernel threads (kthreadd, pid 2, and its
    children), whose memory work a 7 GB model's streaming causes, and the run itself are not."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        before = others_cpu_seconds({os.getpid()})
        time.sleep(1.0)
        after = others_cpu_seconds({os.getpid()})
    finally:
        spinner.kill()
        spinner.wait()
    assert after[spinner.pid] - before.get(spinner.pid, 0.0) >= 0.5
    assert os.getpid() not in after and 2 not in after
    assert spinner.pid not in others_cpu_seconds({os.getpid(), spinner.pid})


def test_the_report_states_the_ratios_spreads_and_kernel_path():
    speeds = {"load_s": 1.0, "peak_rss": 2e9, "others_cores": 0.01, "runs": 3, "discarded": 0}
    spread = {"decode_tok_s": [0.9, 1.2], "prefill_tok_s": [1.5, 2.5]}
    report = {"date": "2026-11-23", "threads": 2, "bandwidth": {"1 thread": 25e9, "2 threads": 35e9},
              "machine": {"cpu": "AMD EPYC", "cpus": 2, "simd": ["avx2", "fma"], "kernel_path": "avx2+fma",
                          "python": "3.11"},
              "cases": [{"case": "llama-2-13b", "bytes_per_token": 7e9, "ours_vs_bandwidth": 0.2,
                         "ours_rss_vs_file": 1.05, "decode_ratio": 0.5, "prefill_ratio": 0.25, "batch_cost": 4.5,
                         "ours": {**speeds, "decode_tok_s": 1.0, "prefill_tok_s": 2.0, "batch_decode_tok_s": 1.78,
                                  "spread": spread},
                         "llama.cpp": {**speeds, "decode_tok_s": 2.0, "prefill_tok_s": 8.0, "spread": spread}}]}
    text = format_report(report)
    assert "| llama-2-13b | ours | 1.00 (0.90-1.20) | 2.0 (1.5-2.5) |" in text and "decode 0.50x, prefill 0.25x" in text
    assert "0.20 of the bandwidth limit" in text and "35.0 GB/s (2 threads)" in text
    assert "decode kernel path avx2+fma" in text and "8 rows costing 4.50x a step of one" in text
