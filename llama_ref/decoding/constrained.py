"""Constrained decoding: JSON mode (`response_format: {"type": "json_object"}`), JSON Schema
outputs and tool calls (an OutputGrammar each), closed before the token budget runs out.

Two parts, applied to the logits before the sampler (so greedy decoding is constrained too):
- the grammar: llguidance (a maintained Rust library with Python bindings, CPU only) computes,
  for the text so far, the set of tokens that keep it a prefix of what the grammar allows;
  every other token gets logit -inf. Once a JSON value is complete, only end-of-sequence is
  allowed (tools' free-text branch may go on: end-of-sequence is one more choice there).
- the budget: the grammar's closing rule (`closing_text` for JSON mode; for a schema, the
  schema's own shortest completion, json_schema.py) gives the shortest text that finishes
  the answer so far (an open string's quote, a missing value, required keys, the brackets
  and braces). When the tokens left are no more than its length plus one (for
  end-of-sequence), only tokens whose text is a prefix of it stay allowed; each shortens
  it, so the answer closes in time. Where the rule finds no completion the grammar allows,
  the grammar alone decides (the answer may then end with "length").
"""
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import LlamaRefError
from ..tokenizer import Tokenizer
from .json_schema import Completer, schema_grammar


class ConstraintError(LlamaRefError):
    """JSON mode cannot run here (no llguidance, or a grammar error)."""

    def __init__(self, message: str):
        super().__init__(message, "response_format")


# What must still be written, by scanner state, before the open containers are closed.
PENDING = {"start": "{", "key_or_end": "", "key": '"":null', "colon": ":null", "value": "null",
           "value_or_end": "", "after_value": ""}


def closing_text(text: str) -> str:
    """The shortest text that turns `text`, a prefix of a JSON object (as the grammar lets
    through), into a complete one: finish the string, number or literal in progress, supply
    a missing key, colon or value, then close every open array and object."""
    stack, state = [], "start"
    escape, unicode_left, literal_left, last = False, 0, "", ""
    for ch in text:
        if state in ("string", "key_string"):
            if unicode_left:
                unicode_left -= 1
            elif escape:
                escape, unicode_left = False, 4 if ch == "u" else 0
            elif ch == "\\":
                escape = True
            elif ch == '"':
                state = "colon" if state == "key_string" else "after_value"
            continue
        if state == "literal":
            literal_left = literal_left[1:]
            state = "literal" if literal_left else "after_value"
            continue
        if state == "number":
            if ch in "0123456789+-.eE":
                last = ch
                continue
            state = "after_value"
        if ch.isspace():
            continue
        if ch in "{[":
            stack.append(ch)
            state = "key_or_end" if ch == "{" else "value_or_end"
        elif ch in "}]":
            stack.pop()
            state = "after_value"
        elif ch == '"':
            state = "key_string" if state in ("key_or_end", "key") else "string"
        elif ch == ":":
            state = "value"
        elif ch == ",":
            state = "key" if stack[-1] == "{" else "value"
        elif ch in "-0123456789":
            state, last = "number", ch
        else:   # t, f, n: the rest of true, false or null
            literal_left = {"t": "rue", "f": "alse", "n": "ull"}[ch]
            state = "literal"
    if state in ("string", "key_string"):
        pending = ("n" if escape else "0" * unicode_left) + '"' + (":null" if state == "key_string" else "")
    elif state == "number":
        pending = "0" if last in "+-.eE" else ""
    elif state == "literal":
        pending = literal_left
    else:
        pending = PENDING[state]
    return pending + "".join("}" if opener == "{" else "]" for opener in reversed(stack)) + ("}" if state == "start" else "")


def token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """What each id adds to the text as bytes (control tokens: nothing)."""
    return [b"" if tokenizer.is_special(i) else tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]


@dataclass(frozen=True)
class OutputGrammar:
    """What an answer must be: an llguidance grammar, and the rule for the shortest text that
    completes a prefix of it (for the token budget)."""
    grammar: str
    closing: Callable[[str], str | None]   # None: no budget rule applies to this text
    param: str                          # the request field that asked for it, named in errors
    end_when_complete: bool = True      # a complete value ends the answer (JSON); tools' free text goes on
    growth: int = 16                    # the most one token can lengthen the closing text (an upper bound)


def json_object_grammar() -> OutputGrammar:
    """JSON mode: any JSON object, closed by closing_text."""
    import llguidance
    return OutputGrammar(llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}'), closing_text,
                         "response_format")


def json_schema_grammar(schema) -> OutputGrammar:
    """response_format json_schema: a value valid under `schema`, closed by its own shortest completion."""
    completer = Completer(schema)
    return OutputGrammar(schema_grammar(schema), completer.complete, "response_format", growth=completer.growth())


_LL_TOKENIZERS = weakref.WeakKeyDictionary()
# Characters that open, close or separate JSON structure, or lengthen a number's closing: a
# token without them cannot lengthen the closing text by more than SLACK characters (a
# literal's first letter: "f" turns a pending "0" into "alse").
STRUCTURAL = set('"{}[],:\\.+-')
SLACK = 4


def ll_tokenizer(tokenizer: Tokenizer):
    """llguidance's view of the vocabulary (made once per tokenizer: seconds for a large one),
    and each token's text."""
    if tokenizer not in _LL_TOKENIZERS:
        import llguidance
        pieces = token_bytes(tokenizer)
        # llguidance (like llama.cpp) marks a token that adds no text by 0xFF + its name.
        named = [p or b"\xff" + tokenizer.id_to_piece(i).encode() for i, p in enumerate(pieces)]
        eos = tokenizer.eos_id if tokenizer.eos_id is not None else 0
        wrapper = _Wrapper(tokenizer, named, eos)
        lltokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(wrapper))
        # llguidance needs token ids whose bytes spell exactly the text it asks for; a
        # SentencePiece encoding starts with a dummy-prefix space, so its own greedy
        # tokenization (valid, if not canonical) serves instead.
        wrapper.encode = lltokenizer.greedy_tokenize
        texts = [p.decode("utf-8", "replace") for p in pieces]
        _LL_TOKENIZERS[tokenizer] = (lltokenizer, texts, np.array([not STRUCTURAL & set(t) for t in texts]))
    return _LL_TOKENIZERS[tokenizer]


class GrammarConstraint:
    """Masks logits so that the generated text follows an OutputGrammar; see the module docstring."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: set[int], output: OutputGrammar):
        try:
            import llguidance
        except ImportError:
            raise ConstraintError("response_format: constrained decoding needs the llguidance package") from None
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self.output = output
        lltokenizer, self.pieces, self.plain = ll_tokenizer(tokenizer)
        self.matcher = llguidance.LLMatcher(lltokenizer, output.grammar)
        if self.matcher.is_error():
            raise ConstraintError(f"{output.param}: {self.matcher.get_error()}", output.param)
        self.text = ""
        self.closing = False

    def allowed(self, tokens_left: int) -> np.ndarray:
        """The ids that may come next, as a (vocab,) bool mask."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little")[:self.vocab_size].astype(bool)
        mask = np.pad(mask, (0, self.vocab_size - mask.size))
        if self.matcher.is_accepting():
            if self.output.end_when_complete:
                mask[:] = False
            mask[self.eos_ids] = True
            if self.output.end_when_complete:
                return mask
        closing = self.output.closing(self.text)
        if closing is None:
            return mask                     # no rule applies (tools' free text, or auto before it chooses)
        # Near the end of the budget (the closing text + SLACK + the most one token can add to
        # it), no token may open structure the closing does not already hold: only its beginning
        # or plain text. Once down to the closing text itself (+1 for end-of-sequence), only its
        # beginning, to the end: each such token shortens it by a character or more.
        self.closing = self.closing or tokens_left <= len(closing) + 1 + SLACK
        if self.closing:
            limited = mask & self.starts(closing)
        elif tokens_left <= len(closing) + 1 + SLACK + self.output.growth:
            limited = mask & (self.starts(closing) | self.plain)
        else:
            return mask
        return limited if limited.any() else mask   # none: the rule found no way the grammar allows

    def starts(self, closing: str) -> np.ndarray:
        """The tokens whose text begins `closing`."""
        return np.array([bool(p) and closing.startswith(p) for p in self.pieces], dtype=bool)

    def apply(self, logits: np.ndarray, tokens_left: int) -> np.ndarray:
        return np.where(self.allowed(tokens_left), logits, -np.inf).astype(logits.dtype)

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise ConstraintError(f"{self.output.param}: token {token} broke the grammar "
                                  f"({self.matcher.get_error()})", self.output.param)
        self.text += self.pieces[token]


class _Wrapper:
    """The tokenizer as llguidance's TokenizerWrapper expects it."""

    def __init__(self, tokenizer: Tokenizer, pieces: list[bytes], eos_id: int):
        self.tokens = pieces
        self.eos_token_id = eos_id
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = [i for i, piece in enumerate(pieces) if piece.startswith(b"\xff")]
        self.encode = tokenizer.encode_text

    def __call__(self, text) -> list[int]:
        return self.encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)
