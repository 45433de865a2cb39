"""Megatron-LM's BERT pretraining samples (its BertDataset), from sentence-split documents.

Two steps, both pure functions of the seed, so sample `idx` is the same in every run:

1. The sample map (`build_sample_map`, Megatron's `helpers.cpp::build_mapping`): walking
   the documents epoch after epoch, consecutive sentences of one document are grouped until
   they reach a target length: `seq_length - 3` (room for [CLS] and two [SEP]), or, with
   probability ~`short_seq_prob`, a shorter random one. A document's last group takes what
   is left. Documents with fewer sentences than a sample needs (2 with a binary head, else
   1) are skipped, and so are multi-sentence documents holding a sentence over 512 tokens.
   Targets are drawn from `std::mt19937(seed)`; the map is then shuffled (Fisher-Yates)
   with `std::mt19937_64(seed + 1)`.
2. Sample `idx` (`bert_sample`): all its draws come from
   `numpy.random.RandomState((seed + idx) % 2**32)`, in Megatron's order: the A/B split
   and the binary-head label, the truncation of the longer segment (front or back at
   random) to the target length, then masking: whole words (a `##` piece stays with its
   word) in n-grams of up to `max_ngrams` words with probability proportional to 1/n,
   `min(max_predictions, max(1, round(len * masked_lm_prob)))` tokens (Python's round);
   each masked token becomes [MASK] (80%), stays (10%) or becomes a random id (10%).

`binary_head`: "sop" swaps A and B half the time (Megatron-LM's sentence-order
prediction; `is_random` = 1 when swapped); "nsp" replaces B, half the time, by sentences of
another document: a uniformly chosen other document, from a random sentence on, as many
sentences as fill the target (original BERT's next-sentence prediction); None builds
`[CLS] A [SEP]` from all the sentences.

Random replacement ids are drawn from the tokenizer's ids `0 .. vocab_size - 1`; Megatron's
BERT tokenizer also counts the [BOS]/[EOS] it appends, so its replacement ids (not the
order of draws) differ.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional

import numpy as np
import torch

from mega.errors import DataError
from mega.plugins.data.mersenne import MT19937, MT19937_64

log = logging.getLogger("mega.data")

LONG_SENTENCE_LEN = 512
NGRAM_LIMIT = 3


def target_length(gen: MT19937, short_seq_ratio: int, max_len: int) -> int:
    if short_seq_ratio == 0:
        return max_len
    r = gen.next()
    if r % short_seq_ratio == 0:
        return 2 + r % (max_len - 1)
    return max_len


def build_sample_map(doc_bounds: np.ndarray, sizes: np.ndarray, max_num_samples: Optional[int], max_seq_length: int,
                     short_seq_prob: float, seed: int, min_num_sent: int, shuffle: bool = True) -> np.ndarray:
    """[N, 4] int64 rows (first sentence, end sentence (exclusive), target length, document)
    for at least `max_num_samples` samples (whole epochs; None: one epoch), shuffled as
    Megatron does."""
    # C++ round(): halves away from zero (Python's round would take 2.5 to 2)
    ratio = int(math.floor(1.0 / short_seq_prob + 0.5)) if short_seq_prob > 0 else 0
    gen = MT19937(seed)
    sizes = np.asarray(sizes)
    bounds = [int(b) for b in doc_bounds]
    usable = []
    for d in range(len(bounds) - 1):
        first, last = bounds[d], bounds[d + 1]
        n = last - first
        long_sentence = n > 1 and bool((sizes[first:last] > LONG_SENTENCE_LEN).any())
        usable.append(n >= min_num_sent and not long_sentence)
    if not any(usable):
        raise DataError(f"no document has the {min_num_sent} sentence(s) a BERT sample needs (and no sentence over"
                        f" {LONG_SENTENCE_LEN} tokens): check model.data.sentence_split and the text layout")
    skipped = len(usable) - sum(usable)
    if skipped:
        log.info("BERT samples: %d of %d documents skipped (fewer than %d sentences, or a sentence over %d tokens)",
                 skipped, len(usable), min_num_sent, LONG_SENTENCE_LEN)
    rows: List[tuple] = []
    epochs = 0
    # Megatron checks between epochs only; None: one epoch (its num_samples=None)
    while (len(rows) < max_num_samples) if max_num_samples is not None else epochs == 0:
        epochs += 1
        for d in range(len(bounds) - 1):
            if not usable[d]:
                continue
            first, last = bounds[d], bounds[d + 1]
            start, remaining, seq_len, num_sent = first, last - first, 0, 0
            target = target_length(gen, ratio, max_seq_length)
            for k in range(first, last):
                seq_len += int(sizes[k])
                num_sent += 1
                remaining -= 1
                if (seq_len >= target and remaining > 1 and num_sent >= min_num_sent) or remaining == 0:
                    rows.append((start, k + 1, target, d))
                    start, seq_len, num_sent = k + 1, 0, 0
                    target = target_length(gen, ratio, max_seq_length)
    table = np.array(rows, dtype=np.int64).reshape(-1, 4)
    if shuffle and len(table) > 1:
        n = len(table)
        draws = MT19937_64(seed + 1).draws(n - 1)
        js = draws % np.arange(n, 1, -1, dtype=np.uint64)  # for i = n-1 .. 1: j = r % (i + 1)
        order = list(range(n))
        for i, j in zip(range(n - 1, 0, -1), js.tolist()):
            order[i], order[j] = order[j], order[i]
        table = table[order]
    return table


def truncate(a: List[int], b: List[int], max_tokens: int, rng: np.random.RandomState) -> bool:
    """Cut the longer segment (B on ties), front or back at random, until A + B fits."""
    if len(a) + len(b) <= max_tokens:
        return False
    while len(a) + len(b) > max_tokens:
        seg = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del seg[0]
        else:
            seg.pop()
    return True


def mask_tokens(tokens: List[int], continues_word: List[bool], special: set, vocab_size: int, mask_id: int,
                masked_lm_prob: float, max_predictions: float, rng: np.random.RandomState, max_ngrams: int = NGRAM_LIMIT,
                whole_word: bool = True):
    """(tokens with masks applied, sorted masked positions, their original ids)."""
    candidates: List[List[int]] = []
    for i, token in enumerate(tokens):
        if token in special:
            continue
        if whole_word and candidates and continues_word[i]:
            candidates[-1].append(i)
        else:
            candidates.append([i])
    output = list(tokens)
    if masked_lm_prob == 0:
        return output, [], []
    num_to_predict = min(max_predictions, max(1, int(round(len(tokens) * masked_lm_prob))))
    ngrams = np.arange(1, max_ngrams + 1, dtype=np.int64)
    pvals = 1.0 / np.arange(1, max_ngrams + 1)
    pvals /= pvals.sum(keepdims=True)
    table = [[candidates[c: c + n] for n in ngrams] for c in range(len(candidates))]
    rng.shuffle(table)
    masked: List[tuple] = []
    covered = set()
    for entry in table:
        if len(masked) >= num_to_predict:
            break
        if not entry:
            continue
        n = rng.choice(ngrams[: len(entry)], p=pvals[: len(entry)] / pvals[: len(entry)].sum(keepdims=True))
        index_set = sum(entry[n - 1], [])
        n -= 1
        while len(masked) + len(index_set) > num_to_predict:  # fall back to shorter n-grams
            if n == 0:
                break
            index_set = sum(entry[n - 1], [])
            n -= 1
        if len(masked) + len(index_set) > num_to_predict:
            continue
        if any(i in covered for i in index_set):
            continue
        for i in index_set:
            covered.add(i)
            if rng.random() < 0.8:
                output[i] = mask_id
            elif rng.random() >= 0.5:
                output[i] = int(rng.randint(0, vocab_size))
            masked.append((i, tokens[i]))
    rng.shuffle(table)  # Megatron draws it (for permutation, unused): keeps the stream aligned
    masked.sort()
    return output, [i for i, _ in masked], [t for _, t in masked]


class BertSamples:
    """Megatron-style BERT samples over TokenizedDocuments (one split of one file)."""

    def __init__(self, documents, tokenizer, seq_length: int, num_samples: Optional[int], seed: int, objective,
                 shuffle: bool = True):
        if seq_length < 5:
            raise DataError(f"BERT samples need seq_length >= 5 ([CLS] A [SEP] B [SEP]); got {seq_length}")
        self.documents, self.tok, self.seq_length, self.seed = documents, tokenizer, seq_length, seed
        self.objective = objective
        self.binary_head: Optional[str] = objective.binary_head
        if self.binary_head not in ("sop", "nsp", None):
            raise DataError(f"BertObjective.binary_head={self.binary_head!r}: one of 'sop', 'nsp', None")
        min_num_sent = 2 if self.binary_head else 1
        self.map = build_sample_map(documents.doc_bounds, documents.sizes, num_samples, seq_length - 3,
                                    objective.short_seq_prob, seed, min_num_sent, shuffle)
        if self.binary_head == "nsp" and documents.num_docs < 2:
            raise DataError("binary_head 'nsp' takes B from another document; this split has only one")
        self.special = {tokenizer.cls_id, tokenizer.sep_id}
        self.lm_capacity = lm_capacity(seq_length, objective.masked_lm_prob, objective.max_predictions_per_seq)
        log.info("BERT samples: %d documents, %d sentences -> %d samples (%s asked for), seed %d",
                 documents.num_docs, int(documents.doc_bounds[-1] - documents.doc_bounds[0]), len(self.map),
                 num_samples, seed)

    def __len__(self) -> int:
        return len(self.map)

    def _random_document_b(self, doc: int, want: int, rng: np.random.RandomState) -> List[int]:
        other = int(rng.randint(0, self.documents.num_docs - 1))
        if other >= doc:
            other += 1
        first, last = int(self.documents.doc_bounds[other]), int(self.documents.doc_bounds[other + 1])
        b: List[int] = []
        for k in range(int(rng.randint(first, last)), last):
            b += self.documents.sentence(k)
            if len(b) >= want:
                break
        return b

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        start, end, target, doc = (int(v) for v in self.map[idx])
        rng = np.random.RandomState((self.seed + idx) % 2**32)
        sentences = [self.documents.sentence(k) for k in range(start, end)]
        is_random = False
        if self.binary_head:
            a_end = 1 if len(sentences) < 3 else int(rng.randint(1, len(sentences)))
            a = [t for s in sentences[:a_end] for t in s]
            b = [t for s in sentences[a_end:] for t in s]
            is_random = bool(rng.random() < 0.5)
            if is_random and self.binary_head == "sop":
                a, b = b, a
            elif is_random:
                b = self._random_document_b(doc, max(1, target - len(a)), rng)
        else:
            a, b = [t for s in sentences for t in s], []
        truncated = truncate(a, b, target, rng)
        tok = self.tok
        tokens = [tok.cls_id] + a + [tok.sep_id]
        types = [0] * len(tokens)
        if b:
            tokens += b + [tok.sep_id]
            types += [1] * (len(b) + 1)
        ob = self.objective
        max_predictions = ob.max_predictions_per_seq if ob.max_predictions_per_seq is not None else ob.masked_lm_prob * target
        continues = [not s for s in tok.word_starts(tokens)]
        tokens_out, positions, labels = mask_tokens(tokens, continues, self.special, tok.vocab_size, tok.mask_id,
                                                    ob.masked_lm_prob, max_predictions, rng, ob.max_ngrams,
                                                    ob.whole_word_masking)
        return bert_fields(tokens_out, types, positions, labels, self.seq_length, tok.pad_id, is_random, truncated,
                           self.lm_capacity)


def lm_capacity(seq_length: int, masked_lm_prob: float, max_predictions_per_seq: Optional[int]) -> int:
    """The most tokens `mask_tokens` predicts in a sample of at most `seq_length` tokens:
    `min(max_predictions, max(1, round(length x masked_lm_prob)))`, rounded up, at least 1."""
    cap = max(1, math.ceil(seq_length * masked_lm_prob))
    return min(cap, max_predictions_per_seq) if max_predictions_per_seq is not None else cap


def bert_fields(tokens: List[int], types: List[int], positions: List[int], labels: List[int], seq_length: int,
                pad_id: int, is_random: bool, truncated: bool, capacity: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """The padded int64 fields of BertObjective. With `capacity`, also `lm_positions`: the
    predicted positions, padded to `capacity` with 0 ([CLS], never predicted: weight 0), as
    NVIDIA's BERT data holds `masked_lm_positions`. The model then runs its LM head on a
    fixed number of rows per sample, with no read of the mask on the host."""
    n = len(tokens)
    out = {
        "tokens": torch.full((seq_length,), pad_id, dtype=torch.long),
        "tokentype_ids": torch.zeros(seq_length, dtype=torch.long),
        "padding_mask": torch.zeros(seq_length, dtype=torch.long),
        "labels": torch.full((seq_length,), -1, dtype=torch.long),
        "loss_mask": torch.zeros(seq_length, dtype=torch.long),
        "is_random": torch.tensor(int(is_random), dtype=torch.long),
        "truncated": torch.tensor(int(truncated), dtype=torch.long),
    }
    out["tokens"][:n] = torch.tensor(tokens, dtype=torch.long)
    out["tokentype_ids"][:n] = torch.tensor(types, dtype=torch.long)
    out["padding_mask"][:n] = 1
    if positions:
        index = torch.tensor(positions, dtype=torch.long)
        out["labels"][index] = torch.tensor(labels, dtype=torch.long)
        out["loss_mask"][index] = 1
    if capacity is not None:
        if len(positions) > capacity:  # mask_tokens never predicts more: a bug, not bad data
            raise DataError(f"BERT sample predicts {len(positions)} tokens, more than its capacity {capacity}")
        out["lm_positions"] = torch.zeros(capacity, dtype=torch.long)
        out["lm_positions"][: len(positions)] = torch.tensor(positions, dtype=torch.long)
    return out
