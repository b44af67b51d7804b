"""`llama-ref bench serve`: many streaming clients against any OpenAI-compatible server, as
vLLM's `bench serve` and llama.cpp's server bench measure one (docs/benchmarks.md).

The workload is the same for every server: `requests` prompts cut from the bundled
public-domain text (llama_ref/data/calibration.txt) at seeded places, of 12 to 384 words
(about 16 to 512 tokens with a Llama or SmolLM2 tokenizer; the report gives the mean the
server counted), each asking for 32 to 256 tokens, forced with `max_tokens` and
`ignore_eos` (the extension vLLM, llama.cpp and this server share), greedy, streamed. Clients
arrive either as `concurrency` loops, each sending its next request when the last ends, or
at a Poisson `rate` per second.

Per request: time to first token (the first chunk with text), the gaps between later chunks
with text (inter-token latency; a chunk is a token on the servers measured here), end to end.
Reported: request and output-token throughput over the whole run, and the 50th, 90th and
99th percentiles of each latency, with the failures.
"""
import asyncio
import json
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

import httpx
import numpy as np

from ..errors import LlamaRefError

PROMPT_WORDS = (12, 384)
OUTPUT_TOKENS = (32, 256)
PERCENTILES = (50, 90, 99)
SLOT_CONTEXT = 1024     # positions per sequence a started llama-server gets: the longest prompt and output fit


class ServeBenchError(LlamaRefError):
    """The target cannot be measured (it does not answer, or every request failed)."""


@dataclass(frozen=True)
class Workload:
    requests: int = 64
    concurrency: int | None = 8       # clients in a closed loop, or None with a rate
    rate: float | None = None         # Poisson arrivals per second (open loop)
    seed: int = 0
    prompt_words: tuple[int, int] = PROMPT_WORDS
    output_tokens: tuple[int, int] = OUTPUT_TOKENS


@dataclass(frozen=True)
class Request:
    prompt: str
    max_tokens: int


@dataclass
class Sample:
    """What one request measured; `error` set when it failed."""
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    e2e: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    error: str | None = None


def workload_requests(workload: Workload) -> list[Request]:
    """The seeded mix: the same prompts and lengths for every server."""
    words = resources.files("llama_ref").joinpath("data/calibration.txt").read_text().split()
    rng = random.Random(workload.seed)
    mix = []
    for _ in range(workload.requests):
        length = rng.randint(*workload.prompt_words)
        start = rng.randrange(len(words) - length)
        mix.append(Request(" ".join(words[start:start + length]), rng.randint(*workload.output_tokens)))
    return mix


async def measure(http: httpx.AsyncClient, url: str, model: str, request: Request) -> Sample:
    """One streamed completion, timed chunk by chunk."""
    body = {"model": model, "prompt": request.prompt, "max_tokens": request.max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    sample, started, last, counted = Sample(), time.perf_counter(), None, None
    try:
        async with http.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                sample.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return sample
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    sample.prompt_tokens = chunk["usage"].get("prompt_tokens")
                    counted = chunk["usage"].get("completion_tokens")
                if not any(choice.get("text") for choice in chunk.get("choices", [])):
                    continue
                now = time.perf_counter()
                if last is None:
                    sample.ttft = now - started
                else:
                    sample.gaps.append(now - last)
                last = now
                sample.output_tokens += 1
        sample.e2e = time.perf_counter() - started
        sample.output_tokens = counted or sample.output_tokens      # the server's count when it gives one
        if sample.ttft is None:
            sample.error = "no token came back"
    except httpx.HTTPError as err:
        sample.error = f"{type(err).__name__}: {err}"
    return sample


async def run_workload(base_url: str, model: str, workload: Workload, api_key: str | None = None,
                       progress=None) -> tuple[list[Sample], float]:
    """Every request of the mix against base_url; returns the samples and the wall time."""
    mix = workload_requests(workload)
    url = base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    samples: list[Sample | None] = [None] * len(mix)
    # a fresh connection per request: a kept-alive one that the server has closed meanwhile
    # would fail the next request through no fault of the server's
    limits = httpx.Limits(max_connections=len(mix), max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600, connect=30), headers=headers, limits=limits) as http:
        async def one(i):
            samples[i] = await measure(http, url, model, mix[i])
            if progress:
                progress()
        started = time.perf_counter()
        if workload.rate is None:
            queue = iter(range(len(mix)))

            async def client():
                for i in queue:
                    await one(i)
            await asyncio.gather(*(client() for _ in range(workload.concurrency)))
        else:
            rng, tasks = np.random.default_rng(workload.seed), []
            for i in range(len(mix)):
                tasks.append(asyncio.create_task(one(i)))
                await asyncio.sleep(rng.exponential(1 / workload.rate))
            await asyncio.gather(*tasks)
        return samples, time.perf_counter() - started


def percentiles(values: list[float]) -> dict:
    """p50, p90, p99 in milliseconds (None without values)."""
    if not values:
        return {f"p{p}": None for p in PERCENTILES}
    return {f"p{p}": float(np.percentile(values, p)) * 1000 for p in PERCENTILES}


def summarize(samples: list[Sample], wall: float, workload: Workload) -> dict:
    ok = [s for s in samples if s.error is None]
    if not ok:
        raise ServeBenchError(f"every request failed; the first: {samples[0].error}")
    output = sum(s.output_tokens for s in ok)
    prompts = [s.prompt_tokens for s in ok if s.prompt_tokens is not None]
    return {"workload": asdict(workload), "requests": len(samples), "failed": len(samples) - len(ok),
            "errors": sorted({s.error for s in samples if s.error})[:5], "duration_s": wall,
            "request_throughput": len(ok) / wall, "output_tokens_per_s": output / wall, "output_tokens": output,
            "mean_prompt_tokens": float(np.mean(prompts)) if prompts else None,
            "ttft_ms": percentiles([s.ttft for s in ok]),
            "itl_ms": percentiles([gap for s in ok for gap in s.gaps]),
            "e2e_ms": percentiles([s.e2e for s in ok])}


def serve_bench(base_url: str, model: str, workload: Workload, api_key: str | None = None,
                progress: bool = False) -> dict:
    from tqdm import tqdm
    with tqdm(total=workload.requests, unit="req", disable=not progress, desc="bench serve") as bar:
        samples, wall = asyncio.run(run_workload(base_url, model, workload, api_key, lambda: bar.update(1)))
    return summarize(samples, wall, workload)


def format_summary(name: str, summary: dict) -> str:
    def row(label, values):
        return f"| {label} | " + " | ".join("-" if v is None else f"{v:.0f}" for v in values.values()) + " |"
    arrival = (f"{summary['workload']['concurrency']} concurrent clients" if summary["workload"]["rate"] is None
               else f"Poisson arrivals at {summary['workload']['rate']}/s")
    return "\n".join([
        f"{name}: {summary['requests']} requests ({arrival}), {summary['failed']} failed, "
        f"{summary['duration_s']:.1f} s; mean prompt {summary['mean_prompt_tokens'] or 0:.0f} tokens",
        f"  request throughput {summary['request_throughput']:.3f}/s, "
        f"output {summary['output_tokens_per_s']:.2f} tokens/s ({summary['output_tokens']} tokens)",
        "", "| ms | p50 | p90 | p99 |", "|---|---|---|---|",
        row("time to first token", summary["ttft_ms"]), row("inter-token latency", summary["itl_ms"]),
        row("end to end", summary["e2e_ms"]),
        *(f"  error: {error}" for error in summary["errors"])])


@contextmanager
def serving(target: str, model: str, served_model: str, parallel: int, requests: int):
    """(base URL, model name) of `target`: a URL as given, or "ours" / "llama-server" started
    on `model` with `parallel` sequences at once, stopped afterwards."""
    if target.startswith("http"):
        yield target, served_model
        return
    from ..conform import peers
    from .assets import default_model
    path = default_model() if model == "default" else Path(model)
    if target == "ours":
        port = peers.free_port()
        argv = [sys.executable, "-m", "llama_ref.cli", "serve", "--model", str(path), "--port", str(port),
                "--max-batch", str(parallel), "--max-queue", str(requests)]
        process, url = peers.launch("ours", argv, port)
    else:
        if path.suffix != ".gguf":
            raise ServeBenchError(f"--model {model}: llama-server serves a .gguf file")
        process, url, _ = peers.start("llama-server", path, SLOT_CONTEXT, parallel=parallel)
    try:
        yield url, "default"
    finally:
        process.terminate()
        process.wait(timeout=60)


def warm_up(url: str, model: str, api_key: str | None) -> None:
    """One short request first: compiling, loading caches and paging in the weights are not measured."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"model": model, "prompt": "Hello", "max_tokens": 4, "ignore_eos": True, "temperature": 0}
    response = httpx.post(url.rstrip("/") + "/v1/completions", json=body, headers=headers, timeout=600)
    if response.status_code != 200:
        raise ServeBenchError(f"{url}: the warm-up request got HTTP {response.status_code}: {response.text[:200]}")


def compare(targets: list[str], model: str, served_model: str, workload: Workload, single: int,
            api_key: str | None = None, log=print) -> dict:
    """The workload against each target in turn (never two at once: they would share the
    cores); with `single`, also that many requests one at a time. {target: summary}."""
    summaries = {}
    for target in targets:
        with serving(target, model, served_model, workload.concurrency or 8, workload.requests) as (url, name):
            log(f"{target}: {url}")
            warm_up(url, name, api_key)
            summary = serve_bench(url, name, workload, api_key, progress=True)
            if single:
                alone = replace(workload, requests=single, concurrency=1, rate=None, seed=workload.seed + 1)
                summary["single_stream"] = serve_bench(url, name, alone, api_key, progress=True)
        summaries[target] = summary
    return summaries


def format_comparison(summaries: dict) -> str:
    """Each target's summary, then the first target's ratios to each other one."""
    parts = [format_summary(name, summary) for name, summary in summaries.items()]
    for name, summary in summaries.items():
        if "single_stream" in summary:
            single = summary["single_stream"]["output_tokens_per_s"]
            parts.append(f"{name}: single stream {single:.2f} output tokens/s; batched / single "
                         f"{summary['output_tokens_per_s'] / single:.2f}x")
    first, *others = summaries
    for other in others:
        ours, theirs = summaries[first], summaries[other]
        ratios = [f"output tokens/s {ours['output_tokens_per_s'] / theirs['output_tokens_per_s']:.2f}x",
                  f"p50 time to first token {ours['ttft_ms']['p50'] / theirs['ttft_ms']['p50']:.2f}x"]
        if "single_stream" in ours and "single_stream" in theirs:
            ratios.append("single-stream output tokens/s "
                          f"{ours['single_stream']['output_tokens_per_s'] / theirs['single_stream']['output_tokens_per_s']:.2f}x")
        parts.append(f"{first} / {other}: " + ", ".join(ratios))
    return "\n\n".join(parts)
