"""NeMo's token classification (NER) files -> per-sub-token samples.

`text_{split}.txt` holds one sentence per line, words separated by spaces;
`labels_{split}.txt` the same number of lines with one label per word (BIO, e.g.
`B-PER O O B-LOC I-LOC`). Label ids: `pad_label` (default `O`) is 0, every other label of the
training file follows in sorted order; the map is written to `label_ids.csv` (one label per
line, in id order) and validation/test data must use it.

Each word's sub-tokens all carry the word's label. `loss_mask` is 1 on the first sub-token
of every word, on the other sub-tokens unless `ignore_extra_tokens`, and on `[CLS]`/`[SEP]`
unless `ignore_start_end` (NeMo's defaults train on all of them). `subtokens_mask` marks the
first sub-token of each word: evaluation reads one prediction per word there. A sequence
longer than `max_seq_length` keeps `[CLS]` and its *last* `max_seq_length - 1` positions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from mega.errors import DataError
from mega.plugins.tasks.subwords import Subwords
from mega.checkpoint.atomic import atomic_write_text


def read_token_classification(text_file, labels_file=None) -> List[Tuple[List[str], Optional[List[str]]]]:
    """(words, labels) per line; labels None when `labels_file` is None (prediction)."""
    text_file = Path(text_file)
    if not text_file.is_file():
        raise DataError(f"{text_file}: token classification text file not found")
    lines = [line.split() for line in text_file.read_text(encoding="utf-8").splitlines()]
    if labels_file is None:
        return [(words, None) for words in lines if words]
    labels_file = Path(labels_file)
    if not labels_file.is_file():
        raise DataError(f"{labels_file}: token classification labels file not found")
    label_lines = [line.split() for line in labels_file.read_text(encoding="utf-8").splitlines()]
    if len(label_lines) != len(lines):
        raise DataError(f"{labels_file}: {len(label_lines)} lines for the {len(lines)} lines of {text_file}")
    out = []
    for n, (words, labels) in enumerate(zip(lines, label_lines), 1):
        if len(words) != len(labels):
            raise DataError(f"{labels_file}:{n}: {len(labels)} labels for {len(words)} words")
        if words:
            out.append((words, labels))
    if not out:
        raise DataError(f"{text_file}: no sentences")
    return out


def build_label_ids(label_sequences, pad_label: str = "O") -> Dict[str, int]:
    """{pad_label: 0}, then the other labels in sorted order."""
    others = sorted({label for seq in label_sequences for label in seq} - {pad_label})
    return {pad_label: 0, **{label: i + 1 for i, label in enumerate(others)}}


def write_label_ids(label_ids: Dict[str, int], path) -> Path:
    path = Path(path)
    atomic_write_text(path, "".join(f"{name}\n" for name, _ in sorted(label_ids.items(), key=lambda kv: kv[1])))
    return path


def read_label_ids(path) -> Dict[str, int]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: label ids file not found")
    return {line.strip(): i for i, line in enumerate(l for l in path.read_text(encoding="utf-8").splitlines() if l.strip())}


def token_classification_sample(words: Sequence[str], labels: Optional[Sequence[str]], subwords: Subwords,
                                label_ids: Dict[str, int], max_seq_length: int, pad_label: str = "O",
                                ignore_extra_tokens: bool = False, ignore_start_end: bool = False,
                                where: str = "") -> Dict[str, torch.Tensor]:
    """tokens, tokentype_ids, padding_mask, `labels` [s], `loss_mask` [s], `subtokens_mask` [s]."""
    pad = label_ids[pad_label]
    edge = 0.0 if ignore_start_end else 1.0
    ids, lab, loss_mask, sub_mask = [subwords.cls_id], [pad], [edge], [0]
    for k, word in enumerate(words):
        pieces = subwords.tokenize(word) or [subwords.unk_token]
        if labels is None:
            label = pad
        else:
            try:
                label = label_ids[labels[k]]
            except KeyError:
                raise DataError(f"{where}: label {labels[k]!r} is not in the training label map "
                                f"({', '.join(label_ids)})") from None
        for j, piece_id in enumerate(subwords.to_ids(pieces)):
            ids.append(piece_id)
            lab.append(label)
            loss_mask.append(1.0 if j == 0 or not ignore_extra_tokens else 0.0)
            sub_mask.append(1 if j == 0 else 0)
    ids.append(subwords.sep_id)
    lab.append(pad)
    loss_mask.append(edge)
    sub_mask.append(0)
    if len(ids) > max_seq_length:  # keep [CLS] and the tail
        keep = max_seq_length - 1
        ids, lab, loss_mask, sub_mask = ([seq[0]] + seq[-keep:] for seq in (ids, lab, loss_mask, sub_mask))
    n, padn = len(ids), max_seq_length - len(ids)
    return {
        "tokens": torch.tensor(ids + [subwords.pad_id] * padn, dtype=torch.long),
        "tokentype_ids": torch.zeros(max_seq_length, dtype=torch.long),
        "padding_mask": torch.tensor([1] * n + [0] * padn, dtype=torch.long),
        "labels": torch.tensor(lab + [pad] * padn, dtype=torch.long),
        "loss_mask": torch.tensor(loss_mask + [0.0] * padn, dtype=torch.float),
        "subtokens_mask": torch.tensor(sub_mask + [0] * padn, dtype=torch.long),
    }

