"""The perplexity table of docs/quantization.md: SmolLM2-135M-Instruct (the default model, dequantized from
its GGUF) at 4 bits, round-to-nearest vs our GPTQ vs gptqmodel's GPTQ, on held-out text.

    .venv/bin/python benchmarks/perplexity_table.py [--samples 128] [--seq-len 256] [--eval-tokens 16384]
        [--seeds 1] [--first-seed 0] [--group-sizes 32,64,128]
    .venv/bin/python benchmarks/perplexity_table.py --merge RUN.json ...

- Calibration: the same token windows for both quantizers (the default calibration text,
  llama_ref/data/calibration.txt), passed to gptqmodel as token ids. With --seeds K, each
  GPTQ row is the mean over K draws of the windows (seeds first..first+K-1), with the
  spread: one draw of the windows moves a quantizer's perplexity by several percent of its
  increase over fp32.
- gptqmodel 7.7.0 quantizes the fp16 checkpoint transformers makes from the same GGUF (the
  weights equal to fp16 rounding), loaded as float32 so that its calibration forward runs in
  fp32 as ours does, with the classic algorithm: act_group_aware=False, damp_percent=0.01, as
  ours. Its checkpoints are cached under $LLAMA_REF_HOME/derived, keyed by the settings, the
  seed and a hash of the calibration text.
- Held-out text: the Library of Congress "Workshop on Electronic Texts" proceedings (1992,
  lcet10.txt of the Canterbury corpus, from the brotli source package), first --eval-tokens
  tokens, windows of 512 with no overlap. Every row is evaluated by llama_ref.tools.perplexity,
  which the tests check against transformers.
Prints a Markdown table and a JSON line with every number. --merge reads such JSON lines
(each file's last line), from runs with the same settings and different seeds, and prints the
table of all their draws together, so that draws can be added one run at a time; docs/quantization.md's
runs are in benchmarks/results/.

Below the table, the ratio of the increases over fp32, (ours - fp32) / (gptqmodel's - fp32),
is taken per draw (both quantizers saw the same windows) and pooled over every setting and
draw: its mean and standard error say whether the two differ beyond draw noise.
"""
import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import oracles  # noqa: E402
from llama_ref import load_model  # noqa: E402
from llama_ref.tools.assets import cache_home, default_model, fetch_package_files  # noqa: E402
from llama_ref.tools.perplexity import perplexity  # noqa: E402
from llama_ref.tools.gptq import QuantizeSettings  # noqa: E402
from llama_ref.tools.quantize import DEFAULT_CALIBRATION, calibration_windows, quantize  # noqa: E402

HELD_OUT = ("brotli==1.2.1", "brotli-1.2.1/tests/testdata/lcet10.txt")
GROUP_SIZES = (32, 64, 128)


def held_out_text(path: str | None = None) -> str:
    """The text at `path`, or by default the held-out text of the table (lcet10.txt)."""
    if path is not None:
        return Path(path).read_text()
    package, member = HELD_OUT
    return fetch_package_files(package, [member], "sdist")[member].read_text()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--seeds", type=int, default=1, help="draws of the calibration windows per GPTQ row")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--group-sizes", default=",".join(map(str, GROUP_SIZES)))
    parser.add_argument("--merge", nargs="+", metavar="RUN.json", help="print the table of earlier runs' JSON lines")
    args = parser.parse_args()
    if args.merge:
        print(table(merge([json.loads(Path(run).read_text().strip().splitlines()[-1]) for run in args.merge])))
        return

    source = load_model("default")
    tokenizer = source.tokenizer
    held_out = tokenizer.encode_text(held_out_text())
    held_out = held_out[:args.eval_tokens]
    fp16 = oracles.smollm2_fp16_checkpoint(default_model())
    calibration = DEFAULT_CALIBRATION.read_text()
    text_hash = hashlib.sha256(calibration.encode()).hexdigest()[:8]
    seeds = range(args.first_seed, args.first_seed + args.seeds)

    def score(model) -> float:
        return round(perplexity(model, held_out, args.context, args.context).perplexity, 3)

    def gptqmodel(group_size: int, act_order: bool, seed: int) -> Path:
        theirs = cache_home() / "derived" / (f"smollm2-135m-instruct-gptq-g{group_size}-act{int(act_order)}"
                                             f"-n{args.samples}x{args.seq_len}-text{text_hash}-seed{seed}-fp32-gptqmodel7.7.0")
        if not theirs.exists():
            windows = calibration_windows(tokenizer, calibration, args.samples, args.seq_len, seed)
            options = dict(group_size=group_size, desc_act=act_order, sym=True, damp_percent=0.01,
                           act_group_aware=False)
            started = time.perf_counter()
            oracles.gptqmodel_quantize(fp16, theirs, options, windows.tolist(), "float32")
            print(f"gptqmodel g{group_size} act-order {act_order} seed {seed}: "
                  f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
        return theirs

    settings = dict(samples=args.samples, seq_len=args.seq_len, eval_tokens=len(held_out), context=args.context)
    results = {"settings": settings, "seeds": list(seeds), "fp32": score(source), "rows": []}
    print(f"fp32 (the GGUF, dequantized): {results['fp32']}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as scratch:
        for group_size in map(int, args.group_sizes.split(",")):
            for method, act_order in (("rtn", False), ("gptq", False), ("gptq", True)):
                settings = QuantizeSettings(method=method, group_size=group_size, act_order=act_order)
                row = {"group_size": group_size, "method": method, "act_order": act_order, "ours": [],
                       "seconds": [], "gptqmodel": []}
                for seed in (seeds if method == "gptq" else seeds[:1]):
                    target = Path(scratch) / f"{method}-{group_size}-{act_order}-{seed}"
                    report = quantize(source, target, settings, samples=args.samples, seq_len=args.seq_len, seed=seed)
                    row["ours"].append(score(load_model(target)))
                    row["seconds"].append(report["seconds"])
                    if method == "gptq":
                        row["gptqmodel"].append(score(load_model(gptqmodel(group_size, act_order, seed))))
                    print(row, file=sys.stderr)
                results["rows"].append(row)
    print(table(results))
    print(json.dumps(results))


def merge(runs: list[dict]) -> dict:
    """One result with every run's draws: the runs must share settings, fp32 and RTN (which no seed changes)."""
    first = runs[0]
    by_setting = [{(row["group_size"], row["method"], row["act_order"]): row for row in run["rows"]} for run in runs]
    for run, run_rows in zip(runs[1:], by_setting[1:]):
        if run["settings"] != first["settings"] or run["fp32"] != first["fp32"] or run_rows.keys() != by_setting[0].keys():
            sys.exit(f"--merge: the runs differ in settings, fp32 or rows: {first['settings']} fp32 {first['fp32']} "
                     f"{sorted(by_setting[0])} vs {run['settings']} fp32 {run['fp32']} {sorted(run_rows)}")
    seeds = [seed for run in runs for seed in run["seeds"]]
    if len(set(seeds)) < len(seeds):
        sys.exit(f"--merge: a seed appears in two runs: {seeds}")
    rows = []
    for setting, row in by_setting[0].items():
        same = [run_rows[setting] for run_rows in by_setting]
        if row["method"] == "rtn":
            if any(other["ours"] != row["ours"] for other in same):
                sys.exit(f"--merge: RTN at group size {row['group_size']} differs between runs")
            rows.append(row)
        else:
            rows.append({**row, **{field: [value for other in same for value in other[field]]
                                   for field in ("ours", "seconds", "gptqmodel")}})
    return {**first, "seeds": seeds, "rows": rows}


def table(results: dict) -> str:
    fp32, settings, draws = results["fp32"], results["settings"], len(results["seeds"])
    described = f", mean of {draws} draws of the windows (min-max)" if draws > 1 else ""
    lines = [f"Perplexity on {settings['eval_tokens']} held-out tokens (context {settings['context']}); "
             f"fp32 = {fp32}. Calibration: {settings['samples']} x {settings['seq_len']} tokens{described}.", "",
             "| group size | act-order | RTN | our GPTQ | gptqmodel GPTQ | our increase over fp32 vs gptqmodel's |",
             "|---|---|---|---|---|---|"]

    def cell(values: list) -> str:
        mean = f"{np.mean(values):.3f}"
        return mean if len(values) == 1 else f"{mean} ({min(values):.2f}-{max(values):.2f})"

    def relative_increase(ours: float, theirs: float) -> float:
        return (ours - fp32) / (theirs - fp32) - 1

    rtn = {row["group_size"]: row["ours"][0] for row in results["rows"] if row["method"] == "rtn"}
    per_draw = []
    for row in results["rows"]:
        if row["method"] != "gptq":
            continue
        relative = relative_increase(np.mean(row["ours"]), np.mean(row["gptqmodel"]))
        per_draw += [relative_increase(ours, theirs) for ours, theirs in zip(row["ours"], row["gptqmodel"])]
        lines.append(f"| {row['group_size']} | {'on' if row['act_order'] else 'off'} | {rtn[row['group_size']]} | "
                     f"{cell(row['ours'])} | {cell(row['gptqmodel'])} | {relative:+.1%} |")
    if len(per_draw) > 1:
        lines += ["", f"Our increase over fp32 vs gptqmodel's, per draw over every setting ({len(per_draw)} pairs): "
                      f"mean {np.mean(per_draw):+.1%} ± {np.std(per_draw, ddof=1) / np.sqrt(len(per_draw)):.1%} "
                      f"(standard error), range {min(per_draw):+.1%} to {max(per_draw):+.1%}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
