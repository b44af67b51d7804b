"""Time to first token of a 4-turn chat with prefix reuse on and off, in one run.

    python benchmarks/prefix_reuse.py [MODEL] [--system-words 600]

The server (in this process, llama_ref.server.thread) runs the same chat twice: a long
system prompt (`--system-words` words of the bundled public-domain text), four user turns,
each answer (32 tokens, greedy) appended before the next turn, so that each turn re-sends
the whole conversation. Once with the prefix cache (the default) and once with
--prefix-cache-mb 0 (every turn prefilled cold). Printed per turn: prompt tokens, the
positions reused, time to first token of each run and their ratio. The answers of the two
runs must be identical (decoding/prefix.py reuses whole prefill chunks only).
"""
import argparse
import json
import time
from importlib import resources

import httpx

import llama_ref
from llama_ref.server.thread import ThreadServer

TURNS = ("Summarise the passage in one sentence.", "Who speaks first?", "Name one place mentioned.",
         "What happens at the end?")


def chat(served: ThreadServer, system: str) -> list[dict]:
    """The four turns: each one's prompt tokens, reused positions, time to first token, answer."""
    engine = next(iter(served.state.engines.values()))
    messages, turns = [{"role": "system", "content": system}], []
    with httpx.Client(timeout=3600) as http:
        for question in TURNS:
            messages.append({"role": "user", "content": question})
            body = {"model": "default", "messages": messages, "max_tokens": 32, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            reused = engine.prefix.reused_tokens if engine.prefix else 0
            started, first, text, usage = time.perf_counter(), None, [], None
            with http.stream("POST", f"{served.url}/v1/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
                    for choice in chunk["choices"]:
                        if choice["delta"].get("content"):
                            first = first or time.perf_counter() - started
                            text.append(choice["delta"]["content"])
            answer = "".join(text)
            turns.append({"prompt_tokens": usage["prompt_tokens"], "ttft_s": first,
                          "reused": (engine.prefix.reused_tokens if engine.prefix else 0) - reused, "answer": answer})
            messages.append({"role": "assistant", "content": answer})
    return turns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="default")
    parser.add_argument("--system-words", type=int, default=600)
    args = parser.parse_args()
    words = resources.files("llama_ref").joinpath("data/calibration.txt").read_text().split()
    system = " ".join(words[1000:1000 + args.system_words])
    model = llama_ref.load_model(args.model)
    runs = {}
    for name, megabytes in (("warm", 2048), ("cold", 0)):
        served = ThreadServer(model, "default", prefix_cache_mb=megabytes)
        try:
            chat(served, "Warm up.")          # compiles and pages in, outside the measurement
            runs[name] = chat(served, system)
        finally:
            served.stop()
    print("| turn | prompt tokens | reused | TTFT warm s | TTFT cold s | warm / cold |")
    print("|---|---|---|---|---|---|")
    for i, (warm, cold) in enumerate(zip(runs["warm"], runs["cold"]), 1):
        print(f"| {i} | {warm['prompt_tokens']} | {warm['reused']} | {warm['ttft_s']:.2f} | {cold['ttft_s']:.2f} | "
              f"{warm['ttft_s'] / cold['ttft_s']:.2f} |")
    same = [w["answer"] for w in runs["warm"]] == [c["answer"] for c in runs["cold"]]
    print(f"answers identical with and without reuse: {same}")


if __name__ == "__main__":
    main()
