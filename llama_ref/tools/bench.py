"""`llama-ref bench` (`make bench`): this engine beside llama.cpp on the same shapes, in one run.

Cases:
  13B      ours: a synthetic Llama-2-13B GPTQ checkpoint (sym, group size 128, fp16 embeddings
           and lm_head); llama.cpp: a random Q4_0 GGUF of the same shape (tools/synth.py writes both)
  SmolLM2  the default model's Q4_1 GGUF, read by both engines
Each measurement is a fresh process (so that its peak RSS is its own) that loads the model,
prefills a 128-token prompt, then decodes 32 tokens greedily after a 16-token prompt. A case
runs --runs times per engine and the medians are reported. While a run goes on, the CPU time
that other processes take (/proc/stat busy time minus the run's own) is recorded; a run where
it exceeds 10% of one core is discarded and repeated, because one competing process cuts
2-thread throughput several-fold.

Decoding one token reads every weight once (the embedding table aside, one row of it), so
bytes per token × tokens/s over the machine's read bandwidth, measured in the same run, is how
close decoding is to the physical limit.
"""
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import LlamaRefError
from .assets import cache_home, default_model
from .synth import write_synthetic_gptq, write_synthetic_q4_0_gguf


class BenchError(LlamaRefError):
    """A measurement failed, or every run of it was disturbed by other processes."""


PROMPT, DECODE, PREFILL = 16, 32, 128
WARM_UP = 40            # more rows than the decode kernels take (32), so the prefill path compiles too
CONTAMINATED = 0.10     # cores of CPU time other processes may take during a run
BENCH_SEED_IDS = 3      # prompts are the ids 3, 4, 5, ...: ordinary tokens in both vocabularies


def measure_ours(path: str, threads: int) -> dict:
    """Load, prefill, decode with this engine (runs inside the worker process)."""
    import llama_ref
    from llama_ref.kernels import configure_threads
    configure_threads(threads)       # before Numba starts its threads: the spin count is read then
    started = time.perf_counter()
    model = llama_ref.load_model(path)
    load_s = time.perf_counter() - started
    ids = np.arange(BENCH_SEED_IDS, BENCH_SEED_IDS + PREFILL)
    warm = model.new_cache(WARM_UP + 1)                      # compiles, or loads the Numba cache, both paths
    model.forward(ids[:WARM_UP], 0, warm)
    model.forward([1], WARM_UP, warm)
    t0 = time.perf_counter()
    model.forward(ids, 0, model.new_cache(PREFILL))
    prefill_s = time.perf_counter() - t0
    cache = model.new_cache(PROMPT + DECODE + 1)
    logits = model.forward(ids[:PROMPT], 0, cache)[-1]
    t1 = time.perf_counter()
    for step in range(DECODE):
        logits = model.forward([int(np.argmax(logits))], PROMPT + step, cache)[-1]
    decode_s = time.perf_counter() - t1
    return {"load_s": load_s, "prefill_tok_s": PREFILL / prefill_s, "decode_tok_s": DECODE / decode_s}


def measure_llama_cpp(path: str, threads: int) -> dict:
    """The same steps through llama-cpp-python (runs inside the worker process)."""
    from llama_cpp import Llama
    started = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=PREFILL + DECODE + 8, n_batch=PREFILL, n_ubatch=PREFILL, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - started
    ids = list(range(BENCH_SEED_IDS, BENCH_SEED_IDS + PREFILL))
    llm.eval(ids)                                            # warm-up, as for ours
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill_s = time.perf_counter() - t0
    llm.reset()
    llm.eval(ids[:PROMPT])
    t1 = time.perf_counter()
    for _ in range(DECODE):
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))   # the last token's
        llm.eval([int(np.argmax(logits))])
    decode_s = time.perf_counter() - t1
    return {"load_s": load_s, "prefill_tok_s": PREFILL / prefill_s, "decode_tok_s": DECODE / decode_s}


def worker(engine: str, path: str, threads: int) -> None:
    result = (measure_ours if engine == "ours" else measure_llama_cpp)(path, threads)
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result))


def busy_seconds() -> float:
    """CPU time all processes have used since boot (user, nice, system, irq, softirq, steal)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7]) / os.sysconf("SC_CLK_TCK")


def run_once(engine: str, path: Path, threads: int) -> dict:
    """One measurement in a fresh process, with the CPU others used meanwhile (in cores)."""
    own_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy_before, started = busy_seconds(), time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "llama_ref.tools.bench", engine, str(path), str(threads)],
                         capture_output=True, text=True)
    wall, busy = time.perf_counter() - started, busy_seconds() - busy_before
    if out.returncode != 0:
        raise BenchError(f"{engine} on {path.name} failed:\n{out.stderr[-2000:]}")
    own_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (own_after.ru_utime + own_after.ru_stime) - (own_before.ru_utime + own_before.ru_stime)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "others_cores": max(0.0, busy - own) / wall}


def measure(engine: str, path: Path, threads: int, runs: int, log) -> dict:
    """Medians over `runs` clean runs (at most 2 × runs attempts)."""
    clean, discarded = [], 0
    for _ in range(2 * runs):
        result = run_once(engine, path, threads)
        log(f"  {engine:9} {path.name}: decode {result['decode_tok_s']:.2f} tok/s, prefill "
            f"{result['prefill_tok_s']:.2f} tok/s, others {result['others_cores']:.2f} cores")
        if result["others_cores"] > CONTAMINATED:
            discarded += 1
            continue
        clean.append(result)
        if len(clean) == runs:
            break
    if not clean:
        raise BenchError(f"every run of {engine} on {path.name} was contaminated by other processes")
    keys = ("load_s", "prefill_tok_s", "decode_tok_s", "peak_rss", "others_cores")
    return {**{key: statistics.median(r[key] for r in clean) for key in keys}, "runs": len(clean),
            "discarded": discarded}


def read_bandwidth(threads: int) -> float:
    """Bytes/s of a parallel sum over 1 GiB with `threads` threads: what the cores can stream."""
    import numba
    from numba import njit, prange

    @njit(parallel=True, fastmath=True)
    def total(a):
        s = 0.0
        for i in prange(a.shape[0]):
            s += a[i]
        return s

    numba.set_num_threads(threads)
    a = np.ones(1 << 28, dtype=np.float32)
    total(a)
    t = time.perf_counter()
    for _ in range(5):
        total(a)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    return 5 * a.nbytes / (time.perf_counter() - t)


def machine() -> dict:
    name, flags = "unknown", ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = line.split(":", 1)[1]
    simd = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16") if f in flags.split()]
    return {"cpu": name, "cpus": os.cpu_count(), "simd": simd, "python": platform.python_version()}


def cases(layers: int | None) -> list[tuple[str, Path, Path, int]]:
    """(name, our checkpoint, llama.cpp's file, bytes read per decoded token of ours), made once."""
    home = cache_home() / "bench"
    suffix = f"-l{layers}" if layers else ""
    gptq, gguf_file = home / f"gptq-llama-2-13b{suffix}", home / f"q4_0-llama-2-13b{suffix}.gguf"
    if not gptq.exists():
        write_synthetic_gptq(gptq, "llama-2-13b", layers)
    if not gguf_file.exists():
        home.mkdir(parents=True, exist_ok=True)
        write_synthetic_q4_0_gguf(gguf_file, "llama-2-13b", layers)
    config = json.loads((gptq / "config.json").read_text())
    per_token = (gptq / "model.safetensors").stat().st_size - 2 * config["vocab_size"] * config["hidden_size"]
    smollm2 = default_model()
    return [("llama-2-13b" + suffix, gptq, gguf_file, per_token),
            ("smollm2-135m", smollm2, smollm2, smollm2.stat().st_size)]   # tied: the table is the lm_head too


def bench(runs: int = 3, threads: int = 2, layers: int | None = None, log=print) -> dict:
    peer = importlib.util.find_spec("llama_cpp") is not None
    if not peer:
        log("llama-cpp-python is not installed: measuring this engine alone (make bench installs it)")
    report = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "threads": threads,
              "bandwidth": {"1 thread": read_bandwidth(1), f"{threads} threads": read_bandwidth(threads)}, "cases": []}
    ceiling = report["bandwidth"][f"{threads} threads"]
    for name, ours_path, peer_path, per_token in cases(layers):
        log(f"{name}:")
        entry = {"case": name, "bytes_per_token": per_token, "ours": measure("ours", ours_path, threads, runs, log)}
        entry["ours_vs_bandwidth"] = entry["ours"]["decode_tok_s"] * per_token / ceiling
        if peer:
            entry["llama.cpp"] = measure("llama.cpp", peer_path, threads, runs, log)
            entry["decode_ratio"] = entry["ours"]["decode_tok_s"] / entry["llama.cpp"]["decode_tok_s"]
            entry["prefill_ratio"] = entry["ours"]["prefill_tok_s"] / entry["llama.cpp"]["prefill_tok_s"]
        entry["ours_rss_vs_file"] = entry["ours"]["peak_rss"] / (
            (ours_path / "model.safetensors") if ours_path.is_dir() else ours_path).stat().st_size
        report["cases"].append(entry)
    return report


def format_report(report: dict) -> str:
    m, bw = report["machine"], report["bandwidth"]
    lines = [f"{report['date']}: {m['cpu']}, {m['cpus']} CPUs ({' '.join(m['simd'])}), {report['threads']} threads; "
             "read bandwidth " + ", ".join(f"{v / 1e9:.1f} GB/s ({k})" for k, v in bw.items()), "",
             "| case | engine | decode tok/s | prefill tok/s (128) | load s | peak RSS GB | ours / llama.cpp |",
             "|---|---|---|---|---|---|---|"]
    for entry in report["cases"]:
        for engine in ("ours", "llama.cpp"):
            if engine not in entry:
                continue
            r = entry[engine]
            ratio = (f"decode {entry['decode_ratio']:.2f}x, prefill {entry['prefill_ratio']:.2f}x"
                     if engine == "ours" and "decode_ratio" in entry else "")
            lines.append(f"| {entry['case']} | {engine} | {r['decode_tok_s']:.2f} | {r['prefill_tok_s']:.1f} | "
                         f"{r['load_s']:.1f} | {r['peak_rss'] / 1e9:.2f} | {ratio} |")
    lines.append("")
    for entry in report["cases"]:
        lines.append(f"{entry['case']}: ours decodes at {entry['ours_vs_bandwidth']:.2f} of the bandwidth limit "
                     f"({entry['bytes_per_token'] / 1e9:.2f} GB per token); peak RSS {entry['ours_rss_vs_file']:.2f}x "
                     "the file")
    return "\n".join(lines)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], int(sys.argv[3]))
