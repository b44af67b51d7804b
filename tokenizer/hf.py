"""HF `tokenizer.json` files through the `tokenizers` library."""
import json
import re
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizerObject

from .base import Tokenizer, TokenizerError


class HFTokenizer(Tokenizer):
    tokenizer_class = "PreTrainedTokenizerFast"

    def __init__(self, tokenizer: HFTokenizerObject | str | Path, bos: str | None, eos: str | None,
                 unk: str | None = None, pad: str | None = None, add_bos: bool = False,
                 chat_template: str | None = None):
        if not isinstance(tokenizer, HFTokenizerObject):
            try:
                tokenizer = HFTokenizerObject.from_file(str(tokenizer))
            except Exception as err:  # the library raises a bare Exception for unreadable files
                raise TokenizerError(f"{tokenizer}: not a readable tokenizer.json ({err})") from None
        # Special added tokens typed inside text stay text: control ids only come by id.
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = (
            None if t is None else tokenizer.token_to_id(t) for t in (bos, eos, unk, pad))
        self.add_bos = add_bos
        self.chat_template = chat_template
        self._special = frozenset(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)
        # Byte-level BPE (GPT-2, SmolLM2) spells each byte as one printable character;
        # SentencePiece-style files write "▁" for a space and "<0xNN>" for a raw byte.
        self._byte_level = "ByteLevel" in json.dumps(json.loads(tokenizer.to_str()).get("decoder"))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode_text(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def id_to_piece(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        piece = self._tok.id_to_token(token_id)
        if token_id in self._special:
            return b""
        if self._byte_level:
            return bytes(BYTE_OF_CHAR[ch] for ch in piece)
        raw = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        return bytes([int(raw.group(1), 16)]) if raw else piece.replace("▁", " ").encode()

    def save_vocabulary(self, directory: Path) -> None:
        self._tok.save(str(directory / "tokenizer.json"))


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte (its bytes_to_unicode table), inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


BYTE_OF_CHAR = byte_level_alphabet()
