"""`llama-ref bench` (`make bench`): this engine beside llama.cpp on the same shapes, in one run.

Cases:
  13B      ours: a synthetic Llama-2-13B GPTQ checkpoint (sym, group size 128, fp16 embeddings
           and lm_head); llama.cpp: a random Q4_0 GGUF of the same shape (tools/synth.py writes both)
  SmolLM2  the default model's Q4_1 GGUF, read by both engines
Each measurement is a fresh process (so that its peak RSS is its own) that loads the model,
prefills a 128-token prompt, then decodes 32 tokens greedily after a 16-token prompt; ours
then decodes 8 sequences together (8 rows per step) against that one. A case runs --runs
times per engine; the medians are reported with the spread (min-max). While a run goes on,
the CPU time that other user processes take (their /proc/[pid]/stat, kernel threads and the
run itself left out) is recorded; a run where it exceeds 10% of one core is discarded and
repeated, because one competing process cuts 2-thread throughput several-fold.

Decoding one token reads every weight once (the embedding table aside, one row of it), so
bytes per token × tokens/s over the machine's read bandwidth, measured in the same run, is how
close decoding is to the physical limit.
"""
import importlib.util
import json
import os
import platform
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
BATCH, BATCH_STEPS = 8, 8   # sequences decoded together, and the steps timed
PF_KTHREAD = 0x00200000     # /proc/[pid]/stat flags: a kernel thread
WARM_UP = 40            # more rows than the dense kernels' row path takes (32): every path compiles
CONTAMINATED = 0.10     # cores of CPU time other processes may take during a run
BENCH_SEED_IDS = 3      # prompts are the ids 3, 4, 5, ...: ordinary tokens in both vocabularies


def measure_ours(path: str, threads: int) -> dict:
    """Load, prefill, decode with this engine (runs inside the worker process)."""
    import llama_ref
    from llama_ref.kernels import configure_threads
    from llama_ref.nn.transformer import Chunk
    configure_threads(threads)       # before Numba starts its threads: the spin count is read then
    started = time.perf_counter()
    model = llama_ref.load_model(path)
    load_s = time.perf_counter() - started
    ids = np.arange(BENCH_SEED_IDS, BENCH_SEED_IDS + PREFILL)
    warm = model.new_cache(WARM_UP + 1)                      # compiles, or loads the Numba cache, both paths
    model.forward(ids[:WARM_UP], 0, warm)
    model.forward([1], WARM_UP, warm)
    t0 = time.perf_counter()             # the last row's logits, as a generation's prefill (and llama.cpp's eval)
    model.forward_chunks([Chunk(ids, 0, model.new_cache(PREFILL), "last")])
    prefill_s = time.perf_counter() - t0
    cache = model.new_cache(PROMPT + DECODE + 1)
    logits = model.forward(ids[:PROMPT], 0, cache)[-1]
    t1 = time.perf_counter()
    for step in range(DECODE):
        logits = model.forward([int(np.argmax(logits))], PROMPT + step, cache)[-1]
    decode_s = time.perf_counter() - t1
    return {"load_s": load_s, "prefill_tok_s": PREFILL / prefill_s, "decode_tok_s": DECODE / decode_s,
            "batch_decode_tok_s": batch_decode_speed(model)}


def batch_decode_speed(model) -> float:
    """Tokens/s of BATCH sequences decoded together, one row each per step, after their prompts."""
    caches = [model.new_cache(PROMPT + BATCH_STEPS + 2) for _ in range(BATCH)]
    prompts = BENCH_SEED_IDS + np.arange(BATCH)[:, None] * 7 + np.arange(PROMPT)      # (BATCH, PROMPT)
    logits = model.forward_batch(prompts, 0, caches)[:, -1]                            # (BATCH, vocab)
    logits = model.forward_batch(np.argmax(logits, axis=-1)[:, None], PROMPT, caches)[:, -1]   # warm
    started = time.perf_counter()
    for step in range(BATCH_STEPS):
        logits = model.forward_batch(np.argmax(logits, axis=-1)[:, None], PROMPT + 1 + step, caches)[:, -1]
    return BATCH * BATCH_STEPS / (time.perf_counter() - started)


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


def resident_bytes(key: str = "VmHWM") -> int:
    """VmHWM (peak) or VmRSS (now) of this process's memory since its exec, in bytes. Not
    getrusage's ru_maxrss: Linux carries the parent's peak into a spawned child's at exec, so a
    worker started from a 4 GB test process would report 4 GB."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def worker(engine: str, path: str, threads: int) -> None:
    result = (measure_ours if engine == "ours" else measure_llama_cpp)(path, threads)
    result["peak_rss"] = resident_bytes("VmHWM")
    print(json.dumps(result))


def others_cpu_seconds(exclude: set[int]) -> dict[int, float]:
    """CPU seconds (user + system) each user process has used, but those in `exclude`: kernel
    threads, whose page-cache and memory work for the run would count against it, are left out."""
    seconds = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:                                        # it ended meanwhile
            continue
        if int(fields[6]) & PF_KTHREAD:                        # field 9 of stat: flags
            continue
        seconds[int(entry.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return seconds


def run_once(engine: str, path: Path, threads: int) -> dict:
    """One measurement in a fresh process, with the CPU other processes used meanwhile (in cores;
    a process that ended during the run is not counted)."""
    ours = {os.getpid()}
    before, started = others_cpu_seconds(ours), time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "llama_ref.tools.bench", engine, str(path), str(threads)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - started
    after = others_cpu_seconds(ours | {process.pid})
    if process.returncode != 0:
        raise BenchError(f"{engine} on {path.name} failed:\n{stderr[-2000:]}")
    others = sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())
    return {**json.loads(stdout.strip().splitlines()[-1]), "others_cores": others / wall}


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
    keys = [key for key in clean[0] if key != "others_cores"]
    return {**{key: statistics.median(r[key] for r in clean) for key in keys},
            "spread": {key: [min(r[key] for r in clean), max(r[key] for r in clean)] for key in keys},
            "others_cores": max(r["others_cores"] for r in clean), "runs": len(clean), "discarded": discarded}


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
    from ..kernels.floatdot import PATH
    return {"cpu": name, "cpus": os.cpu_count(), "simd": simd, "kernel_path": PATH, "python": platform.python_version()}


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
        entry["batch_cost"] = BATCH * entry["ours"]["decode_tok_s"] / entry["ours"]["batch_decode_tok_s"]
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
    lines = [f"{report['date']}: {m['cpu']}, {m['cpus']} CPUs ({' '.join(m['simd'])}), {report['threads']} threads, "
             f"decode kernel path {m['kernel_path']}; read bandwidth "
             + ", ".join(f"{v / 1e9:.1f} GB/s ({k})" for k, v in bw.items()), "",
             "| case | engine | decode tok/s (min-max) | prefill tok/s (128) (min-max) | load s | peak RSS GB | "
             "ours / llama.cpp |", "|---|---|---|---|---|---|---|"]
    for entry in report["cases"]:
        for engine in ("ours", "llama.cpp"):
            if engine not in entry:
                continue
            r = entry[engine]
            ratio = (f"decode {entry['decode_ratio']:.2f}x, prefill {entry['prefill_ratio']:.2f}x"
                     if engine == "ours" and "decode_ratio" in entry else "")
            decode, prefill = r["spread"]["decode_tok_s"], r["spread"]["prefill_tok_s"]
            lines.append(f"| {entry['case']} | {engine} | {r['decode_tok_s']:.2f} ({decode[0]:.2f}-{decode[1]:.2f}) | "
                         f"{r['prefill_tok_s']:.1f} ({prefill[0]:.1f}-{prefill[1]:.1f}) | "
                         f"{r['load_s']:.1f} | {r['peak_rss'] / 1e9:.2f} | {ratio} |")
    lines.append("")
    for entry in report["cases"]:
        lines.append(f"{entry['case']}: ours decodes at {entry['ours_vs_bandwidth']:.2f} of the bandwidth limit "
                     f"({entry['bytes_per_token'] / 1e9:.2f} GB per token); peak RSS {entry['ours_rss_vs_file']:.2f}x "
                     f"the file; {BATCH} sequences decode at {entry['ours']['batch_decode_tok_s']:.2f} tok/s in all, "
                     f"a step of {BATCH} rows costing {entry['batch_cost']:.2f}x a step of one")
    return "\n".join(lines)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], int(sys.argv[3]))
