"""The audit trace made readable (spec "The audit trace"): a table of what each sampling
stage did to one step's distribution, and the same as a PNG bar chart.

    trace = explain(model, "The capital of France is", SamplingParams(temperature=0.7, top_p=0.9))
    print(format_trace(trace, model.tokenizer))
    plot_trace(trace, "step.png", model.tokenizer)
"""
from pathlib import Path

from .errors import LlamaRefError
from .sampling import SamplingParams, SamplingTrace


def explain(model, prompt, params: SamplingParams, step: int = 0) -> SamplingTrace:
    """The trace of generated token number `step` (0 = the first) of the first response."""
    events = (event for event in model.generate(prompt, params, trace=True) if event.index == 0)
    for number, event in enumerate(events):
        if number == step:
            return event.trace
    raise LlamaRefError(f"step: the response ended before token {step}")


def token_label(token_id: int, tokenizer=None) -> str:
    return f"{token_id} {tokenizer.id_to_piece(token_id)!r}" if tokenizer else str(token_id)


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
