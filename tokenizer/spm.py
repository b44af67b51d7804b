"""SentencePiece `.model` files (Llama, Llama-2, Mistral, Yi) through the sentencepiece library.

SentencePiece matches USER_DEFINED pieces inside text, so a chat marker stored that way
(Yi's "<|im_start|>", when tokenizer_config.json calls it special) would turn typed text
into a control id. Pieces named in `control_pieces` are rewritten as CONTROL in the loaded
model: then only code that asks for their id can produce them, and decode skips them.
"""
from pathlib import Path

import sentencepiece
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from .base import Tokenizer, TokenizerError


class SentencePieceTokenizer(Tokenizer):
    tokenizer_class = "LlamaTokenizer"

    def __init__(self, model: bytes | str | Path, add_bos: bool = True, chat_template: str | None = None,
                 control_pieces: frozenset[str] = frozenset()):
        name = "model proto" if isinstance(model, bytes) else str(model)
        proto = model_pb2.ModelProto()
        try:
            proto.ParseFromString(model if isinstance(model, bytes) else Path(model).read_bytes())
            for piece in proto.pieces:
                if piece.piece in control_pieces:
                    piece.type = model_pb2.ModelProto.SentencePiece.CONTROL
            self._sp = sentencepiece.SentencePieceProcessor()
            self._sp.LoadFromSerializedProto(proto.SerializeToString())
        except (OSError, RuntimeError, ValueError) as err:
            raise TokenizerError(f"{name}: not a readable SentencePiece model ({err})") from None
        sp = self._sp

        def optional(token_id):
            return token_id if token_id >= 0 else None

        self.bos_id, self.eos_id = optional(sp.bos_id()), optional(sp.eos_id())
        self.unk_id, self.pad_id = optional(sp.unk_id()), optional(sp.pad_id())
        self.add_bos = add_bos
        self.chat_template = chat_template
        self._special = frozenset(i for i in range(sp.vocab_size()) if sp.is_control(i))

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

    def token_bytes(self, token_id: int) -> bytes:
        piece = self._sp.id_to_piece(token_id)
        if self._sp.is_byte(token_id):
            return bytes([int(piece[3:5], 16)])          # "<0x0A>"
        if self._sp.is_control(token_id) or self._sp.is_unknown(token_id):
            return b""
        return piece.replace("▁", " ").encode()

    def save_vocabulary(self, directory: Path) -> None:
        (directory / "tokenizer.model").write_bytes(self._sp.serialized_model_proto())
