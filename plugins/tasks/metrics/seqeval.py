"""Entity-level precision, recall and F1 for BIO/IOBES tag sequences, as seqeval's default
(conlleval-compatible) mode defines them, and token accuracy.

Entities are read leniently the way conlleval does: an `I-X` after `O` or after another type
opens an entity, `B-X I-Y` is two entities, `B-X B-X` is two. A predicted entity counts only
if its type, first and last position all equal a gold entity's. Sentences are joined with an
`O` between them, so no entity crosses a sentence boundary.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Sequence, Set, Tuple, Union

Tags = Union[Sequence[str], Sequence[Sequence[str]]]
Entity = Tuple[str, int, int]  # type, first position, last position (inclusive)


def _flatten(seq: Tags) -> List[str]:
    if seq and not isinstance(seq[0], str):
        out: List[str] = []
        for sentence in seq:
            out.extend(list(sentence) + ["O"])
        return out
    return list(seq)


def _split(chunk: str) -> Tuple[str, str]:
    tag = chunk[0] if chunk else "O"
    typ = chunk[1:].split("-", 1)[-1] or "_"
    return tag, typ


def _end_of_chunk(prev_tag, tag, prev_type, type_) -> bool:
    return (prev_tag in ("E", "S")
            or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
            or (prev_tag not in ("O", ".") and prev_type != type_))


def _start_of_chunk(prev_tag, tag, prev_type, type_) -> bool:
    return (tag in ("B", "S")
            or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
            or (tag not in ("O", ".") and prev_type != type_))


def get_entities(seq: Tags) -> List[Entity]:
    """(type, start, end) of every entity, positions over the flattened sequence."""
    tags = _flatten(seq) + ["O"]
    entities = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, chunk in enumerate(tags):
        tag, type_ = _split(chunk)
        if _end_of_chunk(prev_tag, tag, prev_type, type_):
            entities.append((prev_type, begin, i - 1))
        if _start_of_chunk(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return entities


def _divide(num: float, den: float, what: str, zero_division) -> float:
    if den == 0:
        if zero_division == "warn":
            warnings.warn(f"{what} is ill-defined and being set to 0.0 (no {'predicted' if what == 'precision' else 'true'} entities)")
            return 0.0
        return float(zero_division)
    return num / den


def _counts(y_true: Tags, y_pred: Tags) -> Dict[str, Tuple[int, int, int]]:
    """type -> (tp, number predicted, number true)."""
    true_e: Set[Entity] = set(get_entities(y_true))
    pred_e: Set[Entity] = set(get_entities(y_pred))
    types = sorted({e[0] for e in true_e} | {e[0] for e in pred_e})
    return {t: (len({e for e in true_e if e[0] == t} & {e for e in pred_e if e[0] == t}),
                sum(1 for e in pred_e if e[0] == t), sum(1 for e in true_e if e[0] == t)) for t in types}


def _prf(tp, n_pred, n_true, zero_division):
    p = _divide(tp, n_pred, "precision", zero_division)
    r = _divide(tp, n_true, "recall", zero_division)
    den = p + r
    return p, r, (2 * p * r / den if den else 0.0)


def precision_recall_f1(y_true: Tags, y_pred: Tags, average: str = "micro", zero_division="warn"):
    """Entity-level (precision, recall, f1) as fractions; `average` is micro, macro or weighted."""
    counts = _counts(y_true, y_pred)
    if average == "micro":
        tp = sum(c[0] for c in counts.values())
        return _prf(tp, sum(c[1] for c in counts.values()), sum(c[2] for c in counts.values()), zero_division)
    per = {t: _prf(*c, zero_division) for t, c in counts.items()}
    if not per:
        return 0.0, 0.0, 0.0
    if average == "macro":
        return tuple(sum(v[k] for v in per.values()) / len(per) for k in range(3))
    if average == "weighted":
        total = sum(c[2] for c in counts.values())
        if not total:
            return 0.0, 0.0, 0.0
        return tuple(sum(per[t][k] * counts[t][2] for t in per) / total for k in range(3))
    raise ValueError(f"average must be micro, macro or weighted, got {average!r}")


def f1_score(y_true: Tags, y_pred: Tags, average: str = "micro", zero_division="warn") -> float:
    return precision_recall_f1(y_true, y_pred, average, zero_division)[2]


def accuracy_score(y_true: Tags, y_pred: Tags) -> float:
    """Fraction of equal tags over the concatenated sequences (seqeval's: no `O` between
    sentences here, unlike the entity scores' flattening)."""
    def concat(seq):
        return [t for s in seq for t in s] if seq and not isinstance(seq[0], str) else list(seq)
    t, p = concat(y_true), concat(y_pred)
    if len(t) != len(p):
        raise ValueError(f"{len(t)} true tags for {len(p)} predicted")
    return sum(a == b for a, b in zip(t, p)) / len(t) if t else 0.0


def classification_report(y_true: Tags, y_pred: Tags, digits: int = 2) -> Dict[str, Dict[str, float]]:
    """Per entity type and micro/macro/weighted averages: precision, recall, f1, support."""
    counts = _counts(y_true, y_pred)
    out = {}
    for t, (tp, n_pred, n_true) in counts.items():
        p, r, f = _prf(tp, n_pred, n_true, 0)
        out[t] = {"precision": p, "recall": r, "f1": f, "support": n_true}
    total = sum(c[2] for c in counts.values())
    for avg in ("micro", "macro", "weighted"):
        p, r, f = precision_recall_f1(y_true, y_pred, avg, 0)
        out[f"{avg} avg"] = {"precision": p, "recall": r, "f1": f, "support": total}
    return out
