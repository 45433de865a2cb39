"""Documents made of sentences, read from a raw text file (what BERT samples are cut from).

Two layouts, chosen by `model.data.sentence_split`:

* "line": one sentence per line, a blank line between documents (the layout of Google's
  BERT pretraining data and of text already split into sentences);
* "punctuation": one document per line (the rule `text_mmap` uses for every model), cut
  into sentences after `.`, `!` or `?` (closing quotes and brackets stay with the sentence)
  followed by whitespace and an upper-case letter, a digit or an opening quote/bracket,
  and after the CJK full stops `。！？`. Abbreviations such as "Dr. Smith" are cut too:
  the rule is simple on purpose, and text split by a better tool can use "line";
* "auto" (default): "line" when the file has a blank line between two non-empty lines,
  else "punctuation".

Sentences that tokenize to nothing are dropped; so are documents left without sentences.
"""
from __future__ import annotations

import re
from typing import List, Sequence

import numpy as np

from mega.errors import ConfigError

SENTENCE_SPLITS = ("auto", "line", "punctuation")
_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*\s+|[\u3002\uff01\uff1f]+[\"'\u201d\u2019\u300d\u300f)\]]*\s*")
_OPENERS = "\"'\u201c\u2018([\u00ab"


def split_sentences(text: str) -> List[str]:
    """The sentences of one line of text by the punctuation rule (stripped, non-empty)."""
    out, start = [], 0
    for m in _END.finditer(text):
        end = m.end()
        if end < len(text) and text[m.start()] in ".!?":
            nxt = text[end]
            if nxt in _OPENERS and end + 1 < len(text):
                nxt = text[end + 1]
            if not (nxt.isupper() or nxt.isdigit()):
                continue
        out.append(text[start:end].strip())
        start = end
    out.append(text[start:].strip())
    return [s for s in out if s]


def has_blank_lines(index) -> bool:
    """Whether a blank (or whitespace-only) line separates two non-empty lines."""
    offsets = np.asarray(index.offsets)
    if len(offsets) > 1 and bool((offsets[1:, 0] > offsets[:-1, 1] + 1).any()):
        return True
    return any(not index[i].strip() for i in range(len(index)))


def read_documents(index, sentence_split: str) -> List[List[str]]:
    """The documents of a TextMemMapIndex as lists of sentence strings."""
    if sentence_split not in SENTENCE_SPLITS:
        raise ConfigError(f"model.data.sentence_split={sentence_split!r}: one of {', '.join(SENTENCE_SPLITS)}")
    if sentence_split == "auto":
        sentence_split = "line" if has_blank_lines(index) else "punctuation"
    docs: List[List[str]] = []
    if sentence_split == "punctuation":
        for i in range(len(index)):
            sentences = split_sentences(index[i])
            if sentences:
                docs.append(sentences)
        return docs
    offsets = np.asarray(index.offsets)
    current: List[str] = []
    for i in range(len(index)):
        line = index[i].strip()
        if i > 0 and offsets[i, 0] > offsets[i - 1, 1] + 1 and current:  # an empty line was dropped by the index
            docs.append(current)
            current = []
        if line:
            current.append(line)
        elif current:
            docs.append(current)
            current = []
    if current:
        docs.append(current)
    return docs


class TokenizedDocuments:
    """Documents -> sentences -> token ids, stored flat (picklable for DataLoader workers):
    `sentence_bounds[k]:sentence_bounds[k+1]` are sentence k's tokens in `tokens`, and
    `doc_bounds[d]:doc_bounds[d+1]` are document d's sentences (Megatron's `doc_idx`)."""

    def __init__(self, docs: Sequence[Sequence[str]], tokenizer):
        flat = [s for doc in docs for s in doc]
        encode_batch = getattr(tokenizer, "encode_batch", None)
        ids = encode_batch(flat) if encode_batch is not None else [tokenizer.encode(s) for s in flat]
        lengths, doc_bounds, k = [], [0], 0
        kept: List[List[int]] = []
        for doc in docs:
            n = 0
            for _ in doc:
                if ids[k]:  # a sentence of nothing but dropped characters
                    kept.append(ids[k])
                    lengths.append(len(ids[k]))
                    n += 1
                k += 1
            if n:
                doc_bounds.append(doc_bounds[-1] + n)
        self.tokens = np.fromiter((t for s in kept for t in s), dtype=np.int32, count=sum(lengths))
        self.sentence_bounds = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
        self.doc_bounds = np.asarray(doc_bounds, dtype=np.int64)

    @property
    def num_docs(self) -> int:
        return len(self.doc_bounds) - 1

    @property
    def sizes(self) -> np.ndarray:
        """Tokens per sentence (indexed by global sentence id)."""
        return np.diff(self.sentence_bounds)

    def sentence(self, k: int) -> List[int]:
        return self.tokens[self.sentence_bounds[k]: self.sentence_bounds[k + 1]].tolist()

    def subset(self, start: int, end: int) -> "TokenizedDocuments":
        """Documents [start, end), sharing the token arrays (sentence ids stay global)."""
        part = object.__new__(TokenizedDocuments)
        part.tokens, part.sentence_bounds = self.tokens, self.sentence_bounds
        part.doc_bounds = self.doc_bounds[start: end + 1]
        return part
