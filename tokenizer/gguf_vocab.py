"""Vocabularies embedded in GGUF files, turned into objects of the well-kept libraries.

- `tokenizer.ggml.model = "llama"` (SentencePiece): tokens, scores and token types become a
  SentencePiece ModelProto, loaded by the sentencepiece library. GGUF and SentencePiece
  share the piece-type codes (1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte). The
  trainer and normalizer settings are Llama's: BPE, byte fallback, digits split, identity
  normalization, a dummy prefix unless `tokenizer.ggml.add_space_prefix` is false, and no
  collapsing of extra whitespace. llama.cpp writes these files from HF's tokenizer.model
  (convert_hf_to_gguf.py), so the rebuilt model tokenizes as the original does.
- `tokenizer.ggml.model = "gpt2"` (byte-level BPE): tokens and merges become a `tokenizers`
  BPE model with the GPT-2 byte-level pre-tokenizer and decoder, as transformers' GGUF
  loader builds it.
"""
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GGUFVocab:
    model: str                       # "llama" | "gpt2"
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    pre: str | None
    chat_template: str | None


def read_gguf_vocab(path) -> GGUFVocab:
    """The tokenizer.* metadata of a GGUF file: its path, or a gguf.GGUFReader already open
    on it (parsing a large vocabulary's metadata takes seconds; the model loader shares it)."""
    import gguf  # only GGUF users need it

    reader = path if isinstance(path, gguf.GGUFReader) else gguf.GGUFReader(str(path))

    def get(key, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    model = get("tokenizer.ggml.model")
    if model not in ("llama", "gpt2"):
        from .base import TokenizerError
        raise TokenizerError(f"{path}: tokenizer.ggml.model={model!r}; supported: 'llama' (SentencePiece), 'gpt2' (BPE)")
    return GGUFVocab(
        model=model, tokens=get("tokenizer.ggml.tokens"), token_types=get("tokenizer.ggml.token_type"),
        scores=get("tokenizer.ggml.scores"), merges=get("tokenizer.ggml.merges"),
        bos_id=get("tokenizer.ggml.bos_token_id"), eos_id=get("tokenizer.ggml.eos_token_id"),
        unk_id=get("tokenizer.ggml.unknown_token_id"), pad_id=get("tokenizer.ggml.padding_token_id"),
        add_bos=bool(get("tokenizer.ggml.add_bos_token", model == "llama")),
        add_eos=bool(get("tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=bool(get("tokenizer.ggml.add_space_prefix", model == "llama")),
        pre=get("tokenizer.ggml.pre"), chat_template=get("tokenizer.chat_template"))


def sentencepiece_model(vocab: GGUFVocab) -> bytes:
    """A serialized SentencePiece ModelProto equivalent to a GGUF "llama" vocabulary."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    for piece, score, kind in zip(vocab.tokens, vocab.scores, vocab.token_types):
        proto.pieces.add(piece=piece, score=float(np.float32(score)), type=int(kind))
    trainer = proto.trainer_spec
    trainer.model_type = pb.TrainerSpec.BPE
    trainer.vocab_size = len(vocab.tokens)
    trainer.byte_fallback = True
    trainer.split_digits = True
    trainer.unk_id = vocab.unk_id if vocab.unk_id is not None else 0
    trainer.bos_id = vocab.bos_id if vocab.bos_id is not None else -1
    trainer.eos_id = vocab.eos_id if vocab.eos_id is not None else -1
    trainer.pad_id = vocab.pad_id if vocab.pad_id is not None else -1
    for field, token_id in (("unk_piece", vocab.unk_id), ("bos_piece", vocab.bos_id),
                            ("eos_piece", vocab.eos_id), ("pad_piece", vocab.pad_id)):
        if token_id is not None:
            setattr(trainer, field, vocab.tokens[token_id])
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = vocab.add_space_prefix
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return proto.SerializeToString()


# tokenizer.ggml.pre -> pre-tokenizer, as llama.cpp's llama-vocab.cpp splits text for that
# type: "gpt2" is the GPT-2 regex, "smollm" splits every digit off first (which is also what
# SmolLM2's own tokenizer.json does: Digits(individual) then ByteLevel).
BYTE_LEVEL_PRE = ("default", "gpt2", "smollm")


def byte_level_bpe(vocab: GGUFVocab):
    """A `tokenizers.Tokenizer` equivalent to a GGUF "gpt2" vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from .base import TokenizerError

    pre = vocab.pre or "default"
    if pre not in BYTE_LEVEL_PRE:
        raise TokenizerError(f"tokenizer.ggml.pre={pre!r} is not supported; supported: {', '.join(BYTE_LEVEL_PRE)}")
    ids = {token: index for index, token in enumerate(vocab.tokens)}
    merges = [tuple(merge.split(" ")) for merge in vocab.merges]
    tokenizer = Tokenizer(models.BPE(vocab=ids, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                               if pre == "smollm" else byte_level)
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (type 3) become special added tokens, user-defined ones (4) plain added
    # tokens, so that each stays one id; encode_special_tokens keeps control text as text.
    kinds = list(zip(vocab.tokens, vocab.token_types))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in kinds if k == 3])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in kinds if k == 4])
    return tokenizer
