"""Time to first token of a 16-token prompt in a fresh KV cache, against a reused one and
against a cache allocated with np.zeros, in one run.

    python benchmarks/fresh_cache.py [MODEL] [--positions 4096] [--rounds 3]

MODEL defaults to the synthetic Llama-2-13B GPTQ checkpoint of `make bench` (written there
if missing). Each round prefills the same 16 tokens three ways, in turn: into a new cache
(KVCache: lazily mapped, 4 KB pages), into the cache of the round before (its memory already
resident), and into a cache whose arrays are np.zeros (NumPy asks for transparent huge pages
for large arrays, so a first write resident-izes and zeroes 2 MB a head). Printed: the median
time of each, and how much resident memory each fresh cache added.
"""
import argparse
import statistics
import time
from pathlib import Path

import numpy as np

import llama_ref
from llama_ref.tools.assets import cache_home
from llama_ref.tools.bench import resident_bytes
from llama_ref.tools.synth import write_synthetic_gptq

PROMPT = np.arange(3, 19)


def timed_prefill(model, cache) -> tuple[float, int]:
    """(seconds, bytes of resident memory added) of one 16-token prefill into cache."""
    before, started = resident_bytes("VmRSS"), time.perf_counter()
    model.forward(PROMPT, 0, cache)
    return time.perf_counter() - started, resident_bytes("VmRSS") - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--positions", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    path = Path(args.model) if args.model else cache_home() / "bench" / "gptq-llama-2-13b-lall"
    if args.model is None and not path.exists():
        write_synthetic_gptq(path, "llama-2-13b")
    model = llama_ref.load_model(path)
    reused = model.new_cache(args.positions)
    model.forward(PROMPT, 0, reused)                  # compiles the kernels and reads the weights in
    results = {"fresh": [], "reused": [], "np.zeros": []}
    for _ in range(args.rounds):
        results["fresh"].append(timed_prefill(model, model.new_cache(args.positions)))
        results["reused"].append(timed_prefill(model, reused))
        numpy_cache = model.new_cache(args.positions)
        shape = numpy_cache.k.shape
        numpy_cache.k, numpy_cache.v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        results["np.zeros"].append(timed_prefill(model, numpy_cache))
        del numpy_cache
    print(f"{path.name}: 16-token prompt, cache of {args.positions} positions, "
          f"{args.rounds} rounds")
    print("| cache | time to first token s (median, min-max) | resident memory added MB (median) |")
    print("|---|---|---|")
    for name, runs in results.items():
        seconds = [s for s, _ in runs]
        print(f"| {name} | {statistics.median(seconds):.2f} ({min(seconds):.2f}-{max(seconds):.2f}) | "
              f"{statistics.median(b for _, b in runs) / 1e6:.0f} |")


if __name__ == "__main__":
    main()
