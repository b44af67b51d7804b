"""JSON mode (`response_format: {"type": "json_object"}`): decoding constrained so that the
response is one valid JSON object, closed before the token budget runs out.

Two parts, applied to the logits before the sampler (so greedy decoding is constrained too):
- the grammar: llguidance (a maintained Rust library with Python bindings, CPU only) computes,
  for the text so far, the set of tokens that keep it a prefix of a JSON object; every other
  token gets logit -inf. Once the object is complete, only end-of-sequence is allowed.
- the budget: `closing_text` reads the JSON so far and returns the shortest text that closes
  it (an open string's quote, a missing value, the brackets and braces). When the tokens
  left are no more than that text's length plus one (for end-of-sequence), only tokens whose
  text is a prefix of it stay allowed; each shortens it, so the object closes in time.
"""
import numpy as np

from ..errors import LlamaRefError
from ..tokenizer import Tokenizer


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


class JSONObjectConstraint:
    """Masks logits so that the generated text is a JSON object; see the module docstring."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: set[int]):
        try:
            import llguidance
        except ImportError:
            raise ConstraintError("response_format: JSON mode needs the llguidance package") from None
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        pieces = token_bytes(tokenizer)
        self.pieces = [p.decode("utf-8", "replace") for p in pieces]
        # llguidance (like llama.cpp) marks a token that adds no text by 0xFF + its name.
        named = [p or b"\xff" + tokenizer.id_to_piece(i).encode() for i, p in enumerate(pieces)]
        wrapper = _Wrapper(tokenizer, named, self.eos_ids[0])
        lltokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(wrapper))
        # llguidance needs token ids whose bytes spell exactly the text it asks for; a
        # SentencePiece encoding starts with a dummy-prefix space, so its own greedy
        # tokenization (valid, if not canonical) serves instead.
        wrapper.encode = lltokenizer.greedy_tokenize
        self.matcher = llguidance.LLMatcher(lltokenizer,
                                            llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}'))
        if self.matcher.is_error():
            raise ConstraintError(f"response_format: {self.matcher.get_error()}")
        self.text = ""
        self.closing = False

    def allowed(self, tokens_left: int) -> np.ndarray:
        """The ids that may come next, as a (vocab,) bool mask."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little")[:self.vocab_size].astype(bool)
        mask = np.pad(mask, (0, self.vocab_size - mask.size))
        if self.matcher.is_accepting():
            mask[:] = False
            mask[self.eos_ids] = True
            return mask
        closing = closing_text(self.text)
        # Once the budget is down to the closing text (+1 for end-of-sequence), only tokens that
        # write its beginning are allowed, to the end: each one shortens it by a character or more.
        self.closing = self.closing or tokens_left <= len(closing) + 1
        if self.closing:
            mask &= np.array([bool(p) and closing.startswith(p) for p in self.pieces], dtype=bool)
        return mask

    def apply(self, logits: np.ndarray, tokens_left: int) -> np.ndarray:
        return np.where(self.allowed(tokens_left), logits, -np.inf).astype(logits.dtype)

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise ConstraintError(f"response_format: token {token} broke the JSON grammar "
                                  f"({self.matcher.get_error()})")
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
