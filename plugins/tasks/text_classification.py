"""The `text_classification` task: NeMo's `sentence<TAB>label` files on
`bert_sequence_classification`.

Files: `model.train_ds.file_path`, `model.validation_ds.file_path`, `model.test_ds.file_path`
(`file` is accepted too). `model.dataset.num_classes` is required, as in NeMo. Label names
(`model.class_labels.class_labels_file`, one per line in id order) are read when the run
starts and recorded in `model.class_labels.names`, so checkpoints and archives carry them.
Evaluation reports NeMo's ClassificationReport: accuracy and micro/macro/weighted precision,
recall and F1 (percent), and writes `predictions.tsv` (`text<TAB>predicted<TAB>label`).

`model.dataset.class_balancing = "weighted_loss"` trains with NeMo's class-weighted cross
entropy: the weights (`model.dataset.class_weights`, computed from the training labels when
the run starts and recorded there) ride on each sample as its `loss_mask`, so the loss of a
global batch is sum(w * loss) / sum(w) over all of it, whatever the micro-batching.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from attrs import define, field

import mega
from mega.checkpoint.atomic import atomic_write_text
from mega.config import key
from mega.config.schema import at_least_one
from mega.errors import ConfigError
from mega.plugins.tasks.base import TaskBase, need, softmax
from mega.plugins.tasks.config import TaskConfig
from mega.plugins.tasks.metrics.classification_report import ClassificationReport
from mega.plugins.tasks.heads import SequenceClassifierHead, mlp_options
from mega.plugins.tasks.nemo_keys import CACHE, LOWER_CASE, nemo_key
from mega.plugins.tasks.text_classification_data import (
    classification_samples,
    encode_single,
    pad_sample,
    read_label_names,
    read_text_classification,
    resolve_class_weights,
)


@define(kw_only=True)
class TextClassificationDatasetConfig:
    """`model.dataset.*` of text classification."""

    num_classes: Optional[int] = key(default=None, validator=at_least_one, help="required: labels are 0..num_classes-1")
    max_seq_length: int = key(default=256, validator=at_least_one,
            help="[CLS] text [SEP]; longer texts keep their head")
    class_balancing: Optional[str] = key(None,
            help="\"weighted_loss\": cross entropy weighted by class_weights (NeMo's); null: unweighted")
    class_weights: List[float] = key(factory=list,
            help="by label id; empty: NeMo's total / (classes present x count) from the training labels")
    use_cache: Optional[bool] = nemo_key(CACHE, same=False, help="NeMo's feature cache: accepted, not used")
    do_lower_case: Optional[bool] = nemo_key(LOWER_CASE,
            help="NeMo's: accepted, not used (model.tokenizer.do_lower_case decides)")


@define(kw_only=True)
class ClassLabelsConfig:
    """`model.class_labels.*`: names for the label ids."""

    class_labels_file: Optional[str] = key(None, help="one name per line, in id order (read when the run starts)")
    names: List[str] = key(factory=list, help="the names by id (filled from class_labels_file; empty: the ids)")


@define(kw_only=True)
class TextClassificationConfig(TaskConfig):
    name: str = "text_classification"
    dataset: TextClassificationDatasetConfig = field(factory=TextClassificationDatasetConfig)
    class_labels: ClassLabelsConfig = field(factory=ClassLabelsConfig)
    classifier_head: Optional[SequenceClassifierHead] = key(None,
            help="NeMo's head section: set, the head is NeMo's MLP on the first token (mega.plugins.tasks.heads); unset: pooler + mega's")
    infer_samples: Optional[List[str]] = nemo_key("mega predict RUN --text answers a query",
            help="NeMo's post-training queries: accepted, not used")

    @classmethod
    def tiny_task_keys(cls, tasks):
        return {"train_ds": {"file_path": str(tasks / "sentences_train.tsv")},
                "validation_ds": {"file_path": str(tasks / "sentences_dev.tsv")}, "dataset": {"num_classes": 2, "max_seq_length": 48}}


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


class TextClassificationTask(TaskBase):
    head = "bert_sequence_classification"
    report_mode = "micro"

    @property
    def num_classes(self) -> int:
        return self.config.dataset.num_classes

    def check(self) -> None:
        if self.config.dataset.num_classes is None:
            raise ConfigError(f"model.dataset.num_classes: required (the labels of {self.config.name} files are 0..num_classes-1)")
        labels = self.config.class_labels
        if labels.class_labels_file and not labels.names:
            labels.names = [read_label_names(labels.class_labels_file)[i] for i in sorted(read_label_names(labels.class_labels_file))]
        if labels.names and len(labels.names) != self.num_classes:
            raise ConfigError(f"model.class_labels: {len(labels.names)} names for model.dataset.num_classes={self.num_classes}")
        self.class_weights()

    def class_weights(self) -> Optional[List[float]]:
        """`model.dataset.class_weights` when `class_balancing = "weighted_loss"` (computed
        from the training file once, then read from the config), else None."""
        return resolve_class_weights(self.config.dataset, self.num_classes,
                                     lambda: [label for _, label in self.read("train")])

    def head_options(self) -> Dict[str, Any]:
        return {"num_labels": self.num_classes, **mlp_options(self.config.classifier_head, "model.classifier_head")}

    def label_name(self, i: int) -> str:
        names = self.config.class_labels.names
        return names[i] if i < len(names) else str(i)

    def read(self, split):
        return read_text_classification(self.split_path(split), self.num_classes)

    def build_samples(self, split, tokenizer):
        self.examples[split] = self.limit(split, self.read(split))
        return classification_samples(self.examples[split], self.subwords(tokenizer), self.max_seq_length,
                                      self.class_weights())

    def report(self, split, outputs):
        preds = [int(o["logits"].argmax()) for o in outputs]
        gold = [label for _, label in self.examples[split]]
        rep = ClassificationReport(self.num_classes, {self.label_name(i): i for i in range(self.num_classes)},
                                   mode=self.report_mode)
        rep.update(preds, gold)
        return rep, preds

    def evaluate(self, split, outputs, directory: Optional[Path]) -> Dict[str, float]:
        rep, preds = self.report(split, outputs)
        if directory is not None:
            write_text(Path(directory) / "predictions.tsv", "".join(
                f"{text}\t{self.label_name(p)}\t{self.label_name(g)}\n" for (text, g), p in zip(self.examples[split], preds)))
            write_text(Path(directory) / "report.txt", rep.report() + "\n")
        metrics = rep.metrics()
        p, r, f = rep.compute(self.report_mode)
        metrics.update({"precision": p, "recall": r, "f1": f})
        return metrics

    def predict(self, inputs, tokenizer, infer) -> Dict[str, Any]:
        need(inputs, "text")
        sw = self.subwords(tokenizer)
        ids, types = encode_single(" ".join(inputs["text"].split()), sw, self.max_seq_length)
        logits = infer([pad_sample(ids, types, self.max_seq_length, sw.pad_id)])[0]["logits"]
        probs = softmax(logits)
        best = max(range(len(probs)), key=probs.__getitem__)
        return {"label": self.label_name(best), "label_id": best,
                "probabilities": {self.label_name(i): p for i, p in enumerate(probs)}}



@mega.hookimpl
def register_tasks(register):
    register("text_classification", TextClassificationTask, config=TextClassificationConfig)
