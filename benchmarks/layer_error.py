"""Per-Linear error of quantized checkpoints on held-out activations: for every Linear,
tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) with ΔW = Ŵ - W and H = XᵀX/n from the inputs X that the
unquantized model gives that Linear on held-out text. This is what GPTQ minimises (on its
calibration inputs), so it compares two quantizers far more steadily than perplexity does.

    .venv/bin/python benchmarks/layer_error.py NAME=CHECKPOINT ... [--source default] [--tokens 2048] [--text FILE]

Prints one row per Linear and, per checkpoint, the mean over Linears and per Linear kind.
Held-out text: the same as benchmarks/perplexity_table.py (lcet10.txt), or --text.
"""
import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perplexity_table import held_out_text  # noqa: E402
from llama_ref import load_model  # noqa: E402
from llama_ref.api import Model  # noqa: E402
from llama_ref.tools.quantize import LINEARS  # noqa: E402


class Recording:
    """A Linear that also sums xᵀx of its inputs."""

    def __init__(self, linear):
        self.linear = linear
        self.name, self.in_features, self.out_features = linear.name, linear.in_features, linear.out_features
        self.bias, self.fused = linear.bias, None       # computed on its own, never as part of a fused set
        self.sum, self.rows = 0.0, 0

    def dequantize(self):
        return self.linear.dequantize()

    def __call__(self, x):
        rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
        self.sum = self.sum + rows.T @ rows
        self.rows += rows.shape[0]
        return self.linear(x)


def input_hessians(source: Model, ids: list[int], context: int) -> dict:
    """(layer, meta name) -> H (in, in) float64 of the unquantized model on `ids`."""
    layers = [dataclasses.replace(layer, **{short: Recording(getattr(layer, short)) for short in LINEARS})
              for layer in source.weights.layers]
    model = Model(source.config, dataclasses.replace(source.weights, layers=tuple(layers)), source.tokenizer)
    for begin in range(0, len(ids), context):
        window = ids[begin:begin + context]
        model.forward(window, 0, model.new_cache(len(window)))
    return {(i, short): getattr(layer, short).sum / getattr(layer, short).rows
            for i, layer in enumerate(layers) for short in LINEARS}


def relative_errors(source: Model, path: str, hessians: dict) -> dict:
    quantized = load_model(path)
    errors = {}
    for i, (ours, reference) in enumerate(zip(quantized.weights.layers, source.weights.layers)):
        for short in LINEARS:
            w = getattr(reference, short).dequantize().astype(np.float64)          # (out, in)
            delta = getattr(ours, short).dequantize().astype(np.float64) - w
            h = hessians[i, short]
            errors[i, short] = float(((delta @ h) * delta).sum() / ((w @ h) * w).sum())
    return errors


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="NAME=PATH")
    parser.add_argument("--source", default="default", help="the unquantized model the checkpoints came from")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--text", help="a held-out text file (default: the table's, lcet10.txt)")
    args = parser.parse_args()
    named = dict(item.split("=", 1) for item in args.checkpoints)
    source = load_model(args.source)
    text = held_out_text(args.text)
    hessians = input_hessians(source, source.tokenizer.encode_text(text)[:args.tokens], args.context)
    results = {name: relative_errors(source, path, hessians) for name, path in named.items()}
    print("layer linear " + " ".join(f"{name:>10}" for name in named))
    for key in hessians:
        print(f"{key[0]:5} {LINEARS[key[1]]:<18}" + " ".join(f"{results[name][key]:10.3e}" for name in named))
    for name, errors in results.items():
        kinds = {LINEARS[short]: np.mean([e for (i, s), e in errors.items() if s == short]) for short in LINEARS}
        print(f"{name}: mean {np.mean(list(errors.values())):.6f}; "
              + ", ".join(f"{kind} {value:.5f}" for kind, value in kinds.items()))


if __name__ == "__main__":
    main()
