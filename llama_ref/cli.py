"""The `llama-ref` command line."""
import argparse
import sys
import time

import numpy as np

from . import load_model
from .errors import LlamaRefError


def generate_greedy(model, prompt_ids: list[int], max_new_tokens: int):
    """Yield greedy tokens (argmax, lowest id on ties), prefilling the prompt once and then
    decoding one token at a time through the KV cache."""
    cache = model.new_cache()
    logits = model.forward(prompt_ids, 0, cache)[-1]
    for step in range(max_new_tokens):
        token = int(np.argmax(logits))
        yield token
        if step + 1 < max_new_tokens:
            logits = model.forward([token], len(prompt_ids) + step, cache)[-1]


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise LlamaRefError(f"--prompt-ids: expected integers separated by spaces or commas, got {text!r}") from None
    if not ids:
        raise LlamaRefError("--prompt-ids: at least one token id is needed")
    return ids


def cmd_generate(args) -> None:
    prompt = parse_ids(args.prompt_ids)
    started = time.perf_counter()
    model = load_model(args.model)
    loaded = time.perf_counter()
    tokens = []
    for token in generate_greedy(model, prompt, args.max_new_tokens):
        tokens.append(token)
        print(token, end=" ", flush=True)
    done = time.perf_counter()
    print()
    print(f"[load {loaded - started:.2f} s, {len(tokens)} tokens in {done - loaded:.2f} s]", file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llama-ref", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="greedy continuation of a prompt given as token ids")
    gen.add_argument("--model", required=True, help="HF checkpoint directory (config.json + safetensors)")
    gen.add_argument("--prompt-ids", required=True, help='token ids, e.g. "1 450 7483"')
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.set_defaults(run=cmd_generate)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except LlamaRefError as err:
        print(f"llama-ref: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
