"""NeMo's text classification files -> `[CLS] text [SEP]` samples.

A file has one example per line, `words ... <TAB> label`, the label an integer
`0 .. num_classes-1`. A line is split on any whitespace and its last field must parse as an
int, otherwise the line is skipped (NeMo's rule); that is how a header line such as
`sentence\\tlabel` is ignored. Any other line skipped so -- one without its label, one with
a column after it, one with a label and no text -- is named in the log with its line and
counted (mega.plugins.tasks.skipped). The text is re-joined from the words, so whitespace
inside it does not matter. Relation extraction uses the same files (entity markers are
ordinary words of the text).

Truncation keeps the head: at most `max_seq_length - 1` tokens then `[SEP]` (NeMo 1.19's
rule), padded to `max_seq_length`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from mega.errors import ConfigError, DataError
from mega.plugins.tasks.skipped import Skipped
from mega.plugins.tasks.subwords import Subwords


def read_text_classification(path, num_classes: Optional[int] = None) -> List[Tuple[str, int]]:
    """(text, label) pairs of a `sentence<TAB>label` file; a label outside `num_classes` is an error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: text classification file not found")
    out = []
    skipped = Skipped(path)
    header = True  # the first line may be a header (`sentence<TAB>label`), skipped without a word
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue  # a blank line holds no example
            label = _int(fields[-1])
            first, header = header, False
            if label is None:
                if not first:
                    skipped.add(f"{path}:{lineno}", f"the last field {_shown(fields[-1])} is not an integer label "
                                "(a line without its label, or with a column after it)")
                continue
            if len(fields) < 2:
                skipped.add(f"{path}:{lineno}", f"label {label} with no text")
                continue
            if label < 0 or (num_classes is not None and label >= num_classes):
                raise DataError(f"{path}:{lineno}: label {label} is outside 0..{(num_classes or 1) - 1} "
                                f"(model.dataset.num_classes = {num_classes})")
            out.append((" ".join(fields[:-1]), label))
    skipped.report(len(out))
    if not out:
        raise DataError(f"{path}: no `text<TAB>label` lines (the last field of a line must be an integer label)")
    return out


def _int(field: str) -> Optional[int]:
    try:
        return int(field)
    except ValueError:
        return None


def _shown(field: str) -> str:
    return repr(field if len(field) <= 30 else field[:27] + "...")


def read_label_names(path) -> Dict[int, str]:
    """`class_labels_file`: one label name per line, in id order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: class labels file not found")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return dict(enumerate(names))


def encode_single(text: str, subwords: Subwords, max_seq_length: int):
    """ids and token types of `[CLS] text [SEP]`, the head of the text kept."""
    toks = []
    for word in text.split():
        toks.extend(subwords.tokenize(word))
    ids = [subwords.cls_id] + subwords.to_ids(toks)[:max_seq_length - 2] + [subwords.sep_id]
    return ids, [0] * len(ids)


def pad_sample(ids: Sequence[int], types: Sequence[int], max_seq_length: int, pad_id: int) -> Dict[str, torch.Tensor]:
    n = len(ids)
    pad = max_seq_length - n
    return {
        "tokens": torch.tensor(list(ids) + [pad_id] * pad, dtype=torch.long),
        "tokentype_ids": torch.tensor(list(types) + [0] * pad, dtype=torch.long),
        "padding_mask": torch.tensor([1] * n + [0] * pad, dtype=torch.long),
    }


def classification_samples(pairs: Sequence[Tuple[str, int]], subwords: Subwords, max_seq_length: int,
                           weights: Optional[Sequence[float]] = None) -> List[Dict[str, torch.Tensor]]:
    """One sample per example: tokens, tokentype_ids, padding_mask and `label` [].

    Without `weights` the head's loss is a mean over examples (no `loss_mask`). With class
    weights (`class_balancing = "weighted_loss"`) each sample carries `loss_mask` [] = the
    weight of its label: the head's loss is then sum(w * loss) and the kernel divides by the
    global batch's sum of `loss_mask`, i.e. NeMo's weighted mean sum(w * loss) / sum(w)."""
    out = []
    for text, label in pairs:
        ids, types = encode_single(text, subwords, max_seq_length)
        s = pad_sample(ids, types, max_seq_length, subwords.pad_id)
        s["label"] = torch.tensor(label, dtype=torch.long)
        if weights is not None:
            s["loss_mask"] = torch.tensor(float(weights[label]), dtype=torch.float)
        out.append(s)
    return out


def class_weights(labels: Sequence[int], num_classes: int) -> List[float]:
    """`class_balancing = "weighted_loss"`: NeMo's frequency weights, total / (number of
    classes present x count) per class; a class absent from the training data gets 0.
    (Over the training set the weights of its labels sum to its size: the weighted mean
    of a whole epoch keeps the unweighted loss's scale.)"""
    counts = [0] * num_classes
    for label in labels:
        counts[label] += 1
    total, present = sum(counts), sum(1 for c in counts if c)
    return [total / (present * c) if c else 0.0 for c in counts]


BALANCING = (None, "weighted_loss")


def resolve_class_weights(dataset, num_classes: int, training_labels) -> Optional[List[float]]:
    """The class weights a run trains with, recorded in `dataset.class_weights` so that
    config.toml, checkpoints and archives carry them (a restored model needs no training
    file): None without `class_balancing`; else the recorded weights, or NeMo's computed
    from `training_labels()` (the label id of every training example / labelled word)."""
    if dataset.class_balancing not in BALANCING:
        raise ConfigError(f"model.dataset.class_balancing: expected null or 'weighted_loss', got {dataset.class_balancing!r}")
    if dataset.class_balancing is None:
        return None
    if not dataset.class_weights:
        dataset.class_weights = class_weights(list(training_labels()), num_classes)
    if len(dataset.class_weights) != num_classes:
        raise ConfigError(f"model.dataset.class_weights: {len(dataset.class_weights)} weights for {num_classes} classes")
    if any(w < 0 for w in dataset.class_weights):
        raise ConfigError("model.dataset.class_weights: weights must not be negative")
    return list(dataset.class_weights)
