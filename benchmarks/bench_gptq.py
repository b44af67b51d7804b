"""Decode and prefill speed, load time and peak RSS of a 4-bit GPTQ checkpoint, against
the machine's memory bandwidth.

    python benchmarks/bench_gptq.py [--shape llama-2-13b] [--layers N]

A synthetic checkpoint of the shape (llama_ref/synth.py: random packed weights, sym, group
size 128) is written once to $LLAMA_REF_HOME/bench/ and measured in a fresh process:
decoding 32 tokens after a 16-token prompt, prefill of a 128-token prompt. Batch-1 decoding
reads every weight byte once per token (the embedding table aside: one row per token), so
those bytes times tokens/s is the bandwidth decoding implies; it is printed over what this
machine reads (a parallel sum over 1 GiB, same run), 1.0 being the ceiling.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench_dense import HOME, read_bandwidth

from llama_ref.synth import SHAPES, write_synthetic_gptq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-2-13b", choices=SHAPES)
    parser.add_argument("--layers", type=int, help="only the first N layers")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prefill", type=int, default=128)
    args = parser.parse_args()
    directory = HOME / "bench" / (f"gptq-{args.shape}" + (f"-l{args.layers}" if args.layers else ""))
    if not directory.exists():
        print(f"writing {directory} ...", flush=True)
        write_synthetic_gptq(directory, args.shape, args.layers)
    file_size = (directory / "model.safetensors").stat().st_size
    config = json.loads((directory / "config.json").read_text())
    per_token = file_size - 2 * config["vocab_size"] * config["hidden_size"]   # minus the fp16 embedding table
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("bench_dense.py")), "--measure", str(directory),
                          "--prompt", str(args.prompt), "--tokens", str(args.tokens), "--prefill", str(args.prefill)],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    bandwidth = read_bandwidth()
    implied = result["decode_tok_s"] * per_token
    print(f"checkpoint        {directory.name}: {file_size / 1e9:.2f} GB ({per_token / 1e9:.2f} GB read per token)")
    print(f"load time         {result['load_s']:.2f} s")
    print(f"RSS after load    {result['rss_after_load'] / 1e9:.2f} GB")
    print(f"peak RSS          {result['peak_rss'] / 1e9:.2f} GB = {result['peak_rss'] / file_size:.2f} x file size")
    print(f"prefill           {result['prefill_tok_s']:.2f} tokens/s ({args.prefill}-token prompt)")
    print(f"decode            {result['decode_tok_s']:.2f} tokens/s ({args.tokens} tokens after {args.prompt})")
    print(f"bandwidth         decode implies {implied / 1e9:.1f} GB/s; this machine reads {bandwidth / 1e9:.1f} GB/s"
          f" -> {implied / bandwidth:.2f} of the ceiling")


if __name__ == "__main__":
    main()
