"""The `llama-ref` command line."""
import argparse
import json
import logging
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .api import load_model
from .decoding.params import PROFILES, RULES, SamplingParams, sampling_params
from .decoding.tools import CHOICES, parse_tools
from .decoding.trace import explanation, format_trace, playground_page, plot_trace, step_trace
from .embedding import POOLINGS
from .errors import CheckpointError, ConfigError, InputFileError, LlamaRefError
from .files import atomic_output
from .tokenizer import TokenizerError
from .tools.assets import AssetError, default_model
from .tools.bench import bench, format_report
from .tools.gptq import QuantizeSettings
from .tools.perplexity import perplexity
from .tools.quantize import quantize
from .tools.synth import SHAPES, write_synthetic_gptq

# The flags' own defaults and help where they differ from SamplingParams': greedy and short.
SAMPLING_FLAGS = {"max_new_tokens": (32, "tokens to generate at most"),
                  "temperature": (0.0, "divides the logits; 0 (the default here) is greedy"),
                  "top_p": (None, None), "top_k": (None, None), "min_p": (None, None), "repetition_penalty": (None, None),
                  "presence_penalty": (None, None), "frequency_penalty": (None, None), "seed": (None, None)}


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


def json_file(path: str | None, flag: str):
    """The JSON a --tools or --json-schema file holds (None when the flag is not given)."""
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputFileError(f"{flag} {path}: not a readable JSON file ({err})", flag) from None


def tool_choice(value: str):
    """--tool-choice: none, auto, required, or a function's name (OpenAI's named choice)."""
    return value if value in CHOICES else {"type": "function", "function": {"name": value}}


def start_generation(model, args, params: SamplingParams, tools=None):
    """--chat / --system / --tools: the prompt as one user message in the model's chat format;
    otherwise raw text (BOS added when the tokenizer asks) or ids."""
    if args.chat or args.system is not None or tools is not None:
        if args.prompt is None:
            raise LlamaRefError("--chat: needs --prompt text, not --prompt-ids")
        system = [] if args.system is None else [{"role": "system", "content": args.system}]
        return model.chat(system + [{"role": "user", "content": args.prompt}], params, tools=tools,
                          tool_choice=tool_choice(args.tool_choice) if tools else None)
    return model.generate(prompt_ids(model, args), params)


def cmd_generate(args) -> None:
    # Reject bad parameters, ids and files before the model loads.
    schema, tools = json_file(args.json_schema, "--json-schema"), json_file(args.tools, "--tools")
    structured = {} if schema is None else {"response_format": "json_schema", "json_schema": schema}
    params = sampling_params(args, **structured)
    if tools is not None:
        parse_tools(tools, tool_choice(args.tool_choice))
    if args.prompt_ids is not None:
        parse_ids(args.prompt_ids)
    started = time.perf_counter()
    model = load_model(args.model)
    loaded = time.perf_counter()
    generation = start_generation(model, args, params, tools)
    # Text in, text out; ids in, ids out (the end-of-sequence id included); --json: one event a line.
    for event in generation:
        if args.json:
            print(json.dumps({"token_id": event.token_id, "text": event.text, "delta": event.delta,
                              "logprob": event.logprob, "special": event.special,
                              "finish_reason": event.finish_reason,
                              "tool_calls": [vars(d) for d in event.tool_calls]}, ensure_ascii=False), flush=True)
        else:
            print(event.delta if args.prompt_ids is None else f"{event.token_id} ", end="", flush=True)
    done = time.perf_counter()
    result = generation.result()
    choice = result.choices[0]
    if args.json:
        print(json.dumps({"text": choice.text, "finish_reason": choice.finish_reason, "seed": choice.seed,
                          "tool_calls": [vars(c) for c in choice.tool_calls],
                          "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
                         ensure_ascii=False))
        return
    for call in choice.tool_calls:     # a call's deltas are not text: the calls are printed whole
        print(json.dumps({"id": call.id, "name": call.name, "arguments": json.loads(call.arguments)}
                         if choice.finish_reason == "tool_calls" else vars(call), ensure_ascii=False))
    print()
    print(f"[load {loaded - started:.2f} s, {len(choice.tokens)} tokens in {done - loaded:.2f} s, "
          f"finish: {choice.finish_reason}, seed: {choice.seed}]", file=sys.stderr)


CHAT_HELP = "/reset forgets the conversation, /system TEXT sets the system message, /exit (or Ctrl-D) quits; " \
            "Ctrl-C stops an answer"


def cmd_chat(args) -> None:
    """An interactive conversation in the terminal, streamed; Ctrl-C ends the answer, not the program."""
    params = sampling_params(args)
    model = load_model(args.model)
    system, history = args.system, []
    print(f"[{args.model}: {CHAT_HELP}]", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = []
            continue
        if line.startswith("/system"):
            system = line[len("/system"):].strip() or None
            continue
        if not line.strip():
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history + \
            [{"role": "user", "content": line}]
        answer = ""
        try:
            for event in model.chat(messages, params):
                answer += event.delta
                print(event.delta, end="", flush=True)
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        print()
        history = messages[1 if system else 0:] + [{"role": "assistant", "content": answer}]


def cmd_embed(args) -> None:
    """One JSON line per text: its index, token count and vector."""
    model = load_model(args.model)
    embedding = model.embedding(args.text, args.pooling, args.normalize, args.dimensions)
    for index, (ids, vector) in enumerate(zip(embedding.inputs, embedding.result())):
        print(json.dumps({"index": index, "tokens": len(ids), "embedding": vector.tolist()}), flush=True)


def cmd_synth(args) -> None:
    print(write_synthetic_gptq(args.output, args.shape, args.layers, args.seed, dense=args.fp16))


def read_text(path: str, flag: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise InputFileError(f"{flag} {path}: cannot be read as text ({err})") from None


def cmd_quantize(args) -> None:
    settings = QuantizeSettings(method=args.method, group_size=args.group_size, act_order=args.act_order,
                                sym=not args.asym, damp=args.damp, checkpoint_format=args.format)
    text = None if args.calibration is None else read_text(args.calibration, "--calibration")
    if Path(args.output).exists():
        raise LlamaRefError(f"{args.output}: already exists; quantize writes a new directory")
    model = load_model(args.model)
    report = quantize(model, args.output, settings, text, args.samples, args.seq_len,
                      source=default_model() if args.model == "default" else args.model, progress=True)
    print(json.dumps({"output": args.output, **report}))


def cmd_perplexity(args) -> None:
    text = read_text(args.text, "--text")
    model = load_model(args.model)
    if model.tokenizer is None:
        raise LlamaRefError(f"{args.model}: perplexity needs the model's tokenizer")
    ids = model.tokenizer.encode(text, bos=model.tokenizer.add_bos, eos=False)[:args.max_tokens]
    result = perplexity(model, ids, args.ctx, args.stride or args.ctx)
    print(json.dumps({"model": args.model, "text": args.text, "context": args.ctx, "stride": args.stride or args.ctx,
                      **asdict(result)}))


def cmd_bench_serve(args) -> None:
    from .tools.serve_bench import Workload, compare, format_comparison
    for flag, value in [("--requests", args.requests), ("--concurrency", args.concurrency)]:
        if value < 1:
            raise LlamaRefError(f"{flag}: must be at least 1, got {value}")
    if args.rate is not None and args.rate <= 0:
        raise LlamaRefError(f"--rate: must be positive, got {args.rate}")
    workload = Workload(args.requests, None if args.rate else args.concurrency, args.rate, args.seed)
    targets = args.start or [args.base_url]
    summaries = compare(targets, args.model, args.served_model, workload, args.single, args.api_key,
                        log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_comparison(summaries))
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=2) + "\n")


def cmd_bench(args) -> None:
    report = bench(args.runs, args.threads, args.layers, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def cmd_fetch(args) -> None:
    print(default_model(progress=True))


def cmd_explain(args) -> None:
    params = sampling_params(args)
    model = load_model(args.model)
    generation = model.generate(prompt_ids(model, args), params, trace=True, compare_profile=args.compare_profile)
    events = [event for event in generation if event.index == 0]
    trace = step_trace(events, args.step)
    print("\n\n".join(format_trace(t, model.tokenizer) for t in (trace, trace.compared) if t is not None))
    if args.png:
        print(f"[plot saved to {plot_trace(trace, args.png, model.tokenizer)}]", file=sys.stderr)
    if args.html:
        with atomic_output(args.html) as part:
            part.write_text(playground_page(explanation(generation, events, model.tokenizer)), encoding="utf-8")
        print(f"[page saved to {args.html}]", file=sys.stderr)


def cmd_conform(args) -> int:
    """Run the checks against a server; the exit status is 1 when one fails (with --strict,
    also when one diverges), as a CI step expects. `conform export DIR` writes test vectors."""
    from . import conform
    if args.samples < 10:
        raise LlamaRefError(f"--samples: at least 10 per sampling setting, got {args.samples}", "samples")
    if args.action == "export":
        if not args.directory:
            raise LlamaRefError("conform export: give the directory to write the vectors to", "directory")
        vectors, _ = conform.vectors.export(args.model, Path(args.directory), args.samples, args.seed)
        print(f"{len(vectors['answers'])} answers of the oracle to {Path(args.directory) / conform.vectors.FILE}; "
              f"llama-ref's own server: {vectors['checks']}")
        return 0
    checks = args.checks.split(",") if args.checks else None
    unknown = [c for c in checks or [] if c not in conform.CHECKS]
    if unknown:
        raise LlamaRefError(f"--checks: unknown {', '.join(unknown)}; known: {', '.join(conform.CHECKS)}", "checks")
    if bool(args.base_url) == bool(args.start_peer):
        raise LlamaRefError("give either --base-url or --start-peer", "base_url")
    header = {"server": args.base_url, "served model": args.served_model, "oracle model": args.model,
              "dialect": args.dialect, "strict": args.strict, "samples per setting": args.samples}
    if args.vectors:
        oracle, recorded = conform.vectors.load(Path(args.vectors))
        args.samples, args.seed = recorded["samples"], recorded["seed"]
        header.update({"oracle model": f"{recorded['model']} (vectors {args.vectors}, llama-ref {recorded['llama_ref']})",
                       "samples per setting": args.samples})
    else:
        model = load_model(args.model)
        oracle = conform.Oracle(model)
    peer = None
    if args.start_peer:
        gguf = default_model() if args.model == "default" else Path(args.model)
        if gguf.suffix != ".gguf" or args.vectors:
            raise LlamaRefError(f"--model {args.model}: a peer serves a .gguf file; give one (or 'default')", "model")
        peer, args.base_url, argv = conform.peers.start(args.start_peer, gguf, model.config.context_length)
        header.update(server=f"{args.start_peer} ({conform.peers.LLAMA_CPP_PYTHON})",
                      command=" ".join(argv), dialect="llama.cpp")
        args.dialect = "llama.cpp"
    try:
        target = conform.Target(args.base_url, args.served_model, args.api_key, args.dialect)
        kit = conform.Kit(target, oracle, samples=args.samples, tie_margin=args.tie_margin, seed=args.seed)
        started = time.monotonic()
        results = conform.run(kit, checks, progress=not args.quiet)
    finally:
        if peer is not None:
            peer.terminate()
            peer.wait(timeout=30)
    header.update(requests=target.requests, seconds=round(time.monotonic() - started, 1))
    home = str(Path.home())   # reports get shared: this machine's home directory is not part of them
    if args.report:
        Path(args.report).write_text(conform.markdown(results, header).replace(home, "~"))
    if args.json:
        Path(args.json).write_text(conform.to_json(results, header).replace(home, "~"))
    for r in results:
        print(f"{r.check:14} {r.verdict:9} {r.summary}")
    failed = [r.check for r in results if r.failed(args.strict)]
    print(f"{len(results) - len(failed)} of {len(results)} checks pass" + (f"; failed: {', '.join(failed)}" if failed else "")
          + (" (divergences count as failures: --strict)" if args.strict else ""))
    return 1 if failed else 0


SERVE_EXAMPLE = """
  curl {url}/v1/openai/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{name}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}'

  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1/openai", api_key="unused")
  print(client.chat.completions.create(model="{name}", temperature=0,
        messages=[{{"role": "user", "content": "What is the capital of France?"}}]).choices[0].message.content)

  the sampling playground: {url}/playground
"""


def cmd_serve(args) -> None:
    import uvicorn
    from sse_starlette.sse import AppStatus

    from .server import ServerSettings, create_app
    from .server.state import load_served, served_models
    paths = served_models(args.model, args.served_model_name)
    aliases = {}
    for alias in args.alias:
        name, _, target = alias.partition("=")
        if not name or target not in paths:
            raise LlamaRefError(f"--alias {alias!r}: expected ALIAS=SERVED_NAME, SERVED_NAME one of {', '.join(paths)}")
        aliases[name] = target
    for flag, value, least in [("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                               ("--kv-cache-gb", args.kv_cache_gb, 0.001), ("--prefix-cache-mb", args.prefix_cache_mb, 0)]:
        if value is not None and value < least:
            raise LlamaRefError(f"{flag}: must be at least {least}, got {value}")
    if args.max_body_bytes < 1:
        raise LlamaRefError(f"--max-body-bytes: must be at least 1, got {args.max_body_bytes}")
    if args.shutdown_timeout < 0:
        raise LlamaRefError(f"--shutdown-timeout: must be at least 0, got {args.shutdown_timeout}")
    api_key = args.api_key if args.api_key_file is None else read_text(args.api_key_file, "--api-key-file").strip()
    if api_key == "":
        raise LlamaRefError("--api-key-file: the file is empty")
    settings = ServerSettings(aliases=aliases, api_key=api_key, price_per_mtoken=args.price_per_mtoken,
                              max_batch=args.max_batch, max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                              kv_cache_gb=args.kv_cache_gb, prefix_cache_mb=args.prefix_cache_mb,
                              pooling=args.pooling, normalize=args.normalize, cors_origins=tuple(args.cors_origin))
    if args.ray:
        return serve_ray(args, settings, paths)
    models = load_served(paths)
    announce(args, paths)
    if args.access_log:
        access = logging.StreamHandler(sys.stderr)
        access.setFormatter(logging.Formatter("%(message)s"))
        logging.getLogger("llama_ref.access").addHandler(access)
        logging.getLogger("llama_ref.access").setLevel(logging.INFO)
    # SIGTERM drains: uvicorn stops accepting connections and waits up to --shutdown-timeout for
    # the requests in flight. sse-starlette would end every stream at once; let them finish.
    AppStatus.disable_automatic_graceful_drain()
    # uvicorn raises the signal again once it has drained; taken here, the exit status is 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(create_app(settings, models), host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=args.shutdown_timeout)


def announce(args, paths: dict[str, str]) -> None:
    url = f"http://{args.host}:{args.port}"
    for name, path in paths.items():
        print(f"serving {path} as '{name}' on {url}", file=sys.stderr)
    print(SERVE_EXAMPLE.format(name=next(iter(paths)), url=url), file=sys.stderr, flush=True)


def serve_ray(args, settings, paths: dict[str, str]) -> None:
    """`serve --ray`: replicas on Ray Serve behind one endpoint (llama_ref/deploy/ray_serve.py).
    Each replica loads the models itself, from its own node's disk."""
    try:
        from .deploy.ray_serve import build_app, serve_on_ray
    except ImportError as err:
        raise LlamaRefError(f"--ray: Ray Serve is not installed ({err}); pip install 'llama-ref[ray]'") from None
    autoscale = None
    if args.autoscale:
        low, sep, high = args.autoscale.partition(":")
        if not (sep and low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high)):
            raise LlamaRefError(f"--autoscale {args.autoscale!r}: expected MIN:MAX with 1 <= MIN <= MAX")
        autoscale = (int(low), int(high))
    if args.replicas < 1:
        raise LlamaRefError(f"--replicas: must be at least 1, got {args.replicas}")
    if "default" in paths.values():
        default_model(progress=True)    # fetched once here; a replica on another node fetches its own
    cpus = args.cpus_per_replica or max(1.0, (os.cpu_count() or 1) / (autoscale[1] if autoscale else args.replicas))
    announce(args, paths)
    serve_on_ray(build_app(settings, paths, args.replicas, autoscale, cpus), args.host, args.port, args.ray_address)


def add_prompt_arguments(parser) -> None:
    parser.add_argument("--model", default="default",
                        help="HF checkpoint directory, .gguf file, or 'default' (SmolLM2-135M-Instruct)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="raw text; BOS is added when the tokenizer asks for it")
    prompt.add_argument("--prompt-ids", help='token ids instead of text, e.g. "1 450 7483"; prints the ids '
                        "generated")


def add_sampling_arguments(parser) -> None:
    """One flag per SamplingParams field, made from its rule (decoding/params.py; what each
    does: docs/spec/sampling.md). SamplingParams checks the values, so a bad one is refused
    with the same message as in the Python API and the server."""
    for name, (own_default, own_help) in SAMPLING_FLAGS.items():
        rule = RULES[name]
        parser.add_argument("--" + name.replace("_", "-"), type=rule.kind,
                            default=rule.default if own_default is None else own_default,
                            help=f"{own_help or rule.help}; {rule.range()}, default %(default)s")
    parser.add_argument("--stop", action="append", default=[], help="a stop string; repeat for several")
    parser.add_argument("--profile", default="reference", choices=PROFILES)


def add_embedding_arguments(parser) -> None:
    parser.add_argument("--pooling", default="mean", choices=POOLINGS,
                        help="embeddings: the mean of the input's final hidden states, or the last token's")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                        help="embeddings: divide each vector by its L2 norm (default: yes)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llama-ref", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="continue a prompt (greedy unless --temperature is set)")
    add_prompt_arguments(gen)
    add_sampling_arguments(gen)
    gen.add_argument("--chat", action="store_true", help="format --prompt as a user message in the model's chat format")
    gen.add_argument("--system", help="a system message (implies --chat)")
    gen.add_argument("--json", action="store_true", help="one JSON event per line, then a summary line")
    gen.add_argument("--tools", metavar="FILE", help="OpenAI's tools list, as JSON (implies --chat); the calls are "
                     "printed as JSON lines")
    gen.add_argument("--tool-choice", default="auto", help="with --tools: none, auto, required, or a function's name")
    gen.add_argument("--json-schema", metavar="FILE", help="a JSON Schema the answer must validate against")
    gen.set_defaults(run=cmd_generate)
    audit = commands.add_parser("explain", help="what each sampling stage does to one step's distribution")
    add_prompt_arguments(audit)
    add_sampling_arguments(audit)
    audit.add_argument("--step", type=int, default=0, help="which generated token to explain (0 = the first)")
    audit.add_argument("--png", "--plot", dest="png", help="also save the stages as a bar chart (PNG)")
    audit.add_argument("--compare-profile", choices=PROFILES, help="also show the same steps under this profile: "
                       "the same logits, history and draw")
    audit.add_argument("--html", metavar="FILE", help="also write every step as the playground's page, for sharing")
    audit.set_defaults(run=cmd_explain)
    chat = commands.add_parser("chat", help="talk to a model in the terminal", description=CHAT_HELP)
    chat.add_argument("--model", default="default", help="HF checkpoint directory, .gguf file, or 'default'")
    chat.add_argument("--system", help="the system message")
    add_sampling_arguments(chat)
    chat.set_defaults(run=cmd_chat, max_new_tokens=512)
    embed = commands.add_parser("embed", help="embedding vectors of texts: the final hidden states, pooled",
                                description="Example: llama-ref embed 'first text' 'second text' --pooling last")
    embed.add_argument("text", nargs="+", help="texts to embed, each one input (BOS added when the tokenizer asks)")
    embed.add_argument("--model", default="default", help="HF checkpoint directory, .gguf file, or 'default'")
    add_embedding_arguments(embed)
    embed.add_argument("--dimensions", type=int, help="cut the vectors to this many values (normalised again), "
                       "or pad them with zeros; at least 32")
    embed.set_defaults(run=cmd_embed)
    synth = commands.add_parser(
        "synth", help="write a random 4-bit GPTQ checkpoint of a real model's shape (for benchmarks)",
        description="Example: llama-ref synth --shape llama-2-13b --layers 2 /tmp/synth-13b-2")
    synth.add_argument("output", help="directory to create (must not exist)")
    synth.add_argument("--shape", default="llama-2-13b", choices=SHAPES)
    synth.add_argument("--layers", type=int, help="only the first N layers")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--fp16", action="store_true", help="dense fp16 weights instead of 4-bit GPTQ (a source for "
                       "quantize)")
    synth.set_defaults(run=cmd_synth)
    fetch = commands.add_parser("fetch", help="download the default model once (SmolLM2-135M-Instruct, sha256-checked)")
    fetch.add_argument("what", choices=["default"])
    fetch.set_defaults(run=cmd_fetch)
    serve = commands.add_parser("serve", help="the native and OpenAI-compatible HTTP APIs",
                                description="Serve a model over HTTP. Example: llama-ref serve --model default --port 8000")
    serve.add_argument("--model", action="append", help="HF directory, .gguf file, or 'default' (the default); "
                       "NAME=PATH serves PATH as NAME, and several --model serve several models, each batched on "
                       "its own, a request going to the one its 'model' field names")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default="default", help="the name clients ask for (a --model "
                       "given without NAME=)")
    serve.add_argument("--alias", action="append", default=[], help="another name, ALIAS=SERVED_NAME (repeatable)")
    keys = serve.add_mutually_exclusive_group()
    keys.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    keys.add_argument("--api-key-file", help="the same, the key read from this file (so that it does not show in ps)")
    serve.add_argument("--cors-origin", action="append", default=[], help="a browser origin allowed to call the API "
                       "(repeatable); none by default")
    serve.add_argument("--price-per-mtoken", type=float, default=0.0, help="dollars per million tokens (usage cost)")
    serve.add_argument("--max-batch", type=int, default=8,
                       help="sequences decoded together (a request with n choices is n of them)")
    serve.add_argument("--max-queue", type=int, default=8,
                       help="requests waiting for a place in the batch (running ones do not count); the next gets 503")
    serve.add_argument("--kv-cache-gb", type=float, default=None,
                       help="KV cache budget; each request reserves n x (prompt + max_tokens) positions when it "
                            "starts (default: memory left after the weights, less 2 GB)")
    serve.add_argument("--prefix-cache-mb", type=float, default=2048,
                       help="finished requests' caches kept for prompts that start the same way (inside "
                            "--kv-cache-gb; 0 turns prefix reuse off)")
    serve.add_argument("--max-body-bytes", type=int, default=2_000_000, help="larger request bodies get 413")
    add_embedding_arguments(serve)
    serve.add_argument("--shutdown-timeout", type=float, default=30.0, help="on SIGTERM, seconds the requests in "
                       "flight have to finish; no new connection is accepted meanwhile")
    serve.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                       help="one JSON line per request on stderr: id, route, status, tokens, duration; never content")
    scale_out = serve.add_argument_group("scale-out on Ray Serve (pip install 'llama-ref[ray]'; docs/scale-out.md)")
    scale_out.add_argument("--ray", action="store_true", help="serve replicas on Ray Serve behind one endpoint, each "
                     "loading the models itself; requests of one conversation go to the same replica")
    scaling = scale_out.add_mutually_exclusive_group()
    scaling.add_argument("--replicas", type=int, default=1, help="with --ray: this many replicas")
    scaling.add_argument("--autoscale", metavar="MIN:MAX", help="with --ray: between MIN and MAX replicas, by the "
                         "requests each has in flight (target: --max-batch)")
    scale_out.add_argument("--ray-address", help="with --ray: a running cluster ('auto' finds the local one); default: "
                     "start one in this process")
    scale_out.add_argument("--cpus-per-replica", type=float, help="with --ray: CPUs Ray reserves for each replica, and its "
                     "kernel threads (default: this machine's cores / replicas)")
    serve.set_defaults(run=cmd_serve)
    quant = commands.add_parser(
        "quantize", help="GPTQ (or round-to-nearest) 4-bit quantization into a standard GPTQ checkpoint",
        description="Examples:\n  llama-ref quantize default /tmp/smollm2-gptq --group-size 64 --act-order\n"
                    "  llama-ref quantize ./llama-2-7b-hf ./llama-2-7b-gptq --calibration corpus.txt --samples 128",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    quant.add_argument("model", help="source: HF checkpoint directory, .gguf file, or 'default'")
    quant.add_argument("output", help="directory to create (must not exist); written whole or not at all")
    quant.add_argument("--method", default="gptq", choices=["gptq", "rtn"])
    quant.add_argument("--group-size", type=int, default=128, help="inputs per scale; -1 for one group per row")
    quant.add_argument("--act-order", action="store_true", help="quantize inputs by descending Hessian diagonal")
    quant.add_argument("--asym", action="store_true", help="a zero point per group (default: symmetric, zero point 8)")
    quant.add_argument("--damp", type=float, default=0.01, help="dampening, a fraction of mean(diag H)")
    quant.add_argument("--calibration", help="a text file (default: the bundled public-domain prose and verse, llama_ref/data/calibration.txt)")
    quant.add_argument("--samples", type=int, default=128, help="calibration windows")
    quant.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    quant.add_argument("--format", default="gptq", choices=["gptq", "gptq_v2"], help="v1 or v2 zero points")
    quant.set_defaults(run=cmd_quantize)
    ppl = commands.add_parser("perplexity", help="sliding-window perplexity of a model on a text file",
                              description="Example: llama-ref perplexity default --text book.txt --ctx 512 --stride 256")
    ppl.add_argument("model", help="HF checkpoint directory, .gguf file, or 'default'")
    ppl.add_argument("--text", required=True, help="a UTF-8 text file")
    ppl.add_argument("--ctx", type=int, default=512, help="tokens per window")
    ppl.add_argument("--stride", type=int, help="tokens the window advances (default: --ctx, no overlap)")
    ppl.add_argument("--max-tokens", type=int, help="only the first N tokens of the text")
    ppl.set_defaults(run=cmd_perplexity)
    conf = commands.add_parser(
        "conform", help="check an OpenAI-compatible server against the reference semantics (docs/conformance.md)",
        description="Example: llama-ref conform --base-url http://127.0.0.1:8080 --model default --report report.md\n"
                    "The server must serve the same weights as --model, which is loaded here as the oracle.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    conf.add_argument("action", nargs="?", choices=["export"],
                      help="export DIR: write the checks' test vectors (the oracle's answers) to DIR")
    conf.add_argument("directory", nargs="?", help="where export writes vectors.json")
    conf.add_argument("--base-url", help="the server's URL (with or without /v1)")
    conf.add_argument("--vectors", help="a directory written by `conform export`: its answers replace the model")
    conf.add_argument("--seed", type=int, default=1234, help="the first seed of the sampled requests")
    conf.add_argument("--start-peer", choices=["llama-server", "llama-cpp-python"],
                      help="build (once) and start this peer on --model's GGUF instead of --base-url")
    conf.add_argument("--model", default="default", help="the same weights, for the oracle: HF directory, .gguf or 'default'")
    conf.add_argument("--served-model", default="default", help="the model name to send in requests")
    conf.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    conf.add_argument("--dialect", default="openai", choices=["openai", "llama.cpp"],
                      help="parameter spellings: llama.cpp's servers say repeat_penalty")
    conf.add_argument("--checks", help="a comma-separated subset: tokenization,greedy,logprobs,sampling,penalties,"
                                       "stop,streaming,seeds,limits,json_mode")
    conf.add_argument("--samples", type=int, default=200, help="requests per sampling setting")
    conf.add_argument("--tie-margin", type=float, default=0.05,
                      help="nats: a greedy divergence where the oracle's top two are closer is not counted")
    conf.add_argument("--strict", action="store_true", help="divergences that match a documented engine fail too")
    conf.add_argument("--report", help="write the Markdown report here")
    conf.add_argument("--json", help="write the results as JSON here")
    conf.add_argument("--quiet", action="store_true", help="no progress bar")
    conf.set_defaults(run=cmd_conform)
    speed = commands.add_parser(
        "bench", help="decode/prefill speed, load time and peak RSS beside llama.cpp on the same shapes",
        description="Example: llama-ref bench --runs 3  (a 13B-shaped GPTQ and Q4_0 pair, and the default model)")
    speed.add_argument("--runs", type=int, default=3, help="clean runs per engine and case (medians reported)")
    speed.add_argument("--threads", type=int, default=os.cpu_count())
    speed.add_argument("--layers", type=int, help="only the first N layers of the 13B shape (a quick check)")
    speed.add_argument("--json", help="also write the full report to this file")
    speed.set_defaults(run=cmd_bench)
    serving = speed.add_subparsers(dest="what").add_parser(
        "serve", help="many streaming clients against an OpenAI-compatible server (ours or a peer)",
        description="Examples:\n  llama-ref bench serve --start ours --start llama-server --concurrency 8\n"
                    "  llama-ref bench serve --base-url http://127.0.0.1:8000 --served-model default --rate 2\n"
                    "The workload (seeded prompts of 12-384 words, 32-256 output tokens forced with ignore_eos) "
                    "is the same for every server; see docs/benchmarks.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    target = serving.add_mutually_exclusive_group(required=True)
    target.add_argument("--base-url", help="measure the server at this URL")
    target.add_argument("--start", action="append", choices=["ours", "llama-server"],
                        help="start this server on --model, measure it, stop it (repeatable: one after the other)")
    serving.add_argument("--model", default="default", help="what --start serves: a .gguf file (both servers), "
                         "an HF directory (ours) or 'default'")
    serving.add_argument("--served-model", default="default", help="the model name sent with --base-url")
    serving.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    serving.add_argument("--requests", type=int, default=64)
    serving.add_argument("--concurrency", type=int, default=8, help="clients, each sending its next request "
                         "when its last one ends (also the started servers' batch size)")
    serving.add_argument("--rate", type=float, help="Poisson arrivals per second instead of --concurrency clients")
    serving.add_argument("--single", type=int, default=0, help="also run this many requests one at a time, for "
                         "the single-stream speed in the same run")
    serving.add_argument("--seed", type=int, default=0, help="the workload's seed")
    serving.add_argument("--json", help="also write the summaries to this file")
    serving.set_defaults(run=cmd_bench_serve)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    try:
        status = args.run(args)
    except KeyboardInterrupt:
        print("llama-ref: interrupted", file=sys.stderr)
        return 130
    except LlamaRefError as err:
        if args.debug:
            raise
        print(f"llama-ref: error: {err}", file=sys.stderr)
        # A bad model or file is 1; a bad flag or parameter is 2, as argparse's own errors.
        return 1 if isinstance(err, (CheckpointError, ConfigError, TokenizerError, AssetError, InputFileError)) else 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
