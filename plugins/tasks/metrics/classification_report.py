"""NeMo's ClassificationReport: per-class and averaged precision, recall and F1, in percent.

The state is three count vectors (true positives, false positives, false negatives per
class), so partial reports from data-parallel ranks or evaluation batches simply add up
(`update`, `merge`). The formulas carry NeMo's epsilon (1e-6) in every denominator, and its
macro average divides the sum over *all* classes by the number of classes that occur in the
labels: a class that was predicted but never appears adds 0 and is not counted (scikit-learn
differs here). Plain accuracy is the true positives over the number of examples, which for
single-label classification equals micro precision, recall and F1.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

METRIC_EPS = 1e-6
MODES = ("macro", "micro", "weighted", "all")


class ClassificationReport:
    """Counts per class; `compute(mode)` gives (precision, recall, f1) in percent."""

    def __init__(self, num_classes: int, label_ids: Optional[Dict[str, int]] = None, mode: str = "macro"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.num_classes = num_classes
        self.mode = mode
        # id -> name for the text report (NeMo prints "{name} (label_id: i)")
        self.names = {i: name for name, i in (label_ids or {}).items()}
        self.tp = [0] * num_classes
        self.fp = [0] * num_classes
        self.fn = [0] * num_classes

    def update(self, predictions: Sequence[int], labels: Sequence[int]) -> None:
        predictions, labels = [int(p) for p in predictions], [int(t) for t in labels]
        if len(predictions) != len(labels):
            raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
        for p, t in zip(predictions, labels):
            if p == t:
                self.tp[t] += 1
            else:
                self.fp[p] += 1
                self.fn[t] += 1

    def merge(self, other: "ClassificationReport") -> None:
        for mine, theirs in ((self.tp, other.tp), (self.fp, other.fp), (self.fn, other.fn)):
            for i, v in enumerate(theirs):
                mine[i] += v

    def state(self) -> List[List[int]]:
        """[tp, fp, fn]: what to sum over ranks."""
        return [list(self.tp), list(self.fp), list(self.fn)]

    def load_state(self, state: Sequence[Sequence[int]]) -> None:
        self.tp, self.fp, self.fn = (list(int(v) for v in row) for row in state)

    @property
    def support(self) -> List[int]:
        return [tp + fn for tp, fn in zip(self.tp, self.fn)]

    def per_class(self):
        """(precision, recall, f1) lists, one value per class."""
        p = [100.0 * tp / (tp + fp + METRIC_EPS) for tp, fp in zip(self.tp, self.fp)]
        r = [100.0 * tp / (tp + fn + METRIC_EPS) for tp, fn in zip(self.tp, self.fn)]
        f = [2 * pi * ri / (pi + ri + METRIC_EPS) for pi, ri in zip(p, r)]
        return p, r, f

    def micro(self):
        tp, fp, fn = sum(self.tp), sum(self.fp), sum(self.fn)
        p = 100.0 * tp / (tp + fp + METRIC_EPS)
        r = 100.0 * tp / (tp + fn + METRIC_EPS)
        return p, r, 2 * p * r / (p + r + METRIC_EPS)

    def macro(self):
        non_empty = sum(1 for s in self.support if s > 0)
        return tuple(sum(v) / non_empty if non_empty else 0.0 for v in self.per_class())

    def weighted(self):
        support = self.support
        total = sum(support)
        return tuple(sum(x * s for x, s in zip(v, support)) / total if total else 0.0 for v in self.per_class())

    def accuracy(self) -> float:
        total = sum(self.support)
        return 100.0 * sum(self.tp) / total if total else 0.0

    def compute(self, mode: Optional[str] = None):
        mode = mode or self.mode
        if mode == "all":
            return self.per_class()
        return {"macro": self.macro, "micro": self.micro, "weighted": self.weighted}[mode]()

    def metrics(self) -> Dict[str, float]:
        """A flat dict for logs: accuracy and the three averages."""
        out = {"accuracy": self.accuracy()}
        for mode in ("micro", "macro", "weighted"):
            p, r, f = self.compute(mode)
            out.update({f"{mode}_precision": p, f"{mode}_recall": r, f"{mode}_f1": f})
        return out

    def report(self) -> str:
        """The text table NeMo logs: one row per class with support, then the averages."""
        p, r, f = self.per_class()
        support = self.support
        rows = []
        for i in range(self.num_classes):
            name = f"{self.names[i]} (label_id: {i})" if i in self.names else f"label_id: {i}"
            rows.append((name, p[i], r[i], f[i], support[i]))
        total = sum(support)
        for mode in ("micro", "macro", "weighted"):
            rows.append((f"{mode} avg", *self.compute(mode), total))
        width = max(len(r[0]) for r in rows) + 2
        lines = [f"{'label':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
        for i, (name, pi, ri, fi, si) in enumerate(rows):
            if i == self.num_classes:
                lines.append("-" * (width + 40))
            lines.append(f"{name:<{width}}{pi:>10.2f}{ri:>10.2f}{fi:>10.2f}{si:>10d}")
        return "\n".join(lines)
