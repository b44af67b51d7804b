"""Incremental detokenization: feed generated ids one by one, get the text each one adds.

The prefix/read-offset method of TGI (`Model.decode_token`) and vLLM V0, also what
`tokenizers.decoders.DecodeStream` does (docs/spec/sampling.md steps 11 and 14):

    prefix_text = decode(ids[prefix_offset:read_offset])
    new_text    = decode(ids[prefix_offset:])
    if new_text is longer and does not end in U+FFFD: emit new_text[len(prefix_text):]
    else: emit "" and wait for more ids

Here the ids before prefix_offset are dropped as it advances, so the window `ids` always
starts at the prefix and only `read_offset` is kept.

Decoding a window that starts inside the prompt keeps the first generated token's leading
space (" Hello": SentencePiece drops the space only at the start of a decoded string). A
token that ends inside a multi-byte UTF-8 character leaves new_text ending in U+FFFD, so it
adds "" until the character completes. Special tokens add no text. `flush()` at the end of
generation returns whatever is still held back: a dangling partial character comes out as
U+FFFD, one per byte (the decode rule of base.py).
"""
from .base import Tokenizer

# Prompt ids kept as decoding context: enough for any merge across the boundary (TGI, vLLM).
PREFIX_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids):
        self.tokenizer = tokenizer
        context = [int(i) for i in prompt_ids if not tokenizer.is_special(int(i))][-PREFIX_TOKENS:]
        self.ids = context                 # from the prefix offset on
        self.read_offset = len(context)

    def add(self, token_id: int) -> str:
        """The text this token adds ("" while held back; always "" for a special token)."""
        if self.tokenizer.is_special(token_id):
            return ""
        self.ids.append(int(token_id))
        prefix_text, new_text = self._texts()
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        # Drop ids before the new prefix: the window never grows past a few tokens.
        del self.ids[:self.read_offset]
        self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """Text still held back at the end of generation (U+FFFD per dangling byte)."""
        prefix_text, new_text = self._texts()
        self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]

    def _texts(self) -> tuple[str, str]:
        """decode(ids[:read_offset]) and decode(ids): prefix_text and new_text."""
        return self.tokenizer.decode(self.ids[:self.read_offset]), self.tokenizer.decode(self.ids)
