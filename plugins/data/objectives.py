"""Encoder-decoder pretraining objectives over token ids.

* T5 span corruption (Raffel et al. 2020, §3.1.4): `noise_density` of the tokens, in spans
  of mean length `mean_noise_span_length`, are replaced in the encoder input by one
  sentinel each; the target lists each sentinel followed by the tokens it hides.
* BART text infilling (Lewis et al. 2020): the same spans are each replaced by a single
  mask token; the target is the original text.

Sentinels and the mask token are the ids just past the tokenizer's vocabulary
(`vocab_size + k`, k < `extra_ids`), as T5's 100 extra ids are; the encoder-decoder model
sizes its embedding for them. Everything is a pure function of the sample's random
generator, seeded by (seed, sample index).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import attrs
import numpy as np
import torch

from mega.protocols import SampleObjective


@attrs.frozen
class DenoisingObjective(SampleObjective):
    """An encoder-decoder's declared need: "t5" span corruption or "bart" infilling, with
    `seq_length_dec` decoder positions (None: the encoder's) and `extra_ids` sentinel ids."""

    name: str = "t5"
    seq_length_dec: Optional[int] = None
    extra_ids: int = 0


def _partition(total: int, parts: int, rng: np.random.Generator) -> List[int]:
    """`total` split into `parts` positive lengths, uniformly at random."""
    if parts <= 1:
        return [total]
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]])).tolist()


def noise_spans(length: int, density: float, mean_span: float, rng: np.random.Generator, max_spans: int) -> List[Tuple[int, int]]:
    """(start, end) of the noise spans over `length` tokens (non-noise first, as T5)."""
    if length < 2:
        return []
    num_noise = min(max(1, int(round(length * density))), length - 1)
    num_spans = min(max(1, int(round(num_noise / mean_span))), length - num_noise, max_spans)
    noise = _partition(num_noise, num_spans, rng)
    keep = _partition(length - num_noise, num_spans, rng)
    spans, pos = [], 0
    for k, n in zip(keep, noise):
        pos += k
        spans.append((pos, pos + n))
        pos += n
    return spans


def word_spans_to_tokens(spans, word_starts: List[int], length: int) -> List[Tuple[int, int]]:
    """Noise spans over words (indices into `word_starts`) as token spans."""
    bounds = list(word_starts) + [length]
    return [(bounds[a], bounds[b]) for a, b in spans]


def t5_span_corruption(ids: List[int], spans, sentinel0: int, eos: int) -> Tuple[List[int], List[int]]:
    enc, target, prev = [], [], 0
    for k, (a, b) in enumerate(spans):
        enc += ids[prev:a] + [sentinel0 + k]
        target += [sentinel0 + k] + ids[a:b]
        prev = b
    enc += ids[prev:]
    return enc, target + [eos]


def bart_infilling(ids: List[int], spans, mask_id: int, eos: int) -> Tuple[List[int], List[int]]:
    enc, prev = [], 0
    for a, b in spans:
        enc += ids[prev:a] + [mask_id]
        prev = b
    return enc + ids[prev:], ids + [eos]


def pad(ids: List[int], length: int, pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    ids = ids[:length]
    out = torch.full((length,), pad_id, dtype=torch.long)
    out[: len(ids)] = torch.tensor(ids, dtype=torch.long)
    mask = torch.zeros(length, dtype=torch.long)
    mask[: len(ids)] = 1
    return out, mask


def encoder_decoder_sample(enc: List[int], target: List[int], seq_length: int, seq_length_dec: int,
                           pad_id: int, start_id: int) -> Dict[str, torch.Tensor]:
    """Tensors for the model: decoder input is the target shifted right after a start
    token (T5 starts with the padding id); the loss covers the real target tokens."""
    text_enc, enc_mask = pad(enc, seq_length, pad_id)
    labels, loss_mask = pad(target, seq_length_dec, pad_id)
    text_dec, _ = pad([start_id] + target[:-1], seq_length_dec, pad_id)
    return {"text_enc": text_enc, "enc_mask": enc_mask, "text_dec": text_dec, "labels": labels,
            "loss_mask": loss_mask.float()}


@attrs.frozen
class BertObjective(SampleObjective):
    """A Megatron-BERT model's declared need: sentence-pair samples with masked tokens.

    Each sample is `[CLS] A [SEP] B [SEP]` padded to the sequence length, as Megatron-LM's
    BertDataset builds it, with these int64 fields:

    | field           | shape | content                                                    |
    |-----------------|-------|------------------------------------------------------------|
    | `tokens`        | [s]   | ids, masked positions replaced (80% [MASK], 10% random, 10% kept) |
    | `tokentype_ids` | [s]   | 0 for `[CLS] A [SEP]`, 1 for `B [SEP]`, 0 on padding        |
    | `padding_mask`  | [s]   | 1 for real tokens, 0 for padding                            |
    | `labels`        | [s]   | the original id at masked positions, -1 elsewhere           |
    | `loss_mask`     | [s]   | 1 at masked positions, else 0                               |
    | `is_random`     | []    | binary-head label: 1 = B is not A's continuation            |
    | `truncated`     | []    | 1 when A + B was cut to fit                                 |

    `binary_head` "sop" swaps A and B half the time (Megatron-LM's sentence-order
    prediction), "nsp" takes B from a random other document half the time (original BERT's
    next-sentence prediction), None builds single-segment samples (`is_random` = 0)."""

    name: str = "bert"
    binary_head: Optional[str] = "sop"  # "sop" | "nsp" | None
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1
    max_predictions_per_seq: Optional[int] = None  # None: masked_lm_prob x the sample's target length (Megatron's: seq_length - 3, or shorter)
    whole_word_masking: bool = True
    max_ngrams: int = 3
