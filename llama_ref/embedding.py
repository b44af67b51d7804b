"""Embeddings: each input's final hidden states, pooled (docs/server.md, "Embeddings").

An input's hidden states are the last norm's output, the vectors the output layer reads
(transformers' `last_hidden_state`). Pooling makes one vector of them:
- "mean": their average over the input's tokens;
- "last": the last token's, the only position of a causal model that has seen the whole
  input. (There is no "cls": a causal model's first position sees only itself.)
Then, when normalising, the vector is divided by its L2 norm, and `dimensions` cuts it
short (normalised again) or pads it with zeros.

An `Embedding` runs like a generation's prompt: it hands a decoding.batch.Batch the chunks
it needs next and takes their hidden states, so a server interleaves it with the requests
that are decoding, within the same prefill budget. Inputs are cut into chunks at the same
positions (multiples of PREFILL_CHUNK) however they are batched, and the Batch's grouping
keeps each row's arithmetic independent of the others, so batching never changes a vector.
"""
import numpy as np

from .decoding.batch import PREFILL_CHUNK, Batch
from .errors import ContextLengthError, LlamaRefError
from .nn.transformer import Chunk

POOLINGS = ("mean", "last")
MAX_INPUTS = 2048        # OpenAI's limit on the inputs of one request
MIN_DIMENSIONS = 32      # the provider's lower bound for `dimensions`
MAX_DIMENSIONS = 65536   # padding is free, but not unbounded: dimensions=10**12 would allocate terabytes


class EmbeddingError(LlamaRefError, ValueError):
    """An embedding request that breaks a rule: an empty input, a pooling we do not have..."""


def mean_pooling(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    """The average hidden state of each input: the sum of its rows over its number of tokens.
    total (m, hidden) float64, count (m,) -> (m, hidden)."""
    return total / count[:, None]


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Each row divided by its Euclidean norm (a zero row stays zero).  (m, d) -> (m, d)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


def fit_dimensions(vectors: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """The vectors cut to `dimensions` (then normalised again, when normalising: Matryoshka
    style, which only a model trained for it survives well), or padded with zeros to it, as
    the provider's API defines `dimensions`.  (m, hidden) -> (m, dimensions)."""
    hidden = vectors.shape[1]
    if dimensions is None or dimensions == hidden:
        return vectors
    if dimensions < hidden:
        cut = vectors[:, :dimensions]
        return l2_normalize(cut) if normalize else cut
    return np.pad(vectors, ((0, 0), (0, dimensions - hidden)))


class Embedding:
    """The pooled vectors of several inputs (token-id lists), computed chunk by chunk by a
    decoding.batch.Batch: the server's, or one of its own in result()."""
    sequences = 0   # it decodes nothing, so it holds none of the batch's --max-batch places

    def __init__(self, model, inputs: list[list[int]], pooling: str = "mean", normalize: bool = True,
                 dimensions: int | None = None):
        check_inputs(inputs, model.config)
        if pooling not in POOLINGS:
            raise EmbeddingError(f"pooling: {pooling!r} is not one of {', '.join(POOLINGS)}", "pooling")
        if dimensions is not None and not MIN_DIMENSIONS <= dimensions <= MAX_DIMENSIONS:
            raise EmbeddingError(f"dimensions: {dimensions} is outside {MIN_DIMENSIONS}..{MAX_DIMENSIONS}", "dimensions")
        self.model = model
        self.inputs = [[int(i) for i in ids] for ids in inputs]
        self.pooling, self.normalize, self.dimensions = pooling, normalize, dimensions
        hidden = model.config.hidden_size
        self.totals = np.zeros((len(inputs), hidden), np.float64)   # each input's hidden states, summed
        self.lasts = np.zeros((len(inputs), hidden), np.float32)    # each input's last hidden state
        self.next_input, self.position = 0, 0   # the first input not yet run through, and how far it is
        self.cache = None                       # that input's KV cache while it is part-way
        self.cancelled = False
        self._running: list[tuple[int, Chunk]] = []

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.inputs)

    @property
    def kv_positions(self) -> int:
        """KV positions it holds at most at once: a step takes chunks in input order within one
        chunk's worth of rows, and an input longer than that ends every step it is in, so at
        most one long input is part-way while the short ones of a step start and finish."""
        return min(self.prompt_tokens, max(len(ids) for ids in self.inputs) + PREFILL_CHUNK)

    kv_field = "input"

    @property
    def kv_reason(self) -> str:
        return f"{len(self.inputs)} input(s), the longest {max(len(ids) for ids in self.inputs)} tokens,"

    @property
    def done(self) -> bool:
        return self.cancelled or self.next_input == len(self.inputs)

    @property
    def prefilling(self) -> bool:
        """Its chunks count against a step's prefill budget, as a prompt's do."""
        return not self.done

    def chunks(self, chunk_size: int | None) -> list[Chunk]:
        """The next pieces of the inputs, in order, up to chunk_size rows in all (at least one
        piece): each input cut at multiples of chunk_size (whole when None, as prompts are
        with dynamic NTK), and a cut input's next piece waiting for the next pass."""
        self._running = []
        size = chunk_size or self.model.config.context_length
        budget, rows = chunk_size or PREFILL_CHUNK, 0
        index, start = self.next_input, self.position
        while not self.done and index < len(self.inputs):
            ids = self.inputs[index]
            stop = min(len(ids), start + size)
            if self._running and rows + stop - start > budget:
                break
            cache = self.cache if start else self.model.new_cache(len(ids))
            self._running.append((index, Chunk(np.asarray(ids[start:stop], np.int64), start, cache, "hidden")))
            rows += stop - start
            if stop < len(ids):
                break
            index, start = index + 1, 0
        return [chunk for _, chunk in self._running]

    def take(self, hidden: list[np.ndarray]) -> list:
        """The hidden states (n, hidden) of the chunks just run, one array per chunk. Returns no
        events: the vectors are read with result() once it is done."""
        for (index, chunk), rows in zip(self._running, hidden):
            self.totals[index] += rows.sum(axis=0, dtype=np.float64)
            self.lasts[index] = rows[-1]
            end = chunk.start_pos + len(chunk.tokens)
            if end < len(self.inputs[index]):
                self.next_input, self.position, self.cache = index, end, chunk.cache
            else:
                self.next_input, self.position, self.cache = index + 1, 0, None
        self._running = []
        return []

    def result(self) -> np.ndarray:
        """The vectors, (len(inputs), dimensions or hidden) float32, running what is left."""
        if not self.done:
            batch = Batch(self.model)
            batch.add(self)
            while not self.done:
                batch.step()
        if self.cancelled:
            raise EmbeddingError("input: the embedding was cancelled before it finished", "input")
        counts = np.array([len(ids) for ids in self.inputs], np.float64)
        pooled = mean_pooling(self.totals, counts) if self.pooling == "mean" else self.lasts
        vectors = l2_normalize(pooled.astype(np.float64)) if self.normalize else pooled
        return fit_dimensions(vectors, self.dimensions, self.normalize).astype(np.float32)


def split_inputs(inputs) -> list:
    """A text, a token-id list, or a list of either, as the list of inputs it is. An empty
    text is refused here: tokenized, it would be just BOS."""
    one = isinstance(inputs, str) or (len(inputs) > 0 and all(isinstance(i, (int, np.integer)) for i in inputs))
    inputs = [inputs] if one else list(inputs)
    for i, item in enumerate(inputs):
        if isinstance(item, str) and not item:
            raise EmbeddingError(f"{'input' if one else f'input[{i}]'}: an empty string has nothing to embed", "input")
    return inputs


def check_inputs(inputs: list[list[int]], config) -> None:
    """Each rule an input list must keep, naming the input that breaks it."""
    if not inputs:
        raise EmbeddingError("input: at least one input is needed", "input")
    if len(inputs) > MAX_INPUTS:
        raise EmbeddingError(f"input: {len(inputs)} inputs; at most {MAX_INPUTS} per request", "input")
    for i, ids in enumerate(inputs):
        where = "input" if len(inputs) == 1 else f"input[{i}]"
        if len(ids) == 0:
            raise EmbeddingError(f"{where}: an input must hold at least one token", "input")
        if len(ids) > config.context_length:
            raise ContextLengthError(f"{where}: {len(ids)} tokens do not fit in the model's context of "
                                     f"{config.context_length} tokens", "input")
        bad = [t for t in ids if not 0 <= t < config.vocab_size]
        if bad:
            raise EmbeddingError(f"{where}: id {bad[0]} is outside the vocabulary 0..{config.vocab_size - 1}", "input")
