"""The oracle: the same weights as the server under test, run locally by llama-ref, and what
the reference semantics (docs/spec/sampling.md) and each profile say about them.

Every question takes and every answer is plain JSON data (ids, numbers, texts, and sampling
parameters as a dict), never an array over the vocabulary, so that a run's questions and
answers can be written down as test vectors and answered again without the model
(vectors.py).
"""
from dataclasses import replace
from functools import cached_property, lru_cache

import numpy as np

from ..decoding.chat import format_chat
from ..decoding.params import SamplingParams
from ..decoding.sampling import Sampler, pipeline
from ..nn.ops import log_softmax, softmax
from ..tokenizer import IncrementalDetokenizer

HEAD = 256   # the likeliest ids a distribution with a wider support is described by


def params_of(sampling: dict, profile: str = "reference") -> SamplingParams:
    """SamplingParams of the parameters a request sends (its seed aside)."""
    return SamplingParams(**{k: v for k, v in sampling.items() if k != "seed"}, profile=profile)


class Oracle:
    def __init__(self, model):
        if model.tokenizer is None:
            raise ValueError("model: the oracle needs the model's tokenizer (an HF directory with one, or a GGUF)")
        self.model = model
        self.tokenizer = model.tokenizer
        self.eos_ids = set(model.config.eos_token_ids) | {self.tokenizer.eos_id}

    # The prompt

    def completion_ids(self, prompt: str) -> list[int]:
        """A raw completion prompt as the reference tokenizes it (BOS when the tokenizer adds one)."""
        return self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos, eos=False)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return list(format_chat(messages, self.tokenizer, self.model.config.architecture).ids)

    def context_length(self) -> int:
        return self.model.config.context_length

    def special_pieces(self) -> list[str]:
        """The texts of the control tokens ("</s>", "<|im_end|>"): never content."""
        return sorted(p for p in self.tokenizer.special_pieces if p)

    # Distributions of the next token

    def _logits(self, ids: tuple[int, ...]) -> np.ndarray:
        """(len(ids), vocab) float64: row t is the distribution after ids[:t + 1]."""
        return self.model.forward(list(ids), 0, self.model.new_cache(len(ids))).astype(np.float64)

    @lru_cache(maxsize=256)
    def _next(self, ids: tuple[int, ...]) -> np.ndarray:
        """(vocab,) float64 logits of the token after ids."""
        return self._logits(ids)[-1]

    def _processed(self, ids: list[int], params: SamplingParams, prompt_len: int, row=None) -> np.ndarray:
        """The logits of the token after `ids` (`row`, or computed) once params.profile's
        pipeline has run (penalties; filters too when sampling): -inf for removed ids.
        ids[prompt_len:] count as generated."""
        sampler = Sampler(replace(params, seed=0, n=1), ids[:prompt_len], self.model.config.vocab_size)
        for token in ids[prompt_len:]:
            sampler.accept(token)
        penalties, filters = pipeline(params, sampler)
        z = self._next(tuple(ids)) if row is None else row
        for stage in penalties + ([] if params.greedy else filters):
            z = stage.apply(z)
        return z

    def _row(self, ids: list[int], server_head: list | None) -> np.ndarray | None:
        """The raw next-token log-probabilities with the server's own ([[id, logprob]]) in
        place of the oracle's, so that what follows from them is the server's arithmetic;
        None (the oracle's row) without a head."""
        if not server_head:
            return None
        row = log_softmax(self._next(tuple(ids)))
        head_ids, head_logprobs = zip(*server_head)
        row[list(head_ids)] = head_logprobs
        return row

    def distribution(self, ids: list[int], sampling: dict, profile: str = "reference",
                     server_head: list | None = None) -> dict:
        """The distribution the next token is drawn from: {"ids", "probs"} of its support,
        likeliest first, cut to the HEAD likeliest ("rest": the mass left out). With
        `server_head`, the server's log-probabilities of its likeliest ids replace the oracle's."""
        probs = softmax(self._processed(ids, params_of(sampling, profile), len(ids), self._row(ids, server_head)))
        support = np.flatnonzero(probs > 0)
        order = support[np.lexsort((support, -probs[support]))][:HEAD]
        return {"ids": order.tolist(), "probs": probs[order].tolist(),
                "support": int(support.size), "rest": float(max(0.0, 1.0 - probs[order].sum()))}

    def head(self, ids: list[int], temperature: float, count: int, server_head: list | None = None) -> list[float]:
        """The `count` largest log-probabilities of logits / temperature, descending (with the
        server's own for its likeliest ids, as in distribution)."""
        row = self._row(ids, server_head)
        z = (self._next(tuple(ids)) if row is None else row) / temperature
        return np.sort(z - np.logaddexp.reduce(z))[::-1][:count].tolist()

    def top_logprobs(self, ids: list[int], count: int) -> list[list]:
        """[[id, raw log-probability]] of the `count` likeliest next tokens."""
        logprobs = log_softmax(self._next(tuple(ids)))
        best = np.argsort(-logprobs, kind="stable")[:count]
        return [[int(i), float(logprobs[i])] for i in best]

    def token_ids(self, texts: list[str]) -> list[int | None]:
        """The id of each token as OpenAI's completions logprobs show it (its bytes as UTF-8,
        \\xNN where they are not; a control token by its piece), None unless exactly one id is."""
        return [self._ids_by_text.get(text) for text in texts]

    @cached_property
    def _ids_by_text(self) -> dict[str, int | None]:
        found: dict[str, int | None] = {}
        for token in range(self.tokenizer.vocab_size):
            text = (self.tokenizer.id_to_piece(token) if self.tokenizer.is_special(token) else
                    self.tokenizer.token_bytes(token).decode("utf-8", errors="backslashreplace"))
            found[text] = None if text in found else token
        return found

    def token_logprobs(self, ids: list[int], tokens: list[int]) -> list[float]:
        """The raw log-probability of each of `tokens` generated after `ids`, at its step."""
        rows = log_softmax(self._logits(tuple(ids + tokens))[len(ids) - 1:-1])
        return [float(rows[i, token]) for i, token in enumerate(tokens)]

    def top_p_boundary(self, ids: list[int], kept: int) -> float | None:
        """The top_p equal to the mass before the (kept + 1)-th likeliest id, computed as
        top_p_filter does: the spec keeps `kept` ids there, Meta's `<=` one more. None if
        that id ties with the one before it."""
        probs = softmax(self._next(tuple(ids)))
        order = np.lexsort((np.arange(probs.size), -probs))
        mass_before = np.cumsum(probs[order]) - probs[order]
        p = float(mass_before[kept])
        return p if mass_before[kept - 1] < p else None

    # Responses

    def greedy(self, ids: list[int], max_tokens: int, sampling: dict | None = None, profile: str = "reference") -> dict:
        """The reference's (or the profile's) greedy response: {"text", "ids", "deltas" (the text
        each token added), "gaps"}; gaps[k] is how far apart, in log-probability, the two
        likeliest tokens were at step k (after the penalties): how near a tie each choice was."""
        return self._greedy(tuple(ids), max_tokens, replace(params_of(sampling or {}, profile), temperature=0.0))

    @lru_cache(maxsize=256)
    def _greedy(self, ids: tuple[int, ...], max_tokens: int, params: SamplingParams) -> dict:
        choice = self.model.generate(list(ids), replace(params, max_new_tokens=max_tokens)).result().choices[0]
        tokens = [e.token_id for e in choice.tokens]
        rows = self._logits(ids + tuple(tokens))[len(ids) - 1:]       # (len(tokens) + 1, vocab)
        gaps = []
        for step in range(len(tokens)):
            top2 = np.sort(log_softmax(self._processed(list(ids) + tokens[:step], params, len(ids), rows[step])))[-2:]
            gaps.append(float(top2[1] - top2[0]))
        return {"text": choice.text, "ids": tokens, "deltas": [e.delta for e in choice.tokens], "gaps": gaps}

    def one_token_texts(self, ids: list[int], tokens: list[int]) -> list[list[str]]:
        """[text, OpenAI finish_reason] of a response that is exactly one of `tokens`
        (max_tokens = 1): EOS gives no text and "stop"; a dangling UTF-8 byte is flushed as
        U+FFFD (step 14)."""
        out = []
        for token in tokens:
            if token in self.eos_ids:
                out.append(["", "stop"])
            elif self.tokenizer.is_special(token):
                out.append(["", "length"])
            else:
                detokenizer = IncrementalDetokenizer(self.tokenizer, ids)
                out.append([detokenizer.add(token) + detokenizer.flush(), "length"])
        return out
