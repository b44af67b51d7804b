"""Tokenizers and incremental detokenization.

    load_tokenizer(directory)   an HF model directory, resolved as described below
    load_gguf_tokenizer(path)   the vocabulary embedded in a GGUF file
    IncrementalDetokenizer      text deltas for generated ids, one at a time

A directory is resolved like transformers resolves a Llama-family one: `tokenizer.model`
(SentencePiece) when present, else `tokenizer.json`; `tokenizer_config.json` supplies the
special tokens, `add_bos_token` and the chat template (or `chat_template.jinja` beside it).
"""
import json
from pathlib import Path

from .base import Tokenizer, TokenizerError
from .detokenizer import IncrementalDetokenizer
from .gguf_vocab import byte_level_bpe, read_gguf_vocab, sentencepiece_model
from .hf import HFTokenizer
from .spm import SentencePieceTokenizer

__all__ = ["HFTokenizer", "IncrementalDetokenizer", "SentencePieceTokenizer", "Tokenizer", "TokenizerError",
           "has_tokenizer", "load_gguf_tokenizer", "load_tokenizer"]

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # in the order they are preferred


def has_tokenizer(directory: str | Path) -> bool:
    return any((Path(directory) / name).exists() for name in TOKENIZER_FILES)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    directory = Path(directory)
    config = _tokenizer_config(directory)
    template = _chat_template(directory, config)
    if (directory / "tokenizer.model").exists():
        special = frozenset(_token_text(token) for token in config.get("added_tokens_decoder", {}).values()
                            if token.get("special"))
        return SentencePieceTokenizer(directory / "tokenizer.model", add_bos=config.get("add_bos_token", True),
                                      chat_template=template, control_pieces=special)
    if (directory / "tokenizer.json").exists():
        names = {key: _token_text(config.get(f"{key}_token")) for key in ("bos", "eos", "unk", "pad")}
        return HFTokenizer(directory / "tokenizer.json", **names, add_bos=config.get("add_bos_token", False),
                           chat_template=template)
    raise TokenizerError(f"{directory}: no {' or '.join(TOKENIZER_FILES)}")


def load_gguf_tokenizer(path) -> Tokenizer:
    """path: a GGUF file, or a gguf.GGUFReader open on one."""
    vocab = read_gguf_vocab(path)
    if vocab.model == "llama":
        return SentencePieceTokenizer(sentencepiece_model(vocab), add_bos=vocab.add_bos,
                                      chat_template=vocab.chat_template)
    names = {key: None if token_id is None else vocab.tokens[token_id]
             for key, token_id in (("bos", vocab.bos_id), ("eos", vocab.eos_id), ("unk", vocab.unk_id),
                                   ("pad", vocab.pad_id))}
    return HFTokenizer(byte_level_bpe(vocab), **names, add_bos=vocab.add_bos, chat_template=vocab.chat_template)


def _tokenizer_config(directory: Path) -> dict:
    path = directory / "tokenizer_config.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TokenizerError(f"{path}: not valid JSON ({err})") from None


def _chat_template(directory: Path, config: dict) -> str | None:
    if (directory / "chat_template.jinja").exists():
        return (directory / "chat_template.jinja").read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {entry["name"]: entry["template"] for entry in template}
        return named.get("default")
    return template


def _token_text(token) -> str | None:
    """tokenizer_config spells a token as a string or as an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token
