"""Perplexity with a sliding window (the method of transformers' "Perplexity of fixed-length
models" guide): windows of `context` tokens advance by `stride`; each window scores only the
tokens no earlier window scored, each with at least context - stride tokens of left context
after the first window. A window's first token has nothing before it in the window, so with
stride = context (no overlap) the first token of every window goes unscored, as in the guide.

    PPL = exp( Σ_t -log p(x_t | x_<t within its window) / (number of scored tokens) )

Unlike the guide's loop, which weights each window's mean loss by one token fewer than it
averaged, the sum here is over exactly the scored tokens.
"""
from dataclasses import dataclass

import numpy as np

from ..api import Model
from ..errors import LlamaRefError
from ..nn.ops import log_softmax


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    negative_log_likelihood: float   # the mean over scored tokens, in nats
    tokens: int                      # tokens scored


def perplexity(model: Model, ids, context: int, stride: int) -> Perplexity:
    """ids: the whole text's token ids (with BOS first if the model expects one)."""
    ids = np.asarray(ids, dtype=np.int64)
    if not 0 < stride <= context:
        raise LlamaRefError(f"stride: must be in 1..context ({context}), got {stride}", "stride")
    if context > model.config.context_length:
        raise LlamaRefError(f"context: {context} exceeds the model's context of {model.config.context_length}",
                            "context")
    if len(ids) < 2:
        raise LlamaRefError(f"text: {len(ids)} token(s); perplexity needs at least 2", "text")
    total, scored, begin, scored_until = 0.0, 0, 0, 1   # position 0 has nothing to predict it
    while scored_until < len(ids):
        end = min(begin + context, len(ids))
        logits = model.forward(ids[begin:end], 0, model.new_cache(end - begin))        # (end - begin, vocab)
        targets = np.arange(max(scored_until, begin + 1), end)    # absolute positions; a window's first has no context
        log_probs = log_softmax(logits[targets - 1 - begin])                           # (targets, vocab)
        total -= log_probs[np.arange(len(targets)), ids[targets]].sum()
        scored += len(targets)
        scored_until, begin = end, begin + stride
    mean = total / scored
    return Perplexity(float(np.exp(mean)), float(mean), scored)
