"""The one tokenizer interface every backend implements.

Rules shared by all backends:
- `encode(text, bos, eos)` never adds BOS or EOS unless asked, and text that looks like a
  control token ("<s>", "</s>", "[INST]", "<|im_end|>") is always tokenized as plain text:
  control ids come only from code that asks for them by id.
- `decode(ids)` skips special (control) tokens and turns bytes that are not valid UTF-8 into
  U+FFFD, one per byte, keeping every valid character; so decoding a longer id sequence only
  ever appends to, or completes the U+FFFD tail of, the decoding of its prefix (the
  incremental detokenizer relies on this).
"""
import json
from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path

from ..errors import LlamaRefError


class TokenizerError(LlamaRefError, ValueError):
    """A tokenizer file is missing, unreadable or of an unsupported kind."""


class Tokenizer(ABC):
    """Backends set the special ids (None when the vocabulary has no such token), `add_bos`
    (whether the model expects BOS before raw text), `chat_template` (Jinja source or None)
    and implement the methods below."""
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    chat_template: str | None

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""

    @abstractmethod
    def encode_text(self, text: str) -> list[int]:
        """Ids of `text` alone, no BOS/EOS, control-looking text as plain text."""

    @abstractmethod
    def decode(self, ids) -> str:
        """Text of the ids, special tokens skipped, invalid UTF-8 bytes as U+FFFD each."""

    @abstractmethod
    def is_special(self, token_id: int) -> bool:
        """True for control tokens (BOS, EOS, chat markers): they never add text."""

    @abstractmethod
    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry as stored ("▁Hello", "<0x0A>", "</s>")."""

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes this token adds to the text wherever it stands (b" Hello" for "▁Hello",
        b"\\x0a" for "<0x0A>"), b"" for control tokens: what a grammar engine matches."""

    @cached_property
    def special_pieces(self) -> dict[str, int]:
        """Control tokens by their text ("</s>" -> 2): how a chat template's markers become ids."""
        return {self.id_to_piece(i): i for i in range(self.vocab_size) if self.is_special(i)}

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        """[BOS] + ids of text + [EOS], each end only when asked."""
        ids = self.encode_text(text)
        if bos:
            ids.insert(0, self._required(self.bos_id, "BOS"))
        if eos:
            ids.append(self._required(self.eos_id, "EOS"))
        return ids

    def save(self, directory) -> None:
        """Write the vocabulary file and a tokenizer_config.json (special tokens, add_bos_token,
        chat_template) that transformers and load_tokenizer read back as this tokenizer."""
        config = {"tokenizer_class": self.tokenizer_class, "add_bos_token": self.add_bos, "add_eos_token": False}
        for name in ("bos", "eos", "unk", "pad"):
            token_id = getattr(self, f"{name}_id")
            if token_id is not None:
                config[f"{name}_token"] = self.id_to_piece(token_id)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        self.save_vocabulary(Path(directory))
        (Path(directory) / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))

    tokenizer_class: str = "PreTrainedTokenizerFast"

    def save_vocabulary(self, directory: Path) -> None:
        """Write the backend's own file (tokenizer.model or tokenizer.json) into directory;
        the SentencePiece and tokenizer.json backends do."""
        raise TokenizerError(f"{type(self).__name__} cannot write its vocabulary to {directory}")

    def _required(self, token_id: int | None, name: str) -> int:
        if token_id is None:
            raise TokenizerError(f"this tokenizer has no {name} token")
        return token_id
