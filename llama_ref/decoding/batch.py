"""Many generations stepped together: continuous batching (docs/server.md, "Many users").

A `Batch` holds the generations that are running, and embeddings (llama_ref/embedding.py),
which run like prompts. Each `step()` runs one forward pass of chunks: one token for every
response that is decoding, plus pieces of the prompts and embedding inputs still to run,
and hands each its own chunks' output. They join and leave between steps.

Batching never changes an answer. A row's result depends only on its own chunk:
- the kernels compute each row on its own (the 4-bit kernel at any row count, the dense
  and Q8_0 ones up to kernels.SMALL_BATCH rows), so decode rows share a call; a call with
  more rows would take dense weights to BLAS, whose result for a row can depend on the
  others, so a longer prompt chunk runs alone;
- a prompt is cut into chunks of `PREFILL_CHUNK` tokens counted from where its prefill
  starts, whatever else is running; a step's prefill budget only decides which chunks wait.
`Model.generate` runs its generation through a Batch of its own, so one request alone and
the same request among others compute the same thing.
"""
from ..kernels import SMALL_BATCH
from ..nn.transformer import Chunk

PREFILL_CHUNK = 256     # tokens of one prompt per forward pass
PREFILL_BUDGET = 256    # prompt tokens per step, across generations; at least one chunk always runs


def prefill_chunk(config) -> int | None:
    """Tokens per prefill chunk, or None for the whole prompt at once: with dynamic NTK the
    rotation of a chunk depends on where it ends (nn/rope.py), so a chunked prompt would no
    longer equal transformers' generate past max_position_embeddings."""
    scaling = config.rope_scaling
    return None if scaling is not None and scaling.rope_type == "dynamic" else PREFILL_CHUNK


def calls(chunks: list[Chunk]) -> list[list[Chunk]]:
    """The chunks grouped into forward passes: chunks of up to SMALL_BATCH rows share passes
    of at most SMALL_BATCH rows; a longer chunk gets a pass of its own."""
    groups, small, rows = [], [], 0
    for chunk in chunks:
        n = len(chunk.tokens)
        if n > SMALL_BATCH:
            groups.append([chunk])
            continue
        if rows + n > SMALL_BATCH:
            groups.append(small)
            small, rows = [], 0
        small.append(chunk)
        rows += n
    return groups + ([small] if small else [])


class Batch:
    """The running generations of one model, stepped together."""

    def __init__(self, model, prefill_budget: int = PREFILL_BUDGET):
        self.model = model
        self.chunk_size = prefill_chunk(model.config)
        self.prefill_budget = prefill_budget
        self.generations: list = []

    def add(self, generation) -> None:
        self.generations.append(generation)

    def remove(self, generation) -> None:
        self.generations.remove(generation)

    def step(self) -> dict:
        """One forward pass over the running generations (oldest prefill first within the
        budget). Returns {generation: [TokenEvent, ...]} for those that produced tokens;
        finished generations leave the batch."""
        work, budget = [], self.prefill_budget
        for generation in self.generations:
            if generation.prefilling and budget <= 0:
                continue
            chunks = generation.chunks(self.chunk_size)
            if not chunks:
                continue
            if generation.prefilling:
                budget -= sum(len(chunk.tokens) for chunk in chunks)
            work.append((generation, chunks))
        chunks = [chunk for _, chunks in work for chunk in chunks]
        outputs = {}
        for group in calls(chunks):
            for chunk, rows in zip(group, self.model.forward_chunks(group)):
                outputs[id(chunk)] = rows
        events = {}
        for generation, chunks in work:
            produced = generation.take([outputs[id(chunk)] for chunk in chunks])
            if produced:
                events[generation] = produced
        self.generations = [g for g in self.generations if not g.done]
        return events

