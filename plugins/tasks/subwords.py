"""What the downstream readers need from a WordPiece tokenizer, and the BERT basic tokenizer
SQuAD post-processing projects answers with.

Downstream features are built word by word (a word's first sub-token carries its label, a
SQuAD answer is found in sub-tokens and mapped back to words), so the readers need sub-token
*strings* and their ids, not only `encode`. `subword_view` adapts whatever the run's
tokenizer offers (`tokenize` + `convert_tokens_to_ids` as Hugging Face's, NeMo's
`text_to_tokens` + `tokens_to_ids`, or a `tokenizers.Tokenizer` inside) to one small
interface, `Subwords`.
"""
from __future__ import annotations

import unicodedata
from typing import Callable, List, Sequence

import attrs

from mega.errors import ConfigError


@attrs.define
class Subwords:
    """Sub-token strings and ids, and the special ids BERT inputs are framed with."""

    tokenize: Callable[[str], List[str]]  # text -> sub-token strings ("##" continuations)
    to_ids: Callable[[Sequence[str]], List[int]]
    cls_id: int
    sep_id: int
    pad_id: int
    unk_token: str = "[UNK]"


def _inner_tokenizers(tok):
    """A `tokenizers.Tokenizer` held by a mega tokenizer plugin, if any."""
    for name in ("tokenizer", "_tokenizer", "backend", "_backend", "hf"):
        inner = getattr(tok, name, None)
        if inner is not None and hasattr(inner, "encode") and hasattr(inner, "token_to_id"):
            return inner
    return None


def subword_view(tok) -> Subwords:
    """The `Subwords` of a tokenizer: a Hugging Face-style one, a NeMo-style one, or a mega
    tokenizer plugin wrapping a `tokenizers.Tokenizer`."""
    if isinstance(tok, Subwords):
        return tok

    def special(name: str, token: str) -> int:
        value = getattr(tok, name, None)
        if value is None:
            value = getattr(tok, name.replace("_id", "_token_id"), None)
        if value is None:
            raise ConfigError(f"model.tokenizer: downstream tasks need a WordPiece tokenizer with {token} "
                              f"({type(tok).__name__} has no {name})")
        return int(value)

    cls_id, sep_id, pad_id = special("cls_id", "[CLS]"), special("sep_id", "[SEP]"), special("pad_id", "[PAD]")
    if hasattr(tok, "tokenize") and hasattr(tok, "convert_tokens_to_ids"):
        return Subwords(tok.tokenize, lambda ts: list(tok.convert_tokens_to_ids(list(ts))), cls_id, sep_id, pad_id)
    if hasattr(tok, "text_to_tokens") and hasattr(tok, "tokens_to_ids"):
        return Subwords(tok.text_to_tokens, lambda ts: list(tok.tokens_to_ids(list(ts))), cls_id, sep_id, pad_id)
    inner = _inner_tokenizers(tok)
    if inner is not None:
        unk = "[UNK]"

        def ids(ts):
            out = []
            for t in ts:
                i = inner.token_to_id(t)
                out.append(inner.token_to_id(unk) if i is None else i)
            return out

        return Subwords(lambda text: inner.encode(text, add_special_tokens=False).tokens, ids, cls_id, sep_id, pad_id)
    raise ConfigError(f"model.tokenizer: downstream tasks need sub-token strings; {type(tok).__name__} offers "
                      "neither tokenize/convert_tokens_to_ids nor a tokenizers.Tokenizer (use library = \"wordpiece\")")


# --- BERT's basic tokenizer (whitespace, punctuation, optional lower-casing) ------------------


def _is_whitespace(ch: str) -> bool:
    return ch in (" ", "\t", "\n", "\r") or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    if ch in ("\t", "\n", "\r"):
        return False
    return unicodedata.category(ch) in ("Cc", "Cf")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def basic_tokenize(text: str, do_lower_case: bool = True) -> List[str]:
    """BERT's pre-tokenisation: drop control characters, map whitespace to spaces, isolate
    CJK characters and punctuation, and (uncased) lower-case and strip accents."""
    cleaned = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or _is_control(ch):
            continue
        if _is_cjk(cp):
            cleaned.append(f" {ch} ")
        else:
            cleaned.append(" " if _is_whitespace(ch) else ch)
    out: List[str] = []
    for word in "".join(cleaned).split():
        if do_lower_case:
            word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
        piece = ""
        for ch in word:
            if _is_punctuation(ch):
                if piece:
                    out.append(piece)
                out.append(ch)
                piece = ""
            else:
                piece += ch
        if piece:
            out.append(piece)
    return out
