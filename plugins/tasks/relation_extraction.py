"""The `relation_extraction` task: BioMegatron's ChemProt-style relation classification.

A sentence holds its two entities replaced by markers (`<@CHEMICAL$>`, `<@GENE$>`); the
relation is its class. Files are the text classification TSV (`text<TAB>id`, see
`relation_extraction_data` for converting ChemProt's source rows), label names come from
`model.class_labels.class_labels_file` in either format: `label<TAB>id` lines (NeMo's
`label_mapping.tsv`) or one name per line. Metrics: ClassificationReport micro (NeMo's
default) and, with `model.dataset.negative_label` (e.g. `False`), precision, recall and F1
over the true relations only (`positive_precision`, ...), the convention BLUE reports.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

from attrs import define, field

import mega
from mega.errors import ConfigError
from mega.plugins.tasks.relation_extraction_data import micro_without, read_label_mapping
from mega.plugins.tasks.text_classification import (
    TextClassificationConfig,
    TextClassificationDatasetConfig,
    TextClassificationTask,
)
from mega.plugins.tasks.text_classification_data import read_label_names


@define(kw_only=True)
class RelationDatasetConfig(TextClassificationDatasetConfig):
    """`model.dataset.*` of relation extraction."""

    negative_label: Optional[str] = None  # the "no relation" class (ChemProt: False), left out of the positive_* scores


@define(kw_only=True)
class RelationExtractionConfig(TextClassificationConfig):
    name: str = "relation_extraction"
    dataset: RelationDatasetConfig = field(factory=RelationDatasetConfig)

    @classmethod
    def tiny_task_keys(cls, tasks):
        return {"train_ds": {"file_path": str(tasks / "relations_train.tsv")},
                "validation_ds": {"file_path": str(tasks / "relations_dev.tsv")},
                "class_labels": {"class_labels_file": str(tasks / "label_mapping.tsv")},
                "dataset": {"max_seq_length": 64, "negative_label": "False"}}


class RelationExtractionTask(TextClassificationTask):
    def check(self) -> None:
        labels = self.config.class_labels
        if labels.class_labels_file and not labels.names:
            path = Path(labels.class_labels_file)
            first = path.read_text(encoding="utf-8").splitlines()[:1] if path.is_file() else []
            names = read_label_mapping(path) if first and "\t" in first[0] else read_label_names(path)
            labels.names = [names[i] for i in sorted(names)]
            if self.config.dataset.num_classes is None:
                self.config.dataset.num_classes = len(labels.names)
        super().check()
        neg = self.config.dataset.negative_label
        if neg is not None and neg not in labels.names:
            raise ConfigError(f"model.dataset.negative_label: {neg!r} is not one of the class names "
                              f"({', '.join(labels.names) or 'none: set model.class_labels.class_labels_file'})")

    def evaluate(self, split, outputs, directory) -> Dict[str, float]:
        metrics = super().evaluate(split, outputs, directory)
        neg = self.config.dataset.negative_label
        if neg is not None:
            rep, _ = self.report(split, outputs)
            p, r, f = micro_without(rep, self.config.class_labels.names.index(neg))
            metrics.update({"positive_precision": p, "positive_recall": r, "positive_f1": f})
        return metrics



@mega.hookimpl
def register_tasks(register):
    register("relation_extraction", RelationExtractionTask, config=RelationExtractionConfig)
