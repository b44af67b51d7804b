"""Aggregate decode speed of B sequences stepped together, over one sequence alone, in one run.

    python benchmarks/batched_decode.py [MODEL] [--batch 8] [--steps 6] [--layers N]

MODEL defaults to a synthetic Llama-2-13B GPTQ checkpoint (`llama-ref synth`, written once to
$LLAMA_REF_HOME/bench/; `--layers` keeps only the first N layers for a quick look). Each
sequence gets its own 16-token prompt, prefilled first; then `--steps` decode steps of the
batch (decoding/batch.py, as the server runs them) are timed for 1 sequence and for B.
Decoding one sequence reads every weight once; B sequences in one pass read them once too,
so the ratio (B-sequence tokens/s over 1-sequence tokens/s) shows how much of the batch's
work is the weights' reading rather than per-row arithmetic. Target (issue K): >= 4 at B = 8.
"""
import argparse
import json
import time

import llama_ref
from llama_ref import SamplingParams
from llama_ref.decoding.batch import Batch
from llama_ref.tools.assets import cache_home
from llama_ref.tools.synth import write_synthetic_gptq

PROMPT = 16


def decode_speed(model, sequences: int, steps: int) -> float:
    """Tokens per second of `steps` decode steps of `sequences` sequences, after their prefill."""
    params = SamplingParams(max_new_tokens=steps + 2, temperature=0, ignore_eos=True)
    batch = Batch(model)
    for i in range(sequences):
        batch.add(model.generate([1, *range(100 + 7 * i, 100 + 7 * i + PROMPT - 1)], params))
    while any(g.prefilling for g in batch.generations):
        batch.step()
    batch.step()                                   # the first decode step: warms the decode path
    started = time.perf_counter()
    for _ in range(steps):
        batch.step()
    return sequences * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layers", type=int)
    args = parser.parse_args()
    path = args.model
    if path is None:
        path = cache_home() / "bench" / f"gptq-llama-2-13b-l{args.layers or 'all'}"
        if not path.exists():
            write_synthetic_gptq(path, "llama-2-13b", layers=args.layers)
    model = llama_ref.load_model(path)
    single = decode_speed(model, 1, args.steps)
    batched = decode_speed(model, args.batch, args.steps)
    again = decode_speed(model, 1, args.steps)      # the single stream twice, around the batch: drift shows
    print(json.dumps({"model": str(path), "batch": args.batch, "steps": args.steps,
                      "single_tok_s": [round(single, 3), round(again, 3)], "batched_tok_s": round(batched, 3),
                      "ratio": round(batched / ((single + again) / 2), 2)}, indent=1))


if __name__ == "__main__":
    main()
