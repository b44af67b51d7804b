"""SentencePiece `.model` files (Llama, Llama-2, Mistral, Yi) through the sentencepiece library."""
from pathlib import Path

import sentencepiece

from .base import SpecialIds, Tokenizer, TokenizerError


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model: bytes | str | Path, add_bos: bool = True, chat_template: str | None = None,
                 extra_special_ids: frozenset[int] = frozenset()):
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            if isinstance(model, bytes):
                self._sp.LoadFromSerializedProto(model)
            else:
                self._sp.Load(str(model))
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"{model if not isinstance(model, bytes) else 'model proto'}: "
                                 f"not a readable SentencePiece model ({err})") from None
        sp = self._sp

        def optional(token_id):
            return token_id if token_id >= 0 else None

        self.special_ids = SpecialIds(optional(sp.bos_id()), optional(sp.eos_id()), optional(sp.unk_id()),
                                      optional(sp.pad_id()))
        self.add_bos = add_bos
        self.chat_template = chat_template
        self._special = frozenset(i for i in range(sp.vocab_size()) if sp.is_control(i)) | extra_special_ids

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    def encode_text(self, text: str) -> list[int]:
        # SentencePiece never emits control ids from text: "<s>" becomes "▁<", "s", ">".
        return self._sp.encode(text)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids if int(i) not in self._special])

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)
