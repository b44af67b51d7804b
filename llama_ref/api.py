"""The public face of the engine: `load_model` and the `Model` it returns (see README,
"Python API"). Everything a caller does with a model goes through here: the forward pass
(nn/transformer.py), generation and chat (decoding/)."""
from dataclasses import replace
from pathlib import Path

import numba
import numpy as np
from threadpoolctl import ThreadpoolController

from .config import ModelConfig
from .decoding.chat import format_chat
from .decoding.generation import Generation
from .decoding.params import MAX_STOP_STRINGS, SamplingParams
from .decoding.tools import parse_tools
from .embedding import Embedding, split_inputs
from .errors import ContextLengthError, LlamaRefError
from .formats.gguf_file import load_gguf
from .formats.hf import load_hf
from .kernels import configure_threads
from .nn.linear import GPTQLinear
from .nn.transformer import Chunk, KVCache, Weights, forward
from .tools.assets import default_model

# rows x hidden size from which a dense model's prefill gives BLAS every core: 128 tokens of a
# 2048-wide model
PARALLEL_BLAS_WORK = 128 * 2048


class TokensError(LlamaRefError, ValueError):
    """Token ids for the forward pass of the wrong shape, or outside the vocabulary."""


class Model:
    """A loaded model: the public face of the engine (see README, "Python API")."""

    def __init__(self, config: ModelConfig, weights: Weights, tokenizer=None, stored_bytes: int = 0):
        self.config = config
        self.weights = weights
        self.tokenizer = tokenizer
        self.stored_bytes = stored_bytes      # the checkpoint's size on disk: what its weights take in memory
        self._threadpools = ThreadpoolController()
        # 4-bit layers multiply on the Numba kernel at every row count (kernels/gptq.py): BLAS
        # then does only attention's small products, and never gets more than one core
        self._blas_prefill = not isinstance(weights.layers[0].w2, GPTQLinear)

    def new_cache(self, max_seq_len: int | None = None) -> KVCache:
        """A KV cache for one sequence of up to max_seq_len tokens (default: the context)."""
        limit = self.config.context_length
        if max_seq_len is not None and not 0 < max_seq_len <= limit:
            raise ContextLengthError(f"max_seq_len={max_seq_len}: must be in 1..{limit} (the model's context)",
                                     "max_seq_len")
        return KVCache(self.config, max_seq_len or limit)

    def generate(self, prompt, params=None, trace: bool = False, compare_profile: str | None = None):
        """Sample a response: iterate the returned Generation for one event per token, or
        call its result() for the whole completion.  prompt: raw text (BOS added when the
        tokenizer asks for it) or token ids, used as they are.  trace=True attaches the
        sampler's audit trace to every event; compare_profile adds to it the same step under
        that profile (SamplingTrace.compared)."""
        return Generation(self, token_ids(self.tokenizer, prompt, "prompt"), params or SamplingParams(), trace,
                          compare_profile=compare_profile)

    def embed(self, inputs, pooling: str = "mean", normalize: bool = True, dimensions: int | None = None) -> np.ndarray:
        """Embedding vectors (len(inputs), dimensions or hidden_size) float32: each input's final
        hidden states pooled by "mean" or "last", L2-normalised when `normalize` (llama_ref/embedding.py).
        inputs: a text, a token-id list, or a list of either; nothing is appended to them."""
        return self.embedding(inputs, pooling, normalize, dimensions).result()

    def embedding(self, inputs, pooling: str = "mean", normalize: bool = True,
                  dimensions: int | None = None) -> Embedding:
        """embed() as an Embedding not yet run, for a decoding.batch.Batch to step (the server's)."""
        return Embedding(self, [token_ids(self.tokenizer, item, "input") for item in split_inputs(inputs)], pooling,
                         normalize, dimensions)

    def chat(self, messages, params=None, chat_format: str | None = None, reject_control_strings: bool = False,
             trace: bool = False, tools=None, tool_choice=None, parallel_tool_calls: bool = True,
             compare_profile: str | None = None):
        """generate() on the prompt decoding/chat.format_chat builds for `messages` ([{"role", "content"}]):
        the model's own template, else its architecture's default format, unless chat_format
        names one. The format's own stop strings (airoboros, chatml) join params.stop, up to
        the limit of 16. tools, tool_choice, parallel_tool_calls: as OpenAI's (decoding/tools.py);
        the calls come as Choice.tool_calls and TokenEvent.tool_calls."""
        if self.tokenizer is None:
            param = "tools" if tools else "messages"
            raise LlamaRefError(f"{param}: this model has no tokenizer to format a chat with", param)
        params = params or SamplingParams()
        use = parse_tools(tools, tool_choice, parallel_tool_calls)
        prompt = format_chat(messages, self.tokenizer, self.config.architecture, chat_format, reject_control_strings,
                             use)
        stops = tuple(dict.fromkeys(params.stop + prompt.stop))[:MAX_STOP_STRINGS]
        return Generation(self, prompt.ids, replace(params, stop=stops), trace, use, compare_profile)

    def forward(self, tokens, start_pos: int, cache: KVCache) -> np.ndarray:
        """Logits (len(tokens), vocab_size) float32 for tokens at positions start_pos.. ."""
        return self.forward_chunks([Chunk(np.asarray(tokens, dtype=np.int64).reshape(-1), start_pos, cache)])[0]

    def forward_batch(self, tokens, start_pos: int, caches: list[KVCache]) -> np.ndarray:
        """Logits (b, n, vocab_size) float32 for b sequences of n tokens each, all at positions
        start_pos.., one cache per sequence."""
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim != 2 or len(caches) != ids.shape[0]:
            raise TokensError(f"tokens: expected (batch, n) ids and one cache per row, got shape {ids.shape} "
                              f"and {len(caches)} caches", "tokens")
        return np.stack(self.forward_chunks([Chunk(row, start_pos, cache) for row, cache in zip(ids, caches)]))

    def forward_chunks(self, chunks: list[Chunk]) -> list[np.ndarray]:
        """What each chunk asks for (Chunk.output: logits of every row, of the last row, or the
        final hidden states) for chunks of different sequences, each at its own positions with
        its own cache, in one pass (nn/transformer.forward)."""
        for chunk in chunks:
            bad = chunk.tokens[(chunk.tokens < 0) | (chunk.tokens >= self.config.vocab_size)]
            if bad.size:
                raise TokensError(f"tokens: id {int(bad[0])} is outside the vocabulary "
                                  f"0..{self.config.vocab_size - 1}", "tokens")
        # The Numba kernels already use every core, and OpenBLAS threads, which keep spinning
        # after each call, would fight them for the same cores: BLAS runs single-threaded,
        # except for a dense model's prefill big enough that BLAS on the widened tiles dominates
        # (measured with 128 tokens and kernels/__init__.py's shorter spin, when 4-bit layers
        # took that path too: 13B shape 2.0 -> 2.3 tokens/s with every core for BLAS, SmolLM2's
        # 576-wide layers 165 -> 85; a 4-bit 13B now 5.5 with one BLAS thread, 5.1 with two).
        rows = sum(len(chunk.tokens) for chunk in chunks)
        big = self._blas_prefill and rows * self.config.hidden_size >= PARALLEL_BLAS_WORK
        with self._threadpools.limit(limits=numba.get_num_threads() if big else 1, user_api="blas"):
            return forward(self.config, self.weights, chunks)


def token_ids(tokenizer, text_or_ids, field: str) -> list[int]:
    """Text tokenized as the tokenizer asks (BOS when it adds one, never EOS); ids as they are."""
    if not isinstance(text_or_ids, str):
        return list(text_or_ids)
    if tokenizer is None:
        raise LlamaRefError(f"{field}: this model has no tokenizer; pass token ids", field)
    return tokenizer.encode(text_or_ids, bos=tokenizer.add_bos, eos=False)


def load_model(path: str | Path) -> Model:
    """Load an HF checkpoint directory (config.json + safetensors, single or sharded, dense or
    GPTQ) with its tokenizer when the directory has one (tokenizer.model or tokenizer.json),
    a .gguf file, or "default" (SmolLM2-135M-Instruct, fetched once; see tools/assets.py)."""
    configure_threads()
    if str(path) == "default":
        path = default_model()
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return Model(*load_gguf(path), stored_bytes=path.stat().st_size)
    return Model(*load_hf(path), stored_bytes=sum(f.stat().st_size for f in path.glob("*.safetensors")))
