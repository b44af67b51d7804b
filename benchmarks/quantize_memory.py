"""Peak resident memory of `llama-ref quantize` beside what one decoder layer needs.

The quantizer holds one layer's work at a time (llama_ref/tools/quantize.py), so its peak
must not grow with the number of layers. Each case runs `llama-ref quantize` in its own
process and reads that process's peak RSS (wait4's ru_maxrss, which Linux floors at this
process's own peak when it spawns the child: so this process stays small, writing synthetic
checkpoints in a child of their own, and a peak it cannot tell from its own is refused):

    default   the default model (SmolLM2-135M-Instruct), the quantize defaults (128 x 256)
    7b-L      a synthetic fp16 checkpoint of Llama-2-7B's shape cut to L layers (written by
              `llama-ref synth --fp16`), for each L of --layers, --samples x --seq-len

Beside each peak it prints the bound the design promises, as the sum of:
    base        the process with the engine imported and the source model loaded (measured
                in the same run: `load_model` alone)
    layer       one layer's Linears as float32 (each is dequantized to be quantized, and
                its quantized self computes the activations after it)
    activations the calibration rows through one layer, float32, every array alive at once:
                x, h, q, k, v, the rotated q and k and their rotate-half copies, the
                attention output (8 x hidden a row); gate, up, exp(-gate), silu(gate) and
                their product (5 x intermediate a row); and one window's attention scores
                and their softmax
    hessian     the widest input's Hessian: up to five float64 arrays at once (its sum, the
                value, the damped and reordered copies, the inverse, the Cholesky factor) and
                the float32 factor GPTQ uses
    packed      the layer's packed output (codes at 4 bits, fp16 scales)
and the embedding table's float32 and fp16 copies when they are larger than a layer's work
(they are made once, before the layers). An 13B estimate is the same sum for 13B's shape,
labelled as an extrapolation.

With --method rtn there is no calibration pass, so the activations and the Hessian drop out
of the bound, and what remains shows most plainly whether memory grows with the layers.

    python benchmarks/quantize_memory.py [--layers 2 4] [--samples 32] [--seq-len 256] [--method rtn]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from llama_ref.tools.assets import cache_home, default_model
from llama_ref.tools.synth import SHAPES

GB = 1e9
LOAD_ONLY = "import sys, llama_ref; llama_ref.load_model(sys.argv[1])"
VOCAB = 32000


def peak_rss(command: list[str]) -> tuple[float, float]:
    """(peak RSS in bytes, wall seconds) of one command run to completion in its own process."""
    import time
    started = time.perf_counter()
    with tempfile.TemporaryFile() as errors:      # a file, not a pipe: the progress bar never blocks
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            errors.seek(0)
            raise SystemExit(f"{' '.join(command)} failed:\n{errors.read().decode()[-2000:]}")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if usage.ru_maxrss <= own:
        raise SystemExit(f"{' '.join(command)}: its peak RSS cannot be told from this process's ({own} kB)")
    return usage.ru_maxrss * 1024, time.perf_counter() - started


def layer_bound(hidden: int, inter: int, heads: int, vocab: int, rows: int, seq_len: int) -> dict:
    """The terms of the bound, in bytes, for one layer of a multi-head Llama of this shape."""
    shapes = [(hidden, hidden)] * 4 + [(hidden, inter)] * 2 + [(inter, hidden)]    # (in, out) per Linear
    widest = max(n_in for n_in, _ in shapes)
    return {"layer": sum(4 * n_in * n_out for n_in, n_out in shapes),
            "activations": 4 * rows * (8 * hidden + 5 * inter) + 2 * 4 * heads * seq_len * seq_len,
            "hessian": (5 * 8 + 4) * widest * widest,
            "packed": sum(n_in * n_out // 2 + 2 * n_out * -(-n_in // 128) for n_in, n_out in shapes),
            "embedding": 6 * vocab * hidden}


def bound(terms: dict, base: float, method: str = "gptq") -> float:
    work = terms["layer"] + terms["packed"] + (terms["activations"] + terms["hessian"] if method == "gptq" else 0)
    return base + max(work, terms["embedding"])


def run_case(name: str, source: Path, shape: dict, extra: list[str], rows: int, seq_len: int, method: str) -> dict:
    base, _ = peak_rss([sys.executable, "-c", LOAD_ONLY, str(source)])
    with tempfile.TemporaryDirectory() as tmp:
        peak, seconds = peak_rss([sys.executable, "-m", "llama_ref.cli", "quantize", str(source),
                                  str(Path(tmp) / "out"), "--method", method, *extra])
    terms = layer_bound(shape["hidden_size"], shape["intermediate_size"], shape["num_attention_heads"],
                        shape["vocab_size"], rows, seq_len)
    return {"case": name, "method": method, "peak_gb": peak / GB, "base_gb": base / GB,
            "bound_gb": bound(terms, base, method) / GB,
            "seconds": seconds, **{f"{key}_gb": value / GB for key, value in terms.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--skip-default", action="store_true")
    parser.add_argument("--method", default="gptq", choices=["gptq", "rtn"])
    args = parser.parse_args()
    results = []
    if not args.skip_default:
        smollm2 = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "vocab_size": 49152}
        results.append(run_case("default", default_model(), smollm2, [], 128 * 256, 256, args.method))
    seven_b = {**SHAPES["llama-2-7b"], "vocab_size": VOCAB}
    for layers in args.layers:
        source = cache_home() / "bench" / f"fp16-llama-2-7b-l{layers}"
        if not source.exists():
            subprocess.run([sys.executable, "-m", "llama_ref.cli", "synth", str(source), "--shape", "llama-2-7b",
                            "--layers", str(layers), "--fp16"], check=True)
        results.append(run_case(f"7b-{layers}", source, seven_b,
                                ["--samples", str(args.samples), "--seq-len", str(args.seq_len)],
                                args.samples * args.seq_len, args.seq_len, args.method))
    thirteen_b = {**SHAPES["llama-2-13b"], "vocab_size": VOCAB}
    terms = layer_bound(thirteen_b["hidden_size"], thirteen_b["intermediate_size"], thirteen_b["num_attention_heads"],
                        VOCAB, args.samples * args.seq_len, args.seq_len)
    print(f"method {args.method}")
    print("| case | peak RSS GB | bound GB | base GB | layer | activations | hessian | packed | embedding | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['case']} | {r['peak_gb']:.2f} | {r['bound_gb']:.2f} | {r['base_gb']:.2f} | {r['layer_gb']:.2f} | "
              f"{r['activations_gb']:.2f} | {r['hessian_gb']:.2f} | {r['packed_gb']:.2f} | {r['embedding_gb']:.2f} | "
              f"{r['seconds']:.0f} |")
    print(f"| 13b (extrapolated, base as 7b's) | | {bound(terms, results[-1]['base_gb'] * GB, args.method) / GB:.2f} | | "
          + " | ".join(f"{terms[key] / GB:.2f}" for key in ("layer", "activations", "hessian", "packed", "embedding"))
          + " | |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
