"""The `llama-ref` command line."""
import argparse
import sys
import time

from . import load_model
from .errors import LlamaRefError
from .explain import explain, format_trace, plot_trace
from .sampling import PROFILES, SamplingParams


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


def sampling_params(args) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty, stop=tuple(args.stop), seed=args.seed,
                          max_new_tokens=args.max_new_tokens, profile=args.profile)


def cmd_generate(args) -> None:
    params = sampling_params(args)  # reject bad parameters and ids before the model loads
    if args.prompt_ids is not None:
        parse_ids(args.prompt_ids)
    started = time.perf_counter()
    model = load_model(args.model)
    loaded = time.perf_counter()
    generation = model.generate(prompt_ids(model, args), params)
    # Text in, text out; ids in, ids out (the end-of-sequence id included).
    for event in generation:
        print(event.delta if args.prompt_ids is None else f"{event.token_id} ", end="", flush=True)
    print()
    done = time.perf_counter()
    choice = generation.result().choices[0]
    print(f"[load {loaded - started:.2f} s, {len(choice.tokens)} tokens in {done - loaded:.2f} s, "
          f"finish: {choice.finish_reason}, seed: {choice.seed}]", file=sys.stderr)


def cmd_explain(args) -> None:
    params = sampling_params(args)
    model = load_model(args.model)
    trace = explain(model, prompt_ids(model, args), params, args.step)
    print(format_trace(trace, model.tokenizer))
    if args.png:
        print(f"[plot saved to {plot_trace(trace, args.png, model.tokenizer)}]", file=sys.stderr)


def add_prompt_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="HF checkpoint directory (config.json + safetensors)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="raw text; BOS is added when the tokenizer asks for it")
    prompt.add_argument("--prompt-ids", help='token ids instead of text, e.g. "1 450 7483"; prints the ids '
                        "generated")


def add_sampling_arguments(parser) -> None:
    """One flag per SamplingParams field (spec/sampling.md says what each does)."""
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (the default here) is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--presence-penalty", type=float, default=0.0)
    parser.add_argument("--frequency-penalty", type=float, default=0.0)
    parser.add_argument("--stop", action="append", default=[], help="a stop string; repeat for several")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--profile", default="reference", choices=PROFILES)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llama-ref", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="continue a prompt (greedy unless --temperature is set)")
    add_prompt_arguments(gen)
    add_sampling_arguments(gen)
    gen.set_defaults(run=cmd_generate)
    audit = commands.add_parser("explain", help="what each sampling stage does to one step's distribution")
    add_prompt_arguments(audit)
    add_sampling_arguments(audit)
    audit.add_argument("--step", type=int, default=0, help="which generated token to explain (0 = the first)")
    audit.add_argument("--png", help="also save the stages as a bar chart")
    audit.set_defaults(run=cmd_explain)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except LlamaRefError as err:
        print(f"llama-ref: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
