"""How large a perplexity difference the held-out text can resolve: each checkpoint's
perplexity window by window, and its ratio to the first checkpoint's with the paired standard
error over windows.

    .venv/bin/python benchmarks/paired_perplexity.py NAME=CHECKPOINT ... [--start 0] [--tokens 16384] [--text FILE]

Windows of --context tokens with no overlap from token --start, as benchmarks/perplexity_table.py
scores them (its defaults are these), so every window scores context - 1 tokens and the
perplexity over windows is exp of the mean of their mean losses. For two checkpoints the
per-window difference of mean losses d has mean m and standard error s = std(d) / sqrt(windows);
the ratio of their perplexities is exp(m), printed as a percent with ±100·s (s is in nats,
which for small values is the relative change).
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perplexity_table import held_out_text  # noqa: E402
from llama_ref import load_model  # noqa: E402
from llama_ref.tools.perplexity import perplexity  # noqa: E402


def window_losses(model, ids: list[int], starts: range, context: int) -> np.ndarray:
    """(windows,) the mean loss in nats of each window."""
    return np.array([perplexity(model, ids[b:b + context], context, context).negative_log_likelihood
                     for b in starts])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="NAME=PATH; the first is the baseline")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=16384, help="at most this many; -1 for the rest of the text")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--text", help="a held-out text file (default: the table's, lcet10.txt)")
    args = parser.parse_args()
    named = dict(item.split("=", 1) for item in args.checkpoints)
    text = held_out_text(args.text)
    models = {name: load_model(path) for name, path in named.items()}
    ids = next(iter(models.values())).tokenizer.encode_text(text)
    end = len(ids) if args.tokens < 0 else min(len(ids), args.start + args.tokens)
    starts = range(args.start, end - args.context + 1, args.context)      # whole windows only
    if len(starts) < 2:
        sys.exit(f"--start/--tokens: need at least 2 windows of {args.context} tokens, the text gives {len(starts)}")
    losses = {name: window_losses(model, ids, starts, args.context) for name, model in models.items()}
    baseline_name, baseline = next(iter(losses.items()))
    print(f"{len(starts)} windows of {args.context} tokens from token {args.start}")
    for name, loss in losses.items():
        line = f"{name:>12}: perplexity {np.exp(loss.mean()):.3f}"
        if name != baseline_name:
            d = loss - baseline
            line += (f"; vs {baseline_name} {np.expm1(d.mean()):+.2%} "
                     f"± {d.std(ddof=1) / np.sqrt(len(d)):.2%} (paired standard error)")
        print(line)


if __name__ == "__main__":
    main()
