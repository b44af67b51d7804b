"""The `llama-ref` command line."""
import argparse
import sys
import time

import numpy as np

from . import load_model
from .errors import LlamaRefError
from .tokenizer import IncrementalDetokenizer


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


def prompt_ids(model, args) -> list[int]:
    if args.prompt_ids is not None:
        return parse_ids(args.prompt_ids)
    if model.tokenizer is None:
        raise LlamaRefError(f"--prompt: {args.model} has no tokenizer (tokenizer.model or tokenizer.json); "
                            "pass --prompt-ids instead")
    return model.tokenizer.encode(args.prompt, bos=model.tokenizer.add_bos, eos=False)


def cmd_generate(args) -> None:
    if args.prompt_ids is not None:
        parse_ids(args.prompt_ids)  # reject bad ids before the model loads
    started = time.perf_counter()
    model = load_model(args.model)
    loaded = time.perf_counter()
    prompt = prompt_ids(model, args)
    # Text in, text out, stopping at end-of-sequence; ids in, every id out.
    detokenizer = IncrementalDetokenizer(model.tokenizer, prompt) if args.prompt_ids is None else None
    stop_ids = {*model.config.eos_token_ids, model.tokenizer.eos_id} if detokenizer else set()
    count = 0
    for token in generate_greedy(model, prompt, args.max_new_tokens):
        count += 1
        if token in stop_ids:
            break
        print(detokenizer.add(token) if detokenizer else f"{token} ", end="", flush=True)
    print(detokenizer.flush() if detokenizer else "")
    done = time.perf_counter()
    print(f"[load {loaded - started:.2f} s, {count} tokens in {done - loaded:.2f} s]", file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llama-ref", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="greedy continuation of a prompt")
    gen.add_argument("--model", required=True, help="HF checkpoint directory (config.json + safetensors)")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="raw text; BOS is added when the tokenizer asks for it")
    prompt.add_argument("--prompt-ids", help='token ids instead of text, e.g. "1 450 7483"; prints the ids '
                        "generated, without stopping at end-of-sequence")
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
