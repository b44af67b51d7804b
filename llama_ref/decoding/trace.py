"""The audit trace (docs/spec/sampling.md, "The audit trace"): what each sampling stage did
to one step's distribution, recorded by the sampler, and made readable as a table, as a
PNG bar chart, and as the JSON that the playground page draws (`explanation`, the body of
POST /v1/explain and of `llama-ref explain --html`).

    trace = explain(model, "The capital of France is", SamplingParams(temperature=0.7, top_p=0.9))
    print(format_trace(trace, model.tokenizer))
    plot_trace(trace, "step.png", model.tokenizer)
"""
import json
from dataclasses import asdict, dataclass
from importlib.resources import files
from itertools import groupby, islice
from pathlib import Path

import numpy as np

from ..errors import LlamaRefError
from ..nn.ops import softmax
from .params import SamplingParams

TRACE_CANDIDATES = 10           # ids shown per stage


@dataclass(frozen=True)
class StageRecord:
    stage: str                      # "logits" for the input, then each stage's name
    setting: str                    # e.g. "temperature=0.7"
    active: bool                    # False when the parameter is neutral (an exact no-op)
    survivors: int                  # ids with a finite logit after this stage
    logits: tuple[float, ...]       # of SamplingTrace.candidates, after this stage
    probs: tuple[float, ...]        # softmax after this stage, same ids


@dataclass(frozen=True)
class SamplingTrace:
    """What each stage did to the distribution of one step (spec "The audit trace")."""
    profile: str
    seed: int | None
    choice: int
    candidates: tuple[int, ...]     # the ids followed through the stages
    stages: tuple[StageRecord, ...]
    uniform: float | None           # the draw u (None when greedy)
    token_id: int
    interval: tuple[float, float] | None   # the chosen id's share of [0, 1) in the draw (ids ascending): u falls in it
    compared: "SamplingTrace | None" = None   # the same step under another profile (Sampler's compare_profile)

    def to_dict(self) -> dict:
        """Plain JSON-serialisable data (-inf logits become None)."""
        data = asdict(self)
        data["stages"] = [{**stage, "logits": [v if np.isfinite(v) else None for v in stage["logits"]]}
                          for stage in data["stages"]]
        data["compared"] = self.compared.to_dict() if self.compared else None
        return data


def trace_of(profile: str, seed: int | None, choice: int, steps, uniform: float | None, token: int) -> SamplingTrace:
    """The trace of one sampling step. steps: [(Stage or None for the raw logits, logits
    after it)]. Follows the raw top ids, the final top ids and the chosen id through every stage."""
    first, last = steps[0][1], steps[-1][1]
    finals = np.argsort(-last, kind="stable")[:TRACE_CANDIDATES]
    ranked = list(np.argsort(-first, kind="stable")[:TRACE_CANDIDATES]) + list(finals[np.isfinite(last[finals])]) + [token]
    final_probs = softmax(last)
    ids = sorted(dict.fromkeys(int(i) for i in ranked), key=lambda i: (-final_probs[i], -first[i], i))
    records = tuple(StageRecord("logits" if stage is None else stage.name, "logits" if stage is None else stage.setting,
                                stage is None or stage.active, int(np.isfinite(z).sum()),
                                tuple(float(v) for v in z[ids]), tuple(float(v) for v in softmax(z)[ids]))
                    for stage, z in steps)
    cdf = np.cumsum(final_probs)
    interval = None if uniform is None else (float(cdf[token] - final_probs[token]), float(cdf[token]))
    return SamplingTrace(profile, seed, choice, tuple(ids), records, uniform, token, interval)


def explain(model, prompt, params: SamplingParams, step: int = 0) -> SamplingTrace:
    """The trace of generated token number `step` (0 = the first) of the first response."""
    events = (event for event in model.generate(prompt, params, trace=True) if event.index == 0)
    return step_trace(list(islice(events, step + 1)), step)


def step_trace(events, step: int) -> SamplingTrace:
    """The trace of events[step], the TokenEvents of one response run with trace=True."""
    if not 0 <= step < len(events):
        raise LlamaRefError(f"step: the response ended before token {step}", "step")
    return events[step].trace


def explanation(generation, events, tokenizer=None) -> dict:
    """Every step of one traced response as plain JSON: the body of POST /v1/explain and the
    data of the --html page. generation: run with trace=True and n = 1; events: its TokenEvents."""
    events = list(events)
    return {"profile": generation.params.profile, "compare_profile": generation.compare_profile,
            "seed": generation.seed, "prompt_tokens": len(generation.prompt_ids),
            "prompt": prompt_text(generation.prompt_ids, tokenizer) if tokenizer else None,
            "text": "".join(event.delta for event in events),
            "finish_reason": events[-1].finish_reason if events else "length",
            "steps": [{"token_id": event.token_id, "token": display_token(event.token_id, tokenizer),
                       "delta": event.delta, "trace": trace_json(event.trace, tokenizer)} for event in events]}


def prompt_text(token_ids, tokenizer) -> str:
    """The prompt as text with its special tokens written as their pieces ("<|im_start|>"),
    which decode() leaves out: a chat prompt shows its format."""
    runs = [(special, [i for _, i in run]) for special, run in
            groupby(((tokenizer.is_special(i), i) for i in token_ids), key=lambda pair: pair[0])]
    return "".join("".join(tokenizer.id_to_piece(i) for i in ids) if special else tokenizer.decode(ids)
                   for special, ids in runs)


def playground_page(data: dict | None = None) -> str:
    """The playground (docs/playground.md): with data (an `explanation`), the static page of
    one generation, its controls hidden; without, the live page that asks POST /v1/explain."""
    page = files("llama_ref").joinpath("data", "playground.html").read_text(encoding="utf-8")
    if data is None:
        return page
    # "</" escaped: the JSON sits inside a <script> element, which any "</script>" in a token would end.
    script = "<script>window.EXPLANATION = " + json.dumps(data).replace("</", "<\\/") + ";</script>"
    return page.replace("<!-- explanation -->", script, 1)


def trace_json(trace: SamplingTrace, tokenizer=None) -> dict:
    """trace.to_dict() with what a person reads: each candidate's label and the chosen one's."""
    return {**trace.to_dict(), "labels": [display_token(i, tokenizer) for i in trace.candidates],
            "chosen": display_token(trace.token_id, tokenizer),
            "compared": trace_json(trace.compared, tokenizer) if trace.compared else None}


# Whitespace made visible; other control characters and bytes that are not whole UTF-8 are
# shown as <0xNN>, as SentencePiece names its byte pieces.
VISIBLE = {" ": "␣", "\n": "\\n", "\t": "\\t"}


def display_token(token_id: int, tokenizer=None) -> str:
    """A token as a person reads it: its text with spaces as ␣ and newlines as \\n, bytes that
    are not a whole UTF-8 character as <0xE2>, a special token as its piece ("</s>"). The
    byte-level piece "ĠParis" reads " Paris", shown "␣Paris"."""
    if tokenizer is None:
        return str(token_id)
    raw = b"" if tokenizer.is_special(token_id) else tokenizer.token_bytes(token_id)
    if not raw:
        return tokenizer.id_to_piece(token_id)
    return "".join(VISIBLE.get(c) or (c if c.isprintable() else
                                      "".join(f"<0x{b:02X}>" for b in c.encode("utf-8", "surrogateescape")))
                   for c in raw.decode("utf-8", "surrogateescape"))


def token_label(token_id: int, tokenizer=None) -> str:
    return f"{token_id} {display_token(token_id, tokenizer)}" if tokenizer else str(token_id)


def format_trace(trace: SamplingTrace, tokenizer=None) -> str:
    """Rows: the candidate ids; columns: each non-neutral stage, with the probability after it
    ("-" once removed); the chosen id is marked with *."""
    stages = [s for s in trace.stages if s.active]
    labels = [token_label(i, tokenizer) for i in trace.candidates]
    first = max(len("survivors"), *(len(label) + 2 for label in labels))
    widths = [max(10, len(s.setting)) for s in stages]
    draw = "greedy (argmax)" if trace.uniform is None else f"u = {trace.uniform:.6f}, seed {trace.seed} + {trace.choice}"
    lines = [f"profile {trace.profile} · {draw} · chosen {token_label(trace.token_id, tokenizer)}",
             " " * first + " " + " ".join(s.setting.rjust(w) for s, w in zip(stages, widths)),
             "survivors".ljust(first) + " " + " ".join(str(s.survivors).rjust(w) for s, w in zip(stages, widths))]
    for row, (token_id, label) in enumerate(zip(trace.candidates, labels)):
        mark = "* " if token_id == trace.token_id else "  "
        cells = [("-" if s.probs[row] == 0 and s.logits[row] == float("-inf") else f"{s.probs[row]:.4f}").rjust(w)
                 for s, w in zip(stages, widths)]
        lines.append((mark + label).ljust(first) + " " + " ".join(cells))
    return "\n".join(lines)


def plot_trace(trace: SamplingTrace, path, tokenizer=None) -> Path:
    """Grouped bars: each candidate's probability after each non-neutral stage."""
    # Imported here: matplotlib takes longer to import than most commands take to run.
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in trace.stages if s.active]
    width = 0.8 / len(stages)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.7 * len(trace.candidates)), 4.0))
    for k, stage in enumerate(stages):
        axes.bar([i + k * width for i in range(len(trace.candidates))], stage.probs, width,
                 label=f"{stage.setting} ({stage.survivors} left)")
    axes.set_xticks([i + 0.4 - width / 2 for i in range(len(trace.candidates))],
                    [token_label(i, tokenizer) for i in trace.candidates], rotation=45, ha="right")
    axes.set_ylabel("probability")
    axes.set_title(f"sampling stages, profile {trace.profile}; chosen {token_label(trace.token_id, tokenizer)}")
    axes.legend(fontsize="small")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, format="png")
    plt.close(figure)
    return path
